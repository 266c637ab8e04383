"""Offline lm-evaluation-harness tasks shipped with rys-forge.

rys-forge ships seven benchmarks as local lm-eval tasks (``rys_arc_easy``, ``rys_arc_challenge``,
``rys_hellaswag``, ``rys_piqa``, ``rys_openbookqa``, ``rys_gsm8k``, ``rys_lambada_openai``) plus the group
``rys_suite`` (every one of them except the slow, generative ``rys_gsm8k``). Their YAMLs in
``rys_forge/evaluate/lm_eval_tasks/`` copy lm-eval's own task definitions (prompts, choices, targets, metrics,
HellaSwag's preprocessing) and only swap the Hugging Face hub dataset for a JSONL file shipped in
``rys_forge/evaluate/lm_eval_tasks/data/`` (``dataset_path: json``); see ``docs/DATA.md`` for sources and licences.

Relative data paths: lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` unchanged,
and ``datasets`` resolves relative paths against the current working directory, not against the YAML.
The shipped YAMLs are therefore templates (their ``data_files`` are relative to the template folder) and
:func:`local_task_dir` materialises a folder of small wrapper YAMLs, one per template, each of the form::

    include: /abs/path/to/rys_forge/evaluate/lm_eval_tasks/rys_piqa.yaml
    dataset_kwargs:
      data_files:
        validation: /abs/path/to/rys_forge/evaluate/lm_eval_tasks/data/piqa_validation.jsonl

``include`` is lm-eval's own inheritance mechanism: every key comes from the template (whose
``!function`` references keep resolving next to the template) and only ``dataset_kwargs`` is replaced by the
absolute version. The folder lives in the user cache (``$RYS_FORGE_CACHE``, else
``$XDG_CACHE_HOME/rys-forge``, else ``~/.cache/rys-forge``; the system temp folder if that is not
writable), under a name derived from its content, so it works from any working directory, from a
read-only installed wheel, and is rebuilt automatically whenever the package moves or its templates change.

Typical use::

    from rys_forge.evaluate.local_tasks import resolve_tasks, task_manager
    from rys_forge.evaluate.runner import offline_env

    manager = task_manager()
    names = resolve_tasks(["rys_suite"], manager)
    with offline_env():
        loaded = manager.load(names)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rys_forge.errors import TaskError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR",
    "LOCAL_TASKS",
    "LOCAL_TASK_NAMES",
    "SUITE_GROUP",
    "TEMPLATE_DIR",
    "local_task_dir",
    "resolve_tasks",
    "task_data_files",
    "task_manager",
]

#: Individual local tasks, in the order they are documented.
LOCAL_TASK_NAMES: tuple[str, ...] = (
    "rys_arc_easy",
    "rys_arc_challenge",
    "rys_hellaswag",
    "rys_piqa",
    "rys_openbookqa",
    "rys_gsm8k",
    "rys_gsm8k_ll",
    "rys_lambada_openai",
)
#: The group of the log-likelihood tasks (all local tasks except ``rys_gsm8k``).
SUITE_GROUP = "rys_suite"
#: Every name rys-forge adds to lm-eval's registry: the tasks, then the group.
LOCAL_TASKS: tuple[str, ...] = (*LOCAL_TASK_NAMES, SUITE_GROUP)

#: Folder of the shipped YAML templates (and of ``hellaswag_utils.py``).
TEMPLATE_DIR: Path = Path(__file__).resolve().parent / "lm_eval_tasks"
#: Folder of the shipped JSONL data.
DATA_DIR: Path = TEMPLATE_DIR / "data"
#: Environment variable that overrides the cache root of the materialised task folder.
CACHE_DIR_ENV = "RYS_FORGE_CACHE"  # the one cache variable of rys-forge (models.cache_dir)

# Bump when the layout of the materialised folder changes (part of its content hash).
_FORMAT_VERSION = "1"
_GLOB_CHARS = frozenset("*?[")


class _TemplateLoader(yaml.SafeLoader):
    """YAML loader that reads lm-eval templates without importing their ``!function`` targets."""


def _function_as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_TemplateLoader.add_constructor("!function", _function_as_text)


# --------------------------------------------------------------------------- materialisation


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Return the folder that holds materialised task folders (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from rys_forge.models import cache_dir as rys_cache_dir

    return rys_cache_dir()


def _absolute_data_path(relative: str, data_dir: Path | None) -> str:
    """Turn one ``data_files`` entry of a template into an absolute path.

    Template paths are relative to :data:`TEMPLATE_DIR`; with ``data_dir`` given, the leading ``data/``
    folder is replaced by ``data_dir``. URLs and absolute paths are kept.
    """
    if "://" in relative:
        return relative
    path = Path(relative).expanduser()
    if path.is_absolute():
        return str(path)
    if data_dir is not None and path.parts and path.parts[0] == "data":
        return str((Path(data_dir).expanduser() / Path(*path.parts[1:])).resolve())
    return str((TEMPLATE_DIR / path).resolve())


def _absolute_data_files(data_files: Any, data_dir: Path | None) -> Any:
    """Map :func:`_absolute_data_path` over a ``data_files`` value (str, list or split->str/list dict)."""
    if isinstance(data_files, str):
        return _absolute_data_path(data_files, data_dir)
    if isinstance(data_files, list):
        return [_absolute_data_files(item, data_dir) for item in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(value, data_dir) for split, value in data_files.items()}
    raise TaskError(
        f"unsupported data_files value {data_files!r} in a template under {TEMPLATE_DIR}; "
        "allowed: a path, a list of paths or a mapping split -> path(s)"
    )


def _wrapper_yaml(template: Path, data_dir: Path | None) -> str:
    """Return the text of the wrapper YAML that includes ``template`` with absolute data paths."""
    try:
        cfg = yaml.load(template.read_text(encoding="utf-8"), Loader=_TemplateLoader)  # noqa: S506
    except (OSError, yaml.YAMLError) as err:
        raise TaskError(f"cannot read task template {template}: {err}") from err
    if not isinstance(cfg, dict):
        raise TaskError(f"task template {template} is not a YAML mapping")
    wrapper: dict[str, Any] = {"include": str(template.resolve())}
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        # `include` merges top-level keys only, so the whole dataset_kwargs mapping is restated.
        wrapper["dataset_kwargs"] = {
            **kwargs,
            "data_files": _absolute_data_files(kwargs["data_files"], data_dir),
        }
    header = (
        f"# Generated by rys_forge.local_tasks from {template.name}; regenerated on demand, do not edit.\n"
        "# It includes the shipped template and makes its data_files absolute (lm-eval would resolve\n"
        "# relative data_files against the current working directory).\n"
    )
    return header + yaml.safe_dump(wrapper, sort_keys=False, allow_unicode=True)


def _folder_is_complete(folder: Path, files: dict[str, str]) -> bool:
    """Whether ``folder`` holds exactly the expected YAML files with the expected content."""
    try:
        present = {p.name for p in folder.glob("*.yaml")}
        if present != set(files):
            return False
        return all((folder / name).read_text(encoding="utf-8") == text for name, text in files.items())
    except OSError:
        return False


def _write_folder(root: Path, name: str, files: dict[str, str]) -> Path:
    """Atomically create ``root/name`` holding ``files``; reuse it when another process made it first."""
    final = root / name
    if _folder_is_complete(final, files):
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        for file_name, text in files.items():
            (staging / file_name).write_text(text, encoding="utf-8")
        for _attempt in range(3):
            try:
                os.rename(staging, final)
                return final
            except OSError:
                # Another process won the race (or a broken folder is in the way).
                if _folder_is_complete(final, files):
                    return final
                # Move the broken folder aside, then retry; only a directory we own gets deleted.
                aside = root / f".{name}.{uuid.uuid4().hex}.stale"
                with contextlib.suppress(OSError):
                    os.rename(final, aside)
                    shutil.rmtree(aside, ignore_errors=True)
        if _folder_is_complete(final, files):
            return final
        raise OSError(f"could not create {final}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def local_task_dir(
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return a folder, usable as lm-eval ``include_path``, that defines the local tasks.

    The folder holds one wrapper YAML per shipped template (see the module docstring); the data files
    themselves are not copied. The call is idempotent and safe when several processes make the folder at
    once: the folder name is a hash of its content, it is written to a temporary sibling and renamed into
    place, and a folder that already holds the right content is reused.

    Args:
        data_dir: Folder to read the JSONL files from instead of the shipped ``lm_eval_tasks/data``
            (same file names). Mostly for tests and for users with their own copies of the data.
        cache_dir: Root folder for the materialised folders. Defaults to ``$RYS_FORGE_CACHE``, else
            ``$XDG_CACHE_HOME/rys-forge``, else ``~/.cache/rys-forge``; when that is not writable, a
            ``rys-forge-<user>`` folder in the system temp folder.

    Returns:
        Absolute path of the materialised folder.

    Raises:
        TaskError: The shipped templates are missing or unreadable, or no writable folder was found.
    """
    templates = sorted(TEMPLATE_DIR.glob("*.yaml"))
    if not templates:
        raise TaskError(f"no task templates (*.yaml) found in {TEMPLATE_DIR}; reinstall rys-forge")
    resolved_data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
    files = {template.name: _wrapper_yaml(template, resolved_data_dir) for template in templates}

    digest = hashlib.sha256(_FORMAT_VERSION.encode())
    for file_name, text in sorted(files.items()):
        digest.update(f"\0{file_name}\0{text}".encode())
    name = f"tasks-{digest.hexdigest()[:16]}"

    roots = [_cache_root(cache_dir) / "lm_eval_tasks"]
    if cache_dir is None:
        user = os.environ.get("USER") or os.environ.get("USERNAME") or str(getattr(os, "getuid", lambda: 0)())
        roots.append(Path(tempfile.gettempdir()) / f"rys-forge-{user}" / "lm_eval_tasks")
    errors: list[str] = []
    for root in roots:
        try:
            return _write_folder(root, name, files)
        except OSError as err:
            errors.append(f"{root}: {err}")
    raise TaskError(
        "cannot write the local lm-eval task folder (" + "; ".join(errors) + f"); set {CACHE_DIR_ENV} "
        "to a writable folder"
    )


