"""evaluate: lm-eval on the base and the RYS model, with paired significance tests.

Modules: :mod:`~rys_forge.evaluate.harness` (the ``eval`` stage, :func:`evaluate`),
:mod:`~rys_forge.evaluate.subject` (what is compared: an export and its base, or an in-memory repeat),
:mod:`~rys_forge.evaluate.runner` (one lm-eval run of a loaded model, normalised; offline environment),
:mod:`~rys_forge.evaluate.compare` (paired per-item tests of two runs), :mod:`~rys_forge.evaluate.cache`
(base results reused across variants), :mod:`~rys_forge.evaluate.report` (``eval.json``, the table, number
formatting), :mod:`~rys_forge.evaluate.local_tasks` (the offline ``rys_*`` tasks).

Besides :func:`evaluate` and :func:`format_table`, the names below are the API that other stages (the
``sweep``) build on: one lm-eval run of a model as it is now (:func:`run_lm_eval`, with its task loading,
environment and settings checks), the paired comparison of two runs (:func:`compare_runs`), and the number
formatting of printed reports (:func:`format_number`, :func:`format_p`, :func:`format_significant`).
"""

from rys_forge.artifacts import EVAL_FILE
from rys_forge.evaluate.compare import compare_runs
from rys_forge.evaluate.harness import evaluate
from rys_forge.evaluate.report import (
    EvalReport,
    format_number,
    format_p,
    format_significant,
    format_table,
)
from rys_forge.evaluate.runner import (
    check_batch_size,
    check_counts,
    is_count,
    lm_eval_environment,
    lm_eval_version,
    load_task_objects,
    resolve_task_names,
    run_lm_eval,
    say,
)

__all__ = [
    "EVAL_FILE",
    "EvalReport",
    "check_batch_size",
    "check_counts",
    "compare_runs",
    "evaluate",
    "format_number",
    "format_p",
    "format_significant",
    "format_table",
    "is_count",
    "lm_eval_environment",
    "lm_eval_version",
    "load_task_objects",
    "resolve_task_names",
    "run_lm_eval",
    "say",
]
