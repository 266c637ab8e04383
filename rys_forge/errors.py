"""Typed exceptions of rys-forge.

The library raises these; the CLI maps them to one line on stderr and an exit code
(2 for usage errors, 1 for failures). Messages name the bad value and what is allowed.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


class OutputError(UsageError):
    """An output location cannot be written (a read-only or missing folder, a file where a folder is needed);
    raised before any work starts."""


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) delivered as an exception in the main thread, so that every
    cleanup written for Ctrl-C (temporary folders, "finished windows are kept") runs for it too.

    Attributes:
        signum: the signal's number; the process exits with 128 + signum.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, plus the first line of a chained cause (transformers'
    config validation puts the useful text there): the one-line form of a library error, credentials
    redacted (see `redact`)."""

    def line(e: BaseException) -> str:
        text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
        return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

    head, cause = line(exc), exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in head:
        head += f" ({line(cause)})"
    return redact(head)


#: `scheme://user:password@host`: the userinfo of a URL (credentials in `HF_ENDPOINT`, a proxy URL, ...).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
#: A Hugging Face access token.
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str) -> str:
    """`text` without credentials: the userinfo of every URL (`https://user:token@host` ->
    `https://***@host`) and anything shaped like a Hugging Face token (`hf_...` -> `hf_***`)."""
    return _HF_TOKEN.sub("hf_***", _URL_USERINFO.sub(r"\g<scheme>***@", text))


#: What to do about a file-system error, by errno (the message names the file in front).
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space and run the command again",
    errno.EDQUOT: "disk quota exceeded; free some space and run the command again",
    errno.EFBIG: "file too large for this file system (or the file-size limit); write it elsewhere",
    errno.EACCES: "permission denied; choose a location you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a location you can write to (or fix its permissions)",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder where a file is needed; choose another path",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "folder not empty",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run the command again",
    errno.EIO: "input/output error (a failing disk or network file system); check the device",
}


def os_error_errno(exc: BaseException) -> int | None:
    """The errno of a file-system failure: an `OSError` itself, one in the chain of causes, or the
    `(os error N)` that Rust-based libraries (safetensors, tokenizers) put into their messages."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        found = re.search(r"\(os error (\d+)\)", str(current))
        if found:
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def os_error_message(exc: BaseException, path: object = None) -> str:
    """One line for a file-system failure: the file(s) it concerns (`path` if given, else the ones the error
    names) and what to do, e.g.
    `/data/out/model.safetensors: no space left on the device; free some space and run the command again`."""
    code = os_error_errno(exc)
    oserror = exc if isinstance(exc, OSError) else None
    cause: BaseException | None = exc
    while oserror is None and cause is not None:  # the OSError in the chain carries the file name
        cause = cause.__cause__ or cause.__context__
        oserror = cause if isinstance(cause, OSError) else None
    names = [str(n) for n in (getattr(oserror, "filename", None), getattr(oserror, "filename2", None)) if n]
    names = [str(path)] if path is not None else names
    strerror = getattr(oserror, "strerror", None) or first_line(exc)
    advice = _OS_ERROR_ADVICE.get(code, strerror) if code is not None else strerror
    return f"{' -> '.join(names)}: {advice}" if names else advice


def output_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why an output could not be written later (None: it can), found before any work starts.

    `path` is a folder to create or write into (`folder=True`) or a file. A file must not be a folder and
    a folder must not be a file; the folder itself, or the nearest existing folder above it (under which
    the write creates the rest), must take a new file. That is tried for real: a temporary file is
    created there and removed at once (permissions, read-only mounts and ACLs all show), and nothing is
    left that did not exist.
    """
    path = Path(path).expanduser().absolute()
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file where a folder is needed; choose another path"
    if not folder and path.is_dir():
        return f"{path} is a folder where a file is needed; choose another path"
    place = path if folder and path.is_dir() else path.parent
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    if not place.is_dir():
        return f"{place} is a file, not a folder; choose another path"
    try:
        handle, name = tempfile.mkstemp(prefix=".rys-forge-write-check-", dir=place)
    except OSError as exc:
        return os_error_message(exc, path=place)
    os.close(handle)
    os.unlink(name)
    return None


@contextmanager
def well_formed(path: str | Path, what: str) -> Iterator[None]:
    """Reading a rys-forge JSON file whose values a person may have edited (`what`, e.g. "an evaluation report"):
    a value of the wrong type (a list where an object belongs, text where a number belongs) raises UsageError
    naming the file, not a traceback."""
    try:
        yield
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise UsageError(f"{path} is not {what} as rys-forge writes it ({type(exc).__name__}: {first_line(exc)});"
                         " write it again with the command that made it") from None