# --------------------------------------------------------------------------- task manager


def _as_path_list(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if include_path is None:
        return []
    if isinstance(include_path, (str, Path)):
        items: Iterable[str | Path] = [include_path]
    else:
        items = include_path
    paths: list[Path] = []
    for item in items:
        # lm-eval's own CLI accepts "dir1:dir2"; honour the same form for plain strings.
        parts = str(item).split(os.pathsep) if isinstance(item, str) else [str(item)]
        paths.extend(Path(part).expanduser() for part in parts if part)
    return paths


def task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None,
    *,
    include_defaults: bool = True,
    data_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> TaskManager:
    """Build an lm-eval ``TaskManager`` that knows the local tasks and lm-eval's built-in ones.

    Args:
        include_path: Extra folder(s) of the user's own lm-eval task YAMLs (a path, a
            ``os.pathsep``-separated string, or a sequence). They are indexed after the local tasks, so a
            user task of the same name wins (lm-eval logs a warning).
        include_defaults: Also index lm-eval's built-in tasks (``hellaswag``, ``leaderboard``, ...).
            Indexing them takes several seconds; pass ``False`` when only local tasks are needed.
        data_dir: Forwarded to :func:`local_task_dir`.
        metadata: Forwarded to ``TaskManager(metadata=...)`` (extra metadata attached to every task).

    Returns:
        The task manager.

    Raises:
        TaskError: An include path does not exist or is not a folder, or the local folder cannot be made.
    """
    from lm_eval.tasks import TaskManager

    paths = [local_task_dir(data_dir=data_dir)]
    for path in _as_path_list(include_path):
        if not path.is_dir():
            raise TaskError(
                f"include path {path} is not an existing folder; pass a folder of lm-eval task YAML files"
            )
        paths.append(path.resolve())
    return TaskManager(
        include_path=[str(path) for path in paths],
        include_defaults=include_defaults,
        metadata=metadata,
    )


# --------------------------------------------------------------------------- validation


def _local_paths(data_files: Any) -> Iterator[str]:
    """Yield the plain local paths in a ``data_files`` value (skipping URLs and glob patterns)."""
    if isinstance(data_files, str):
        if "://" not in data_files and not _GLOB_CHARS.intersection(data_files):
            yield data_files
    elif isinstance(data_files, (list, tuple)):
        for item in data_files:
            yield from _local_paths(item)
    elif isinstance(data_files, dict):
        for value in data_files.values():
            yield from _local_paths(value)


def _member_names(cfg: dict[str, Any]) -> list[str]:
    """Names of the members listed under a group config's ``task`` key."""
    members = cfg.get("task")
    if isinstance(members, (str, dict)):
        members = [members]
    names: list[str] = []
    for member in members or []:
        if isinstance(member, str):
            names.append(member)
        elif isinstance(member, dict):
            name = member.get("group") or member.get("task")
            if isinstance(name, str):
                names.append(name)
    return names


def _walk_data_files(name: str, manager: TaskManager, seen: set[str]) -> Iterator[tuple[str, Path]]:
    """Yield ``(task, path)`` for every local data file that ``name`` (a task, group or tag) reads."""
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return
    kind = entry.kind.name
    cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
    if kind == "TAG":
        for member in sorted(entry.tags):
            yield from _walk_data_files(member, manager, seen)
    elif kind == "GROUP":
        for member in _member_names(cfg):
            yield from _walk_data_files(member, manager, seen)
    else:
        kwargs = cfg.get("dataset_kwargs")
        if isinstance(kwargs, dict):
            for raw in _local_paths(kwargs.get("data_files")):
                # Relative paths are what datasets resolves against the working directory.
                yield name, Path(raw).expanduser()


def task_data_files(name: str, manager: TaskManager) -> list[Path]:
    """List the local data files a task, group or tag reads (through ``dataset_kwargs.data_files``).

    Args:
        name: A name registered in ``manager``.
        manager: The task manager (see :func:`task_manager`).

    Returns:
        The paths, in discovery order, without duplicates; empty for hub-backed tasks and unknown names.
    """
    paths: list[Path] = []
    for _task, path in _walk_data_files(name, manager, set()):
        if path not in paths:
            paths.append(path)
    return paths


def _unknown_task_message(name: str, manager: TaskManager) -> str:
    close = difflib.get_close_matches(name, [*LOCAL_TASKS, *manager.all_tasks], n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
    return (
        f"unknown task {name!r}: local (offline) tasks are {', '.join(LOCAL_TASKS)}; any task, group or tag "
        f"name of lm-eval's registry (e.g. hellaswag, mmlu, leaderboard; list them with `lm-eval ls tasks`) "
        f"or a task YAML file is accepted too{hint}"
    )


def resolve_tasks(names: str | Sequence[str], manager: TaskManager) -> list[str]:
    """Validate task names before an evaluation and return them in lm-eval's form.

    Each entry may be a registered task, group or tag name (local or lm-eval's), a comma-separated list
    of them, a glob pattern over registered names (``rys_arc_*``), or the path of a task YAML file.
    Duplicates are dropped, order is kept. Local data files of every named task (group members included)
    must exist; hub-backed tasks are not checked here (they need network access when loaded).

    Args:
        names: The requested names.
        manager: The task manager to resolve against (see :func:`task_manager`).

    Returns:
        The validated names, with patterns expanded.

    Raises:
        TaskError: No names were given, a name is unknown, or a local data file is missing.
    """
    if isinstance(names, str):
        names = [names]
    requested = [part.strip() for item in names for part in str(item).split(",") if part.strip()]
    if not requested:
        raise TaskError(
            f"no tasks given; pass task names such as {SUITE_GROUP} (offline) or any lm-eval task name"
        )
    known = set(manager.all_tasks)
    resolved: list[str] = []
    for name in requested:
        if name in known:
            matches = [name]
        elif _GLOB_CHARS.intersection(name) and (found := manager.match_tasks([name])):
            matches = list(found)
        elif name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
            matches = [name]
        else:
            raise TaskError(_unknown_task_message(name, manager))
        for match in matches:
            for task, path in _walk_data_files(match, manager, set()):
                if not path.is_file():
                    via = "" if task == match else f" (in {match!r})"
                    raise TaskError(
                        f"task {task!r}{via} needs data file {path}, which does not exist; reinstall "
                        "rys-forge (its lm_eval_tasks/data/ folder ships the data) or restore the file"
                    )
            if match not in resolved:
                resolved.append(match)
    return resolved
