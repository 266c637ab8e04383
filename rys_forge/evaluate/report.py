"""The evaluation report: :class:`EvalReport`, its ``eval.json`` file and its terminal table.

Also the one place for number formatting in printed text (:func:`format_number`, :func:`format_p`,
:func:`format_significant`): tables, verdicts and summaries of ``eval``, ``validate`` and ``calibrate``.

``eval.json`` is written atomically (temporary sibling + ``os.replace``); a report saved to several places
(``--out`` and the export folder) is staged in full before any file is renamed into place. Where it will go is
checked before any work (:func:`check_writable`), so an unwritable ``--out`` fails in a second, not after
the whole evaluation.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rys_forge.artifacts import EVAL_FILE
from rys_forge.errors import OutputError, RysForgeError, os_error_message, output_problem
from rys_forge.files import json_marker, json_safe
from rys_forge.stats import is_finite_number

__all__ = [
    "EVAL_FORMAT",
    "EvalReport",
    "check_writable",
    "format_number",
    "format_p",
    "format_significant",
    "format_table",
    "report_path",
    "write_texts_atomically",
]

#: Version of the ``eval.json`` layout.
EVAL_FORMAT = 1


@dataclass
class EvalReport:
    """Base vs RYS on lm-eval tasks.

    Attributes:
        rows: one dict per (task, metric, filter): ``task``, ``metric``, ``filter``, ``base``, ``rys``,
            ``delta`` (rys - base), ``base_stderr``, ``rys_stderr`` (lm-eval's), ``test``
            (``mcnemar_exact`` / ``paired_bootstrap`` / None), ``p_value``, ``n`` (paired items),
            ``higher_is_better``, ``is_group``, and per test ``b``/``c`` (discordant counts) or
            ``ci_low``/``ci_high`` (bootstrap interval of the delta); ``note`` when no test was run.
        settings: what was evaluated and how (models, plan, tasks, lm-eval settings, versions, base cache).
        timings: seconds per stage (``base_load``, ``base_eval``, ``rys_load``, ``rys_eval``, ``total``).
        notes: human-readable remarks (metrics without a paired test and why, mismatched items, ...).
        items: paired per-item scores, ``{task: {filter: {"doc_ids": [...], metric: {"base": [...],
            "rys": [...]}}}}``, for metrics with scalar per-item values.
        saved_to: the ``eval.json`` files written.
        healing_rows: for a healed export, unhealed vs healed per task and metric: the row layout above with
            ``unhealed``/``healed`` (and their ``_stderr``) in place of ``base``/``rys``; else empty.
    """

    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)
    saved_to: list[str] = field(default_factory=list)
    healing_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def base_cache_reused(self) -> bool:
        """Whether the base results came from the cache (no base evaluation ran)."""
        return bool(self.settings.get("base_cache", {}).get("reused"))

    def row(self, task: str, metric: str, filter: str = "none") -> dict[str, Any]:  # noqa: A002
        """The row of one task and metric.

        Raises:
            KeyError: no such row.
        """
        for row in self.rows:
            if row["task"] == task and row["metric"] == metric and row["filter"] == filter:
                return row
        raise KeyError(f"no row for task {task!r}, metric {metric!r}, filter {filter!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite floats become None)."""
        return json_safe(
            {
                "rys_forge_eval": EVAL_FORMAT,
                "settings": self.settings,
                "timings": self.timings,
                "rows": self.rows,
                **({"healing_rows": self.healing_rows} if self.healing_rows else {}),
                "notes": self.notes,
                "items": self.items,
            }
        )

    def to_json(self) -> str:
        """The text of ``eval.json`` (indented, strict JSON, trailing newline)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the report atomically; ``path`` is a folder (``path/eval.json``) or a ``.json`` file.

        Returns:
            The file written.
        """
        target = report_path(path)
        write_texts_atomically({target: self.to_json()})
        self.saved_to.append(str(target))
        return target


def is_eval_report(path: Path) -> bool:
    """Whether ``path`` holds an ``eval.json`` rys-forge wrote (its format marker), the only kind eval replaces."""
    return json_marker(path, "rys_forge_eval") is not None


def report_path(path: str | Path) -> Path:
    """``path`` itself when it names a ``.json`` file, else ``path/eval.json``."""
    path = Path(path).expanduser()
    return path if path.suffix == ".json" else path / EVAL_FILE


def write_texts_atomically(files: Mapping[Path, str]) -> None:
    """Write every file to a temporary sibling first, then rename all into place (all or nothing on
    write errors; a rename failure after the first leaves earlier ones written).

    Raises:
        RysForgeError: a file cannot be written (the message names ``eval.json``).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, text in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            staged.append((Path(tmp_name), target))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        raise RysForgeError(f"could not write {EVAL_FILE}: {os_error_message(exc)}") from None
    finally:
        for tmp, _target in staged:
            tmp.unlink(missing_ok=True)


def check_writable(targets: Iterable[Path]) -> None:
    """Fail before any work if one of ``targets`` (files to be written at the end) could not be written
    (:func:`rys_forge.errors.output_problem`).

    Raises:
        OutputError: names the file and what to do.
    """
    for target in targets:
        problem = output_problem(target)
        if problem is not None:
            raise OutputError(f"cannot write {target}: {problem}")


# --------------------------------------------------------------------------- number formatting


def format_number(value: Any, digits: int = 4) -> str:
    """``digits`` decimals (``0.2500``); scientific with ``digits - 1`` decimals from 1e4 or below 1e-3
    (``5.196e+15``); ``-`` for a missing or non-finite value."""
    if not is_finite_number(value):
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def format_p(p: Any, short: bool = False) -> str:
    """A p-value: ``1.64e-04`` below 1e-3, else three decimals (``0.069``); ``short`` gives two decimals
    from 0.1 up (``0.25``); ``-`` for a missing or non-finite value."""
    if not is_finite_number(p):
        return "-"
    if p < 1e-3:
        return f"{p:.2e}"
    return f"{p:.2f}" if short and p >= 0.1 else f"{p:.3f}"


def format_significant(value: Any, digits: int = 3) -> str:
    """A float to ``digits`` significant digits (``0.794``, ``1``), scientific with one decimal below
    ``10**-digits`` (``1.6e-04``); other values as ``str``; ``-`` for None or a non-finite float."""
    if value is None or (isinstance(value, float) and not is_finite_number(value)):
        return "-"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- terminal table


def _metric_label(row: Mapping[str, Any]) -> str:
    return row["metric"] if row["filter"] in ("none", None) else f"{row['metric']},{row['filter']}"


def _signed(delta: Any) -> str:
    return "-" if delta is None else ("+" if delta > 0 else "") + format_number(delta)


def _with_stderr(value: Any, stderr: Any) -> str:
    return format_number(value) + (f" ± {format_number(stderr)}" if stderr is not None else "")


def _columns(header: list[str], lines: list[list[str]]) -> list[str]:
    """Header, rule and lines, left-aligned in columns two spaces apart."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [render(header), render(["-" * w for w in widths]), *(render(line) for line in lines)]


def _healing_table(rows: list[dict[str, Any]]) -> list[str]:
    """Unhealed vs healed, per task and metric (no rule line under the header)."""
    lines = [
        [row["task"], _metric_label(row), format_number(row["unhealed"]), format_number(row["healed"]),
         _signed(row.get("delta")), format_p(row.get("p_value"))]
        for row in rows
    ]
    table = _columns(["task", "metric", "unhealed", "healed", "delta", "p"], lines)
    return [table[0], *table[2:]]


def _footer(report: EvalReport) -> list[str]:
    settings = report.settings
    footer = [
        f"base: {settings.get('base')}  rys: {settings.get('rys')}"
        + (f"  plan: {settings['plan_description']}" if settings.get("plan_description") else ""),
        f"n = {settings.get('limit') or 'all'} items per task, {settings.get('num_fewshot_effective')}"
        f"; delta = rys - base; p: paired test on per-item results"
        + ("; base results reused from cache" if report.base_cache_reused else ""),
    ]
    if settings.get("adapter"):
        footer.append(f"adapter merged into the base: {settings['adapter'].get('path')}")
    if settings.get("heal"):
        footer.append(f"rys = healed (per-visit LoRA in {settings['heal'].get('adapter')}/); see the healing table")
    return footer


def format_table(report: EvalReport) -> str:
    """Plain-text table for the terminal: task, metric, base ± se, rys ± se, delta, p, test.

    A healed export's healing table, the settings footer and the notes follow the table.
    """
    lines: list[list[str]] = []
    for row in report.rows:
        metric = _metric_label(row)
        if row.get("higher_is_better") is not None:
            metric += " ↑" if row["higher_is_better"] else " ↓"
        test = {"mcnemar_exact": "McNemar", "paired_bootstrap": "bootstrap"}.get(row.get("test") or "", "-")
        task = ("  " if row.get("is_group") is False and row.get("in_group") else "") + row["task"]
        lines.append([
            task, metric, _with_stderr(row["base"], row.get("base_stderr")),
            _with_stderr(row["rys"], row.get("rys_stderr")), _signed(row.get("delta")),
            format_p(row.get("p_value")), test,
        ])
    out = _columns(["task", "metric", "base ± se", "rys ± se", "delta", "p", "test"], lines)
    if report.healing_rows:
        out += ["", "healing (same tasks): unhealed vs healed; delta = healed - unhealed"]
        out += _healing_table(report.healing_rows)
    out.append("")
    out.extend(_footer(report))
    out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out)
