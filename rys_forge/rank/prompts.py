"""Prompt sets whose residual stream rys-forge caches and compares across layers.

Five families ship inside the package, one JSON Lines file each under
``rys_forge/rank/prompt_sets/<family>.jsonl``:

* ``math``: arithmetic, algebra, geometry and probability questions and word problems;
* ``reasoning``: logic puzzles, philosophy and ethics questions, causal and commonsense reasoning;
* ``code``: short snippets and programming questions in Python, JavaScript, C, SQL, Rust and shell;
* ``multilingual``: prose and questions in twelve languages and seven scripts;
* ``prose``: encyclopaedic, narrative, news-style and everyday English prose.

Every shipped line is an object with ``id`` (``<family>-NNN``), ``family`` and ``text``, plus
``source`` (where the text comes from and its licence) and, for some families, ``lang``
(multilingual: ISO 639-1 code) or ``subset`` (code: programming language; prose: style).
The files are fixed data: nothing is generated or shuffled at run time, so the same call
always returns the same prompts in the same order. See ``docs/PROMPTS.md``.

Users can pass their own file instead (``--prompts FILE`` on the command line):

* ``.txt``: one prompt per non-empty line (each line stripped); the family is the file stem;
* ``.jsonl``: one JSON object per line with a ``text`` (or ``prompt``) field and optional
  ``family`` (default: the file stem) and ``id`` (default: ``<family>-NNN``, numbered within
  the family from 001).

Problems with a prompt file or a family name raise :class:`rys_forge.errors.PromptError`
with a one-line message that names the file, line or value and what is allowed.

Example::

    from rys_forge.rank.prompts import load_prompts

    prompts = load_prompts(["math", "code"], limit_per_family=16)
    texts = [p.text for p in prompts]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from rys_forge.errors import PromptError

__all__ = ["DEFAULT_FAMILIES", "DEFAULT_PER_FAMILY", "Prompt", "available_families", "load_prompts", "per_family_limit"]

#: Shipped families in the order :func:`load_prompts` concatenates them by default.
DEFAULT_FAMILIES: tuple[str, ...] = ("math", "reasoning", "code", "multilingual", "prose")

#: Prompts `rank` takes from each shipped family when the user sets no ``--prompts-per-family``. A user's
#: ``--prompts`` file is used whole unless a limit is given (see :func:`per_family_limit`).
DEFAULT_PER_FAMILY = 8

#: File suffixes accepted for a user prompt file (compared case-insensitively).
PROMPT_FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")

_PACKAGE = __package__ or "rys_forge"
_DATA_DIR = "prompt_sets"
_TEXT_KEYS = ("text", "prompt")


@dataclass(frozen=True)
class Prompt:
    """One prompt fed to the model as context.

    Attributes:
        id: Identifier unique within one loaded set, e.g. ``"math-007"``.
        family: Family the prompt belongs to, e.g. ``"math"`` or a user file's stem.
        text: The text itself, exactly as stored (``.txt`` lines are stripped).
    """

    id: str
    family: str
    text: str


def _shipped_dir() -> Any:
    """Return the package's prompt-data directory as an ``importlib.resources`` Traversable."""
    return resources.files(_PACKAGE).joinpath(_DATA_DIR)


def available_families() -> list[str]:
    """List the prompt families shipped with the package.

    The list is read from the ``rys_forge/rank/prompt_sets/*.jsonl`` files through
    ``importlib.resources``, so it also works from an installed wheel or zip.

    Returns:
        The family names, sorted alphabetically.
    """
    return list(_available_families())


@lru_cache(maxsize=1)
def _available_families() -> tuple[str, ...]:
    data_dir = _shipped_dir()
    if not data_dir.is_dir():
        return ()
    names = [
        entry.name[: -len(".jsonl")]
        for entry in data_dir.iterdir()
        if entry.name.endswith(".jsonl") and entry.is_file()
    ]
    return tuple(sorted(names))


