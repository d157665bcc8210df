"""edgeexit: deploy early-exit CNNs as per-stage ONNX/TensorRT engines with a gated runtime."""

__version__ = "0.1.0"
