"""Every error acteng raises on purpose.

Each message names the problem, the value seen and the fix. Every class derives from
`ActengError` and from the builtin it refines, so `except ValueError` keeps working::

    ActengError
    ├── ConfigError            (ValueError)   a bad argument: layer, coefficient, mode, position
    │   └── RequestError                      a bad field of a JSON request (HTTP body, vLLM
    │                                         extra_args, a JSON SteeringSpec); has param, status
    ├── DataError              (ValueError)   a malformed or empty dataset, with file and line
    ├── InputTooLongError      (ValueError)   a text longer than the model's context
    ├── VectorFileError        (ValueError)   a vector file that is truncated, foreign or invalid
    ├── IncompatibleVectorError(ValueError)   a vector made for a model of another shape
    ├── ModelLoadError         (OSError)      a model source that cannot be found or read
    ├── LayoutError            (LookupError)  a model whose blocks / norm / unembedding are missing
    ├── LibraryError           (LookupError)  a library entry that is missing, taken or broken
    ├── UnsupportedError       (NotImplementedError)  a valid request this model family cannot do
    ├── MissingExtraError      (ImportError)  an optional dependency that is not installed
    ├── EngineBusy             (RuntimeError) a full request queue: retry later (HTTP 503)
    └── TrainingError          (RuntimeError) training that diverged (NaN loss); the last good
                                              checkpoint is kept
"""

from __future__ import annotations

__all__ = [
    "ActengError",
    "ConfigError",
    "DataError",
    "EngineBusy",
    "IncompatibleVectorError",
    "InputTooLongError",
    "LayoutError",
    "LibraryError",
    "MissingExtraError",
    "ModelLoadError",
    "RequestError",
    "TrainingError",
    "UnsupportedError",
    "VectorFileError",
]


class ActengError(Exception):
    """Root of every error acteng raises deliberately."""


class ConfigError(ActengError, ValueError):
    """An argument value is invalid (unknown layer, NaN coefficient, unknown mode...)."""


class RequestError(ConfigError):
    """A field of a JSON request that will not be run: an HTTP body, vLLM ``extra_args``
    or a JSON `SteeringSpec`. `param` names the field (``steering[1].coefficient``),
    `status` is the HTTP code the server answers with."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class DataError(ActengError, ValueError):
    """A dataset is malformed or empty; the message names the file and line."""


class InputTooLongError(ActengError, ValueError):
    """A text has more tokens than the model's context window."""


class VectorFileError(ActengError, ValueError):
    """A vector file cannot be read: truncated, foreign format, bad tensors or metadata."""


class IncompatibleVectorError(ActengError, ValueError):
    """A vector does not fit the model (width or layer count differ)."""


class ModelLoadError(ActengError, OSError):
    """A model source cannot be found or loaded."""


class LayoutError(ActengError, LookupError):
    """The blocks, final norm or unembedding of a model could not be located."""


class LibraryError(ActengError, LookupError):
    """A library entry is missing, already exists, or is broken."""


class UnsupportedError(ActengError, NotImplementedError):
    """The request is valid but not possible for this model family."""


class MissingExtraError(ActengError, ImportError):
    """An optional dependency is missing; the message gives the exact install line."""


class EngineBusy(ActengError, RuntimeError):
    """The serving engine's request queue is full; the client should retry later (HTTP 503)."""


class TrainingError(ActengError, RuntimeError):
    """Training stopped because a loss became non-finite or diverged; `checkpoint` is the
    adapter folder of the last step with a sane loss (None when no step gave one)."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def missing_extra(package: str, extra: str, *, purpose: str) -> MissingExtraError:
    """Build the error for a missing optional dependency, naming the install line."""
    return MissingExtraError(
        f"{purpose} needs the package {package!r}, which is not installed; "
        f"install it with: pip install 'acteng[{extra}]'"
    )