def per_family_limit(path: str | os.PathLike[str] | None, requested: int | None) -> int | None:
    """The per-family limit of a run: ``requested`` when the user gave one; else :data:`DEFAULT_PER_FAMILY`
    of each shipped family, and a user's file (``path``) whole: a file the user wrote is never cut silently."""
    if requested is not None:
        return requested
    return None if path is not None else DEFAULT_PER_FAMILY


def load_prompts(
    families: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    limit_per_family: int | None = None,
) -> list[Prompt]:
    """Load shipped prompt families, or the prompts of a user file.

    Shipped sets (``path`` is None): the requested families are *concatenated* in the
    order given (default :data:`DEFAULT_FAMILIES`, i.e. math, reasoning, code,
    multilingual, prose), each in its file order. A repeated name is loaded once.

    User file (``path`` given): ``.txt`` or ``.jsonl`` as described in the module
    docstring. Without ``families`` the prompts keep the file's order; with
    ``families`` only those families of the file are kept, concatenated in the order
    given.

    In both cases ``limit_per_family`` keeps the first N prompts of each family in
    stored order. The shipped files are ordered so that any prefix mixes their
    sub-topics (programming languages, natural languages, prose styles), so a limit
    still gives a varied sample. The result is fully deterministic.

    Args:
        families: Family names to load; a single string is taken as one name.
            None means all (shipped: :data:`DEFAULT_FAMILIES`; file: every family in it).
        path: A user ``.txt`` or ``.jsonl`` prompt file instead of the shipped sets.
        limit_per_family: Keep at most this many prompts per family (an integer >= 1);
            None keeps all.

    Returns:
        The prompts, in the order described above.

    Raises:
        PromptError: The file is missing, not a file, has an unsupported extension, is
            not UTF-8, holds no prompts, or has a malformed line (bad JSON, no text
            field, bad or duplicate id); a family name is unknown; no family was
            selected; or ``limit_per_family`` is not an integer >= 1.
    """
    limit = _check_limit(limit_per_family)
    wanted = _normalise_families(families)

    if path is None:
        known = available_families()
        selected = list(DEFAULT_FAMILIES) if wanted is None else wanted
        for name in selected:
            if name not in known:
                raise PromptError(
                    f"unknown prompt family {name!r}; known families: {', '.join(known) or '(none shipped)'}"
                )
        prompts: list[Prompt] = []
        for name in selected:
            prompts.extend(_load_shipped(name)[:limit])
        return prompts

    loaded = _load_user_file(path)
    file_families = list(dict.fromkeys(p.family for p in loaded))
    if wanted is None:
        selected_set = set(file_families)
        ordered = loaded
    else:
        for name in wanted:
            if name not in file_families:
                raise PromptError(
                    f"unknown prompt family {name!r} in {os.fspath(path)}; "
                    f"families in that file: {', '.join(file_families)}"
                )
        selected_set = set(wanted)
        ordered = [p for name in wanted for p in loaded if p.family == name]
    return _apply_limit((p for p in ordered if p.family in selected_set), limit)


