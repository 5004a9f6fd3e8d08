"""Errors fastft raises on bad input; each message says what and where."""


class FastftError(Exception):
    """Base class of fastft's own errors."""


class CaptureError(FastftError):
    """The model could not be captured as asked (e.g. ``fullgraph=True`` and a graph break)."""


class CheckError(FastftError):
    """``fastft.check`` could not run (no loss to differentiate, a model fastft never optimised)."""
