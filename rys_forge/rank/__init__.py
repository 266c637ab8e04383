"""rank: one cached activation pass, every window's probes, a score, heatmaps and a short list.

`activations` caches the residual stream, `probes` holds the probe registry and the score, `metrics` the
float64 statistics, `prompts` the prompt sets, `pipeline` the run itself (`rank_windows`).
"""

from rys_forge.rank.pipeline import RankResult, RankSettings, rank_windows

__all__ = ["RankResult", "RankSettings", "rank_windows"]