def _check_limit(limit: int | None) -> int | None:
    """Validate ``limit_per_family`` and return it."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise PromptError(f"limit_per_family must be an integer >= 1, got {limit!r}")
    return limit


def _normalise_families(families: Sequence[str] | str | None) -> list[str] | None:
    """Turn the ``families`` argument into a de-duplicated list (None stays None)."""
    if families is None:
        return None
    if isinstance(families, str):
        families = [families]
    names: list[str] = []
    for name in families:
        if not isinstance(name, str) or not name.strip():
            raise PromptError(f"prompt family names must be non-empty strings, got {name!r}")
        name = name.strip()
        if name not in names:
            names.append(name)
    if not names:
        known = ", ".join(available_families())
        raise PromptError(f"no prompt families selected; known families: {known}")
    return names


def _apply_limit(prompts: Iterable[Prompt], limit: int | None) -> list[Prompt]:
    """Keep the first ``limit`` prompts of each family, preserving order."""
    if limit is None:
        return list(prompts)
    seen: dict[str, int] = {}
    kept: list[Prompt] = []
    for prompt in prompts:
        count = seen.get(prompt.family, 0)
        if count < limit:
            kept.append(prompt)
            seen[prompt.family] = count + 1
    return kept


@lru_cache(maxsize=None)
def _load_shipped(family: str) -> tuple[Prompt, ...]:
    """Parse one shipped family file (cached; the data never changes at run time)."""
    resource = _shipped_dir().joinpath(f"{family}.jsonl")
    label = f"{_PACKAGE}/{_DATA_DIR}/{family}.jsonl"
    if not resource.is_file():
        raise PromptError(f"shipped prompt set {label} is missing from the installed package")
    prompts = _parse_jsonl(resource.read_text(encoding="utf-8"), label, default_family=family)
    if not prompts:
        raise PromptError(f"shipped prompt set {label} holds no prompts")
    return tuple(prompts)


def _load_user_file(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read and parse a user ``.txt`` or ``.jsonl`` prompt file."""
    file = Path(os.fspath(path)).expanduser()
    shown = os.fspath(path)
    if not file.exists():
        raise PromptError(f"prompt file not found: {shown}")
    if not file.is_file():
        raise PromptError(f"prompt file {shown} is not a regular file; pass a .txt or .jsonl file")
    suffix = file.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptError(
            f"prompt file {shown} has unsupported extension {file.suffix or '(none)'!r}; "
            f"allowed: {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file {shown} is not valid UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {shown}: {exc.strerror or exc}") from None

    family = file.stem
    if suffix == ".txt":
        prompts = _parse_txt(content, family)
    else:
        prompts = _parse_jsonl(content, shown, default_family=family)
    if not prompts:
        raise PromptError(f"prompt file {shown} holds no prompts (it is empty or has only blank lines)")
    return prompts


def _parse_txt(content: str, family: str) -> list[Prompt]:
    """One prompt per non-empty line, stripped; ids ``<family>-001``, ``-002``, ..."""
    texts = [line.strip() for line in content.splitlines()]
    texts = [t for t in texts if t]
    return [Prompt(id=f"{family}-{n:03d}", family=family, text=t) for n, t in enumerate(texts, 1)]


def _parse_jsonl(content: str, label: str, default_family: str) -> list[Prompt]:
    """Parse JSON Lines prompt records; blank lines are skipped.

    Args:
        content: The whole file as text.
        label: How to name the file in error messages.
        default_family: Family for records without a ``family`` field.

    Returns:
        The prompts in file order.

    Raises:
        PromptError: A line is not a JSON object, lacks a non-empty ``text``/``prompt``
            string, has a bad ``family`` or ``id``, or repeats an id.
    """
    prompts: list[Prompt] = []
    ids_seen: dict[str, int] = {}
    per_family: dict[str, int] = {}
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{label}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PromptError(
                f"{label}: line {lineno} must be a JSON object with a 'text' field, got {type(record).__name__}"
            )
        key = next((k for k in _TEXT_KEYS if k in record), None)
        if key is None:
            raise PromptError(f"{label}: line {lineno} has no 'text' (or 'prompt') field")
        text = record[key]
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{label}: line {lineno}: '{key}' must be a non-empty string")

        family = record.get("family", default_family)
        if not isinstance(family, str) or not family.strip():
            raise PromptError(f"{label}: line {lineno}: 'family' must be a non-empty string, got {family!r}")
        family = family.strip()
        per_family[family] = per_family.get(family, 0) + 1

        raw_id = record.get("id")
        if raw_id is None:
            prompt_id = f"{family}-{per_family[family]:03d}"
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
            prompt_id = str(raw_id).strip()
        else:
            raise PromptError(f"{label}: line {lineno}: 'id' must be a non-empty string or integer, got {raw_id!r}")
        if prompt_id in ids_seen:
            raise PromptError(
                f"{label}: line {lineno}: duplicate id {prompt_id!r} (first used on line {ids_seen[prompt_id]})"
            )
        ids_seen[prompt_id] = lineno
        prompts.append(Prompt(id=prompt_id, family=family, text=text))
    return prompts
