"""rank: one cached activation pass, every window's probes, a score, heatmaps and a short list.

The stage reads top-down: `prompts` (the prompt sets) -> `activations` (one cached base pass, the block
map replayed from it) -> `probes` (per-window numbers, a registry) over `metrics` (float64 statistics)
-> `score` (Score(B) and the classes) and `learned` (a score learned across models: `--learned-score`)
-> `pipeline` (the run itself: `rank_windows`) -> `outputs` (the run folder's tables, summary and figures).

The names below are the stage's public API; callers outside `rys_forge.rank` import them from here::

    from rys_forge.rank import RankSettings, ScoreConfig, load_prompts, rank_windows
"""

from rys_forge.rank.learned import LearnedScore, order_rows
from rys_forge.rank.outputs import read_rank_run
from rys_forge.rank.pipeline import RankResult, RankSettings, rank_windows
from rys_forge.rank.probes import PROBES, list_probes, probe_descriptions, register_probe, select_probes
from rys_forge.rank.prompts import (
    DEFAULT_FAMILIES,
    DEFAULT_PER_FAMILY,
    Prompt,
    available_families,
    load_prompts,
    per_family_limit,
)
from rys_forge.rank.score import SCORE_INPUTS, ScoreConfig, check_score_inputs, score, score_terms

__all__ = [
    "DEFAULT_FAMILIES",
    "DEFAULT_PER_FAMILY",
    "LearnedScore",
    "PROBES",
    "SCORE_INPUTS",
    "Prompt",
    "RankResult",
    "RankSettings",
    "ScoreConfig",
    "available_families",
    "check_score_inputs",
    "list_probes",
    "load_prompts",
    "order_rows",
    "per_family_limit",
    "probe_descriptions",
    "rank_windows",
    "read_rank_run",
    "register_probe",
    "score",
    "score_terms",
    "select_probes",
]
