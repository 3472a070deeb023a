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


class SessionOwnerError(BloombeeError, PermissionError):
    """A client asked a stage to close, roll back or compact a session another client opened."""


class SwarmError(BloombeeError, RuntimeError):
    """The swarm cannot do what was asked: a model not hosted (or not fully), a worker whose owner
    did not allow a model, no route through the hosted spans. The message says what to host where."""


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
    """A worker hosting a stage is gone or did not answer in time.

    ``workers``: the Dask addresses of the workers it is about (empty when the failing worker is
    not known, e.g. a step that did not reach the last stage in time). A session that hits it
    replays its history onto live workers (see ``InferenceSession``); it reaches the caller only
    where that is impossible or switched off.
    """

    def __init__(self, message: str = "", workers=()):
        super().__init__(message)
        self.workers = tuple(workers)

    def __reduce__(self):  # crosses Dask (pickled) with its workers
        return type(self), (str(self), self.workers)

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class StageHungError(StageUnavailableError):
    """A stage's worker is still connected but does not answer: a ping or a call timed out."""


class StageLeavingError(StageUnavailableError):
    """The worker hosting a stage is leaving (``bloombee-nb worker`` got SIGTERM) and takes no new steps:
    sessions move their spans to other workers (a pause, nothing lost)."""


class RecoveryError(BloombeeError, RuntimeError):
    """Workers were lost and the live ones cannot host the model: nothing to re-place the spans on.

    The session keeps its history: once workers join (``bloombee-nb worker <scheduler>``), the next
    step on it recovers and continues exactly.
    """


class NotEnoughWorkersError(BloombeeError, RuntimeError):
    """The cluster has no workers (or fewer than the requested placement needs)."""
