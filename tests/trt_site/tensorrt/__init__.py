"""The TensorRT simulator (tests/trt_sim.py) as `import tensorrt`, for the loopback devices of
tests/test_deploy.py: their sshd puts this folder on PYTHONPATH, so `edgeexit engines` run
there over SSH builds (simulated) plans. EDGEEXIT_SIM_TRT picks the version (default 10.3)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/

from trt_sim import fake_trt  # noqa: E402

sys.modules[__name__] = fake_trt(os.environ.get("EDGEEXIT_SIM_TRT", "10.3"))
