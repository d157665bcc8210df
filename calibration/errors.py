"""The calibration package's one error type (a one-line message, like the rest of edgeexit)."""

from edgeexit.errors import EdgeExitError


class CalibrationError(EdgeExitError):
    """Traces, a latency model or a budget that calibration cannot work with."""
