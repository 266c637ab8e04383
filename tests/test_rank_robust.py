"""Outlier-robust token statistics and the diverse short list, against hand-computed references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rys_forge.rank.activations import ActivationCache, CachedBatch, mark_outliers
from rys_forge.rank.shortlist import shortlist, window_overlap


def _batch(hidden: list[torch.Tensor], valid: torch.Tensor) -> CachedBatch:
    empty = torch.zeros((0, 2), dtype=torch.long)
    return CachedBatch(input_ids=torch.zeros(valid.shape, dtype=torch.long), valid=valid.clone(), hidden=hidden,
                       layer_kwargs=[], kl_index=empty, base_logits=None, base_top1=None, families=["f"] * valid.shape[0])


def test_mark_outliers_matches_the_median_rule():
    gen = torch.Generator().manual_seed(0)
    num_layers, rows, length, d = 4, 3, 7, 16
    hidden = [torch.randn(rows, length, d, generator=gen) for _ in range(num_layers + 1)]
    hidden[2][1, 0] *= 40.0  # a massive activation at the first token of row 1, layer 2 only
    hidden[0][2, 3] *= 40.0  # the embeddings are not judged
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[0, 5:] = False  # padding
    batches = [_batch([h[:2] for h in hidden], valid[:2]), _batch([h[2:] for h in hidden], valid[2:])]
    mark_outliers(batches, num_layers, factor=5.0)

    # Reference in numpy float64: per layer 1..L, the median norm over valid tokens; a token is an
    # outlier if its norm exceeds 5x that median at any of those layers.
    x = np.stack([h.double().numpy() for h in hidden])  # [L+1, rows, T, d]
    norms = np.linalg.norm(x, axis=-1)
    v = valid.numpy()
    medians = np.array([np.median(norms[l][v]) for l in range(1, num_layers + 1)])
    expected = v & (np.max(norms[1:] / medians[:, None, None], axis=0) > 5.0)
    got_outlier = torch.cat([b.outlier for b in batches]).numpy()
    got_valid = torch.cat([b.valid for b in batches]).numpy()
    assert expected[1, 0] and expected.sum() == 1
    np.testing.assert_array_equal(got_outlier, expected)
    np.testing.assert_array_equal(got_valid, v & ~expected)

    cache = ActivationCache(model=None, spec=None, batches=batches, num_layers=num_layers)  # type: ignore[arg-type]
    assert cache.outliers == 1
    assert cache.pooled(2).shape[0] == v.sum() - 1
    assert cache.pooled(2, with_outliers=True).shape[0] == v.sum()
    assert torch.equal(cache.pooled(2, with_outliers=True)[cache.pooled(2, with_outliers=True).norm(dim=-1).argmax()],
                       hidden[2][1, 0])


def test_factor_zero_keeps_everything_via_cache_activations_default():
    # mark_outliers is only called with a positive factor; the rule itself never drops a token below it.
    hidden = [torch.ones(1, 3, 4) for _ in range(3)]
    batches = [_batch(hidden, torch.ones(1, 3, dtype=torch.bool))]
    mark_outliers(batches, 2, factor=1.5)
    assert batches[0].valid.all() and not batches[0].outlier.any()


def _rows(num_layers: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [{"window": f"{i}:{j}", "i": i, "j": j, "score": float(rng.normal())}
            for i in range(num_layers) for j in range(i + 2, num_layers + 1)]
    rows[3]["score"] = math.nan
    return sorted(rows, key=lambda r: -r["score"] if not math.isnan(r["score"]) else math.inf)


def test_window_overlap_by_hand():
    assert window_overlap({"i": 2, "j": 9}, {"i": 2, "j": 4}) == 2 / 7  # nested: 2 shared of 7 in the union
    assert window_overlap({"i": 2, "j": 6}, {"i": 4, "j": 10}) == 2 / 8
    assert window_overlap({"i": 0, "j": 3}, {"i": 3, "j": 5}) == 0.0  # adjacent
    assert window_overlap({"i": 4, "j": 9}, {"i": 4, "j": 9}) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shortlist_is_greedy_suppression(seed):
    rows = _rows(14, seed)
    kept = shortlist(rows, k=6, max_overlap=0.3)
    assert [r["shortlist"] for r in kept] == list(range(1, 7))
    assert sum(r["shortlist"] is not None for r in rows) == 6
    for a, b in itertools.combinations(kept, 2):
        assert window_overlap(a, b) <= 0.3
    # Greedy: every finite-score row ranked above the last kept one and not kept overlaps a better kept row.
    last = rows.index(kept[-1])
    for position, row in enumerate(rows[:last]):
        if row["shortlist"] is None and not math.isnan(row["score"]):
            assert any(window_overlap(row, k) > 0.3 for k in kept if rows.index(k) < position)
    scores = [r["score"] for r in kept]
    assert scores == sorted(scores, reverse=True)


def test_shortlist_overlap_one_is_the_raw_order():
    rows = _rows(8, 3)
    kept = shortlist(rows, k=5, max_overlap=1.0)
    assert kept == [r for r in rows if not math.isnan(r["score"])][:5]


def test_shortlist_fills_up_when_suppression_leaves_too_few():
    rows = [{"window": w, "i": int(w.split(":")[0]), "j": int(w.split(":")[1]), "score": s}
            for w, s in [("0:6", 3.0), ("0:5", 2.0), ("1:6", 1.0), ("1:5", 0.5)]]
    kept = shortlist(rows, k=3, max_overlap=0.3)
    assert [r["window"] for r in kept] == ["0:6", "0:5", "1:6"]  # only 0:6 survives suppression; best fill
