"""Named errors of ``nectar.models``; each message says what to do next."""

import logging

logger = logging.getLogger(__name__)


class ModelError(Exception):
    """Base class of every error raised by ``nectar.models``."""


class ModelNotFoundError(ModelError, LookupError):
    """A model name is neither built in nor a local checkpoint folder."""


class UnsupportedModelError(ModelError, ValueError):
    """The checkpoint's ``model_type`` has no registered family."""


class SpanRangeError(ModelError, ValueError):
    """A requested block range does not fit in the model."""


class CheckpointError(ModelError):
    """A checkpoint folder is malformed (bad index, missing tensors)."""


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs is not on disk; ``filename`` names it."""

    def __init__(self, message: str, *, filename: str):
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:  # FileNotFoundError would otherwise print errno-style noise
        return self.args[0]


class CacheError(ModelError, ValueError):
    """A KV cache does not fit the span or the step (overflow, wrong batch, wrong span)."""
