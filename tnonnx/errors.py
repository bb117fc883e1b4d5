"""Errors the user caused. The CLI prints them as one line and exits with code 2."""


class TnonnxError(Exception):
    """Bad usage or bad input: a message meant for the user, never a traceback."""

    exit_code = 2


class NotApplicable(TnonnxError):
    """A format cannot represent this layer (its shape, or the requested tolerance or
    ratio): the layer is left alone with this message as its reason."""


class OriginalDoesNotRun(TnonnxError):
    """The original model cannot run on the feeds tnonnx made up for it (a graph that needs
    particular values or lengths): a rewrite that asked for no checks skips validation."""


class ModelTooLarge(TnonnxError):
    """A model whose weights do not fit in the memory available to run it: refused before
    onnxruntime tries, and never taken for a model that merely needs other feeds."""


class ValidationFailed(Exception):
    """Two models disagree beyond the requested thresholds (exit code 1)."""

    exit_code = 1


class MissingCalibrationWarning(UserWarning):
    """A layer was fitted in a way that only makes sense with calibration data (the
    nonlinear formats ntt, ntr), but none reached it."""
