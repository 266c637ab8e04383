"""Typed exceptions of rys-forge.

The library raises these; the CLI maps them to one line on stderr and an exit code
(2 for usage errors, 1 for failures). Messages name the bad value and what is allowed.
"""

from __future__ import annotations


class RysForgeError(Exception):
    """Base class of every error rys-forge raises on purpose."""

    exit_code = 1


class UsageError(RysForgeError):
    """The user asked for something invalid (bad window, unknown probe, bad option)."""

    exit_code = 2


class WindowError(UsageError):
    """A window or layer plan does not fit the model."""


class UnsupportedArchitectureError(UsageError):
    """The model's `model_type` is not in the architecture table."""


class ModelLoadError(RysForgeError):
    """A model could not be found or loaded."""


class PromptError(UsageError):
    """A prompt file is missing, empty or malformed."""


class VerificationError(RysForgeError):
    """An exported checkpoint does not match the in-memory repeat."""


class TaskError(UsageError):
    """An evaluation task is unknown or its data is missing."""


class EvaluationError(RysForgeError):
    """lm-eval failed while running a model on the tasks (out of memory, a model error, ...)."""


class MergekitExportError(RysForgeError):
    """mergekit failed, or its output is not the checkpoint the plan describes."""
