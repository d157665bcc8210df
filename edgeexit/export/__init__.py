"""Exporters: per-stage ONNX (onnx.py), quantization, and TensorRT engines."""
