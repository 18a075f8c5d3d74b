"""The project's error classes: a mistake the user can fix, reported in one line (exit code 2).

Every other exception is a bug or an environment failure (CUDA out of memory, NCCL, a plain bug) and keeps
its traceback. The subclasses also derive from the builtin a caller would expect, so ``except
FileNotFoundError`` still catches a missing input.
"""
from __future__ import annotations

EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the user's config, data or work directory; the message says what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user pointed at (or an earlier stage should have written) is not there."""


class InvalidInputError(UserError, ValueError):
    """A config value, data file or folder holds something this stage cannot use."""


class ProvenanceError(UserError, RuntimeError):
    """A folder holds outputs of another configuration or of other inputs than the ones asked for."""


class ExistingOutputError(UserError, FileExistsError):
    """An output already exists and holds something else; replacing it needs the user's word."""


class IncompatibleInputError(UserError, RuntimeError):
    """A file is there but does not fit (weights of another network, a corrupt checkpoint)."""
