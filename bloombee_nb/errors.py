"""Typed errors. Every message says what happened *and* what to do about it.

All errors derive from :class:`BloombeeError`; they carry only a message string so they pickle
cleanly across Dask workers and arrive at the client with their type intact.
"""


class BloombeeError(Exception):
    """Base class of every error this package raises on purpose."""


class FrameError(BloombeeError, ValueError):
    """A wire frame is malformed: bad magic, unknown dtype/codec, sizes that do not add up."""


class ShapeMismatchError(BloombeeError, ValueError):
    """A tensor reached a stage with a dtype/shape the stage cannot accept."""


class UnknownSessionError(BloombeeError, KeyError):
    """The session id is not open on this stage (never opened, already closed, or lost)."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SessionLengthError(BloombeeError, ValueError):
    """A step would write past the session's reserved ``max_length``."""


class TreeError(BloombeeError, ValueError):
    """A speculative token tree, or the path kept from it, is malformed or does not match the session."""


class DraftModelError(BloombeeError, ValueError):
    """A speculative-decoding draft model cannot serve this target (e.g. another vocabulary)."""


class SessionLimitError(BloombeeError, RuntimeError):
    """A stage cannot reserve memory for another session."""


class SpanError(BloombeeError, ValueError):
    """A requested layer span is empty or outside the model's layers."""


class CheckpointNotFoundError(BloombeeError, FileNotFoundError):
    """The model path/id does not resolve to a checkpoint with config + safetensors."""


class UnsupportedArchitectureError(BloombeeError, ValueError):
    """The model family does not have the ``model.layers`` layout we can split."""


class StageUnavailableError(BloombeeError, ConnectionError):
    """A worker hosting a stage is gone or did not answer in time."""


class NotEnoughWorkersError(BloombeeError, RuntimeError):
    """The cluster has no workers (or fewer than the requested placement needs)."""
