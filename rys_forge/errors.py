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


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, plus the first line of a chained cause (transformers'
    config validation puts the useful text there): the one-line form of a library error."""

    def line(e: BaseException) -> str:
        text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
        return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

    head, cause = line(exc), exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in head:
        head += f" ({line(cause)})"
    return head
