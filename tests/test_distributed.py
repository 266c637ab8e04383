"""Window-parallel rank: two processes on the gloo backend (CPU) split the windows, write their own logs into
one run folder, and rank 0 merges them; the result must equal the single-process run row for row."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from rys_forge.distributed import Shard
from rys_forge.models import load_model
from rys_forge.rank import Prompt, RankSettings, rank_windows

TEXTS = [
    "The committee postponed its decision until the next meeting in March.",
    "def add(a, b):\n    return a + b",
    "If every cat is a mammal and Tom is a cat, then Tom is a mammal.",
    "La ville est calme le dimanche matin, sauf pres du marche.",
]
SETTINGS = dict(max_tokens=16, jacobian_top=2, jacobian_iters=3, top_k=3)
SWEEP_WINDOWS = ["0:2", "1:3", "1:4", "2:5", "3:6"]


def _prompts():
    return [Prompt(f"p{k}", fam, text) for k, (fam, text) in enumerate(zip(["a", "b", "a", "b"], TEXTS))]


def _worker(rank: int, world: int, kind: str, init_file: str, model_dir: str, out_dir: str, cache_dir: str) -> None:
    """One process of a window-parallel ``rank`` or ``sweep`` (gloo, file rendezvous)."""
    import torch.distributed as dist

    from rys_forge.research.sweep import sweep_windows

    os.environ["RYS_FORGE_CACHE"] = cache_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loaded = load_model(model_dir)
        if kind == "rank":
            rank_windows(loaded.model, loaded.tokenizer, _prompts(), RankSettings(**SETTINGS), out_dir=out_dir,
                         progress=False, model_info={"source": "tiny"})
        else:
            sweep_windows(loaded.model, loaded.tokenizer, tasks=["rys_arc_easy"], limit=6, windows=SWEEP_WINDOWS,
                          out_dir=out_dir, progress=False, model_info={"source": "tiny"})
    finally:
        dist.destroy_process_group()


def test_shard_takes_every_world_th_item():
    items = list(range(7))
    assert Shard(0, 2).take(items) == [0, 2, 4, 6] and Shard(1, 2).take(items) == [1, 3, 5]
    assert Shard().take(items) == items and Shard().log_name("windows") == "windows.jsonl"
    assert Shard(1, 2).log_name("sweep") == "sweep.rank1.jsonl"


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model_dirs, tmp_path, monkeypatch):
    model_dir = str(tiny_model_dirs["gemma3_text"])
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    single = rank_windows(*_load(model_dir), _prompts(), RankSettings(**SETTINGS), out_dir=tmp_path / "one", progress=False,
                          model_info={"source": "tiny"})
    out = tmp_path / "two"
    mp.spawn(_worker, args=(2, "rank", str(tmp_path / "pg"), model_dir, str(out), str(tmp_path / "cache")), nprocs=2, join=True)
    logs = sorted(p.name for p in out.glob("windows*.jsonl"))
    assert logs == ["windows.rank0.jsonl", "windows.rank1.jsonl"]
    per_log = [{json.loads(line)["window"] for line in (out / name).read_text().splitlines() if "probe_s" in line} for name in logs]
    assert per_log[0] and per_log[1] and not per_log[0] & per_log[1]  # both worked, no window twice
    merged = json.loads((out / "windows.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["processes"] == 2 and summary["timings"]["windows_probed_this_session"] == len(single.rows)
    assert [r["window"] for r in merged] == [r["window"] for r in single.rows]
    for a, b in zip(merged, single.rows):
        for key, value in b.items():
            if key.endswith("_s") or not isinstance(value, float):
                continue
            other = a.get(key)
            assert other is not None or math.isnan(value), (b["window"], key)
            if other is not None and math.isfinite(value):
                assert other == pytest.approx(value, rel=1e-5, abs=1e-7), (b["window"], key)


def _load(model_dir: str):
    loaded = load_model(model_dir)
    return loaded.model, loaded.tokenizer



@pytest.mark.slow
def test_two_process_sweep_equals_one(tiny_model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from rys_forge.research.sweep import read_sweep, sweep_windows

    model_dir = str(tiny_model_dirs["llama"])
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    model, tokenizer = _load(model_dir)
    single = sweep_windows(model, tokenizer, tasks=["rys_arc_easy"], limit=6, windows=SWEEP_WINDOWS,
                           out_dir=tmp_path / "one", progress=False, model_info={"source": "tiny"})
    out = tmp_path / "two"
    mp.spawn(_worker, args=(2, "sweep", str(tmp_path / "pg"), model_dir, str(out), str(tmp_path / "cache")), nprocs=2, join=True)
    assert sorted(p.name for p in out.glob("sweep*.jsonl")) == ["sweep.rank0.jsonl", "sweep.rank1.jsonl"]
    rows, summary = read_sweep(out)
    assert summary["timings"]["processes"] == 2
    assert [r["window"] for r in rows] == SWEEP_WINDOWS
    for a, b in zip(rows, single.rows):
        assert a["tasks"]["rys_arc_easy"]["items"] == b["tasks"]["rys_arc_easy"]["items"]
        assert a["tasks"]["rys_arc_easy"]["delta"] == pytest.approx(b["tasks"]["rys_arc_easy"]["delta"], abs=1e-12)
