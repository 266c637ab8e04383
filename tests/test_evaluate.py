"""rys_forge.evaluate end to end on tiny random models and the offline lm-eval tasks (a few items each).

The RYS numbers are checked against an independent computation: lm-eval's HFLM run directly on a model
materialised with duplicated weights (tests/test_repeat.py's reference), item by item.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from rys_forge.errors import ModelLoadError, TaskError, UsageError, WindowError  # noqa: E402
from rys_forge.evaluate import EVAL_FILE, EvalReport, compare_runs, evaluate, format_table  # noqa: E402
from rys_forge.evaluate.local_tasks import task_manager  # noqa: E402
from rys_forge.evaluate.runner import offline_env  # noqa: E402
from rys_forge.models import load_model  # noqa: E402
from rys_forge.plan import LayerPlan  # noqa: E402
from rys_forge.stats import mcnemar_exact  # noqa: E402
from rys_forge.verify import verify  # noqa: E402
from test_repeat import materialised_reference  # noqa: E402

TASKS = ["rys_arc_easy", "rys_lambada_openai"]
LIMIT = 4
WINDOW = "2:5"
MODEL_TYPES = ["llama", "gemma3_text"]  # plain attention, and 5:1 sliding/full attention (window 8 tokens)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """Both rys-forge caches (models.cache_dir: RYS_FORGE_CACHE; local_tasks: RYS_FORGE_CACHE) in tmp,
    and one torch thread (the machine's cores are shared; oversubscription is much slower)."""
    root = tmp_path_factory.mktemp("eval_cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYS_FORGE_CACHE", str(root / "rys-cache"))
        yield root
    torch.set_num_threads(threads)


def _run(model_dir: Path, **kwargs) -> EvalReport:
    return evaluate(model=str(model_dir), windows=[WINDOW], tasks=TASKS, limit=LIMIT, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reports(isolated, tiny_model_dirs, tmp_path_factory):
    """model_type -> (first report, second report, out folder), both in-memory 2:5 runs."""
    made = {}
    for model_type in MODEL_TYPES:
        out = tmp_path_factory.mktemp(f"eval_{model_type}")
        rng_before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
        first = _run(tiny_model_dirs[model_type], out=out)
        # simple_evaluate seeds python/numpy/torch globally; evaluate() restores the caller's states
        assert random.getstate() == rng_before[0]
        assert np.array_equal(np.random.get_state()[1], rng_before[1])
        assert torch.equal(torch.get_rng_state(), rng_before[2])
        second = _run(tiny_model_dirs[model_type])
        made[model_type] = (first, second, out)
    return made


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_in_memory_eval_end_to_end(reports, isolated, model_type):
    first, second, out = reports[model_type]
    saved = out / EVAL_FILE
    assert saved.is_file() and first.saved_to == [str(saved.resolve())]
    assert not [p for p in out.iterdir() if p.name != EVAL_FILE]  # no temporary files left
    data = json.loads(saved.read_text())
    assert data["rows"] == json.loads(json.dumps(first.to_dict()))["rows"]
    assert data["settings"]["plan"]["layer_order"] == list(LayerPlan.from_windows([WINDOW], first.settings["plan"]["base_num_layers"]).order)
    assert {row["task"] for row in data["rows"]} == set(TASKS)
    metrics = {(row["task"], row["metric"]) for row in first.rows}
    assert metrics == {
        ("rys_arc_easy", "acc"),
        ("rys_arc_easy", "acc_norm"),
        ("rys_lambada_openai", "perplexity"),
        ("rys_lambada_openai", "acc"),
    }
    for row in first.rows:
        assert row["n"] == LIMIT
        assert row["delta"] == pytest.approx(row["rys"] - row["base"])
        assert 0.0 <= row["p_value"] <= 1.0
        assert row["base_stderr"] is not None and row["rys_stderr"] is not None
    # the repeat changes the model: per-item log-likelihoods (hence perplexity) differ
    ppl = first.row("rys_lambada_openai", "perplexity")
    assert ppl["base"] != ppl["rys"]
    assert ppl["test"] == "paired_bootstrap" and ppl["ci_low"] <= ppl["delta"] <= ppl["ci_high"]
    pairs = first.items["rys_lambada_openai"]["none"]["perplexity"]
    assert pairs["base"] != pairs["rys"]
    # 0/1 metrics get McNemar, consistent with the paired items
    acc = first.row("rys_arc_easy", "acc_norm")
    assert acc["test"] == "mcnemar_exact"
    items = first.items["rys_arc_easy"]["none"]["acc_norm"]
    b = sum(1 for x, y in zip(items["base"], items["rys"]) if x == 1 and y == 0)
    c = sum(1 for x, y in zip(items["base"], items["rys"]) if x == 0 and y == 1)
    assert (acc["b"], acc["c"]) == (b, c) and acc["p_value"] == mcnemar_exact(b, c)
    assert first.items["rys_arc_easy"]["none"]["doc_ids"] == list(range(LIMIT))
    # base cache: stored in the isolated cache on the first call, reused on the second
    assert not first.base_cache_reused and second.base_cache_reused
    cache_file = Path(first.settings["base_cache"]["path"])
    assert cache_file.is_file() and cache_file.is_relative_to(isolated)
    assert "base_eval" in first.timings and "base_eval" not in second.timings
    assert [r["base"] for r in second.rows] == [r["base"] for r in first.rows]
    assert [r["rys"] for r in second.rows] == [r["rys"] for r in first.rows]
    assert second.saved_to == []  # no out, no export folder: nothing written
    table = format_table(first)
    assert "rys_lambada_openai" in table and "McNemar" in table and "bootstrap" in table
    assert "reused from cache" in format_table(second)


def _reference_samples(model, tokenizer) -> dict:
    """lm-eval directly (no rys_forge.evaluate): HFLM on `model`, same tasks, limit and default seeds."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_defaults=False)
    with offline_env():
        result = evaluator.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
            tasks=TASKS,
            task_manager=manager,
            limit=LIMIT,
            log_samples=True,
            bootstrap_iters=0,
        )
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in result["samples"].items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rys_items_match_materialised_reference(reports, tiny_model_dirs, model_type):
    first = reports[model_type][0]
    loaded = load_model(str(tiny_model_dirs[model_type]))
    plan = LayerPlan.from_windows([WINDOW], loaded.model.config.num_hidden_layers)
    reference = materialised_reference(loaded.model, plan.order)
    samples = _reference_samples(reference, loaded.tokenizer)
    for task, metric in [("rys_arc_easy", "acc"), ("rys_arc_easy", "acc_norm"), ("rys_lambada_openai", "acc")]:
        expected = [float(s[metric]) for s in samples[task]]
        assert first.items[task]["none"][metric]["rys"] == expected, (task, metric)
        assert first.row(task, metric)["rys"] == pytest.approx(np.mean(expected))
    # per-item log-likelihoods: same computation, float32 rounding only
    expected_ll = [s["perplexity"] for s in samples["rys_lambada_openai"]]
    got_ll = first.items["rys_lambada_openai"]["none"]["perplexity"]["rys"]
    assert got_ll == pytest.approx(expected_ll, abs=1e-3)
    assert [s["doc_id"] for s in samples["rys_arc_easy"]] == first.items["rys_arc_easy"]["none"]["doc_ids"]


def _fake_export(folder: Path, base_dir: Path, window: str, base_model: str | None) -> Path:
    """A mergekit-format export: duplicated weights saved as a plain checkpoint plus the rys block."""
    loaded = load_model(str(base_dir))
    plan = LayerPlan.from_windows([window], loaded.model.config.num_hidden_layers)
    materialised_reference(loaded.model, plan.order).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rys"] = {"plan": plan.to_dict(), "format": "mergekit"}
    if base_model is not None:
        config["rys"]["base_model"] = base_model
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_export_folder_target(reports, tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    export = _fake_export(tmp_path / "export", base_dir, WINDOW, base_model=str(base_dir))
    verify(export)  # eval runs verified exports only
    out = tmp_path / "out"
    report = evaluate(str(export), tasks=TASKS, limit=LIMIT, progress=False, out=out)
    assert report.base_cache_reused  # same base and settings as the in-memory run
    assert report.settings["mode"] == "export" and report.settings["base"] == str(base_dir)
    assert report.settings["plan"]["layer_order"] == list(LayerPlan.from_windows([WINDOW], 6).order)
    assert (export / EVAL_FILE).is_file() and (out / EVAL_FILE).is_file()
    assert json.loads((export / EVAL_FILE).read_text()) == json.loads((out / EVAL_FILE).read_text())
    _assert_same_items(report, reports["llama"][0])


def _assert_same_items(report, in_memory) -> None:
    """An export's per-item results equal the in-memory repeat's (0/1 items exactly, perplexity to 1e-3)."""
    for task, metric in [("rys_arc_easy", "acc"), ("rys_arc_easy", "acc_norm"), ("rys_lambada_openai", "acc")]:
        assert report.items[task]["none"][metric] == in_memory.items[task]["none"][metric]
    assert report.items["rys_lambada_openai"]["none"]["perplexity"]["rys"] == pytest.approx(
        in_memory.items["rys_lambada_openai"]["none"]["perplexity"]["rys"], abs=1e-3
    )


def test_layerlist_export_target(reports, tiny_model_dirs, tmp_path):
    """A real layer-list export (rys_forge.surgery.build; trust_remote_code), its base taken from the
    export's recorded rys.base_model: the RYS items are those of the in-memory repeat."""
    from rys_forge.surgery.builder import build

    base_dir = tiny_model_dirs["gemma3_text"]
    export = build(str(base_dir), [WINDOW], tmp_path / "export").path
    assert json.loads((export / "config.json").read_text())["rys"]["format"] == "layerlist"
    report = evaluate(str(export), tasks=TASKS, limit=LIMIT, progress=False)
    assert report.base_cache_reused and report.settings["base"] == str(base_dir)
    assert report.saved_to == [str(export / EVAL_FILE)]
    _assert_same_items(report, reports["gemma3_text"][0])


def test_export_without_base_is_a_usage_error(isolated, tiny_model_dirs, tmp_path):
    export = _fake_export(tmp_path / "export", tiny_model_dirs["llama"], WINDOW, base_model=None)
    verify(export, str(tiny_model_dirs["llama"]))
    with pytest.raises(UsageError, match="--base"):
        evaluate(str(export), tasks=TASKS, limit=LIMIT, progress=False, out=tmp_path / "out")
    assert not (export / EVAL_FILE).exists() and not (tmp_path / "out").exists()
    # a base of the wrong depth is refused (the plan was built for 6 layers)
    with pytest.raises(UsageError, match="layers"):
        evaluate(str(export), base=str(tiny_model_dirs["gemma3_text"]), tasks=TASKS, limit=LIMIT, progress=False)
    assert not (export / EVAL_FILE).exists()


def test_unknown_task_fails_before_loading(isolated, tiny_model_dirs, tmp_path):
    with pytest.raises(TaskError, match="rys_arc_eazy") as info:
        evaluate(
            model=str(tiny_model_dirs["llama"]), windows=[WINDOW], tasks=["rys_arc_eazy"], limit=LIMIT,
            progress=False, out=tmp_path,
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / EVAL_FILE).exists()


def test_missing_data_file_is_a_task_error(isolated, tiny_model_dirs, tmp_path):
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "my_task.yaml").write_text(
        "task: my_missing_data_task\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {tmp_path / 'nowhere.jsonl'}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        "doc_to_text: '{{text}}'\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: perplexity\n"
    )
    with pytest.raises(TaskError, match="nowhere.jsonl"):
        evaluate(
            model=str(tiny_model_dirs["llama"]), windows=[WINDOW], tasks=["my_missing_data_task"],
            include_path=str(include), progress=False, out=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_model_errors_write_nothing(isolated, tmp_path, tiny_model_dirs):
    missing = tmp_path / "no-such-export"
    with pytest.raises(ModelLoadError):
        evaluate(str(missing), base=str(tiny_model_dirs["llama"]), tasks=TASKS, limit=LIMIT, progress=False, out=tmp_path / "out")
    with pytest.raises(ModelLoadError):
        evaluate(model=str(missing), windows=[WINDOW], tasks=TASKS, limit=LIMIT, progress=False, out=tmp_path / "out")
    with pytest.raises(WindowError):
        evaluate(model=str(tiny_model_dirs["llama"]), windows=["2:9"], tasks=TASKS, limit=LIMIT, progress=False, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damped_in_memory_eval_equals_its_export(isolated, tiny_model_dirs, tmp_path):
    """`eval --model --window --alpha 0.5` (gemma3: the scale sits on the post-norms) gives the items of the
    layer-list export built with `--alpha 0.5`, and differs from the plain repeat; `substeps` is `alpha 1/K`."""
    from rys_forge.surgery.builder import build

    base_dir = tiny_model_dirs["gemma3_text"]
    damped = _run(base_dir, alpha=0.5)
    assert damped.settings["plan"]["residual_scales"] == list(LayerPlan.from_windows([WINDOW], 8, 2, 0.5).scales)
    assert "at alpha 0.5" in damped.settings["rys"]
    export = build(str(base_dir), [WINDOW], tmp_path / "export", alpha=0.5).path
    _assert_same_items(evaluate(str(export), tasks=TASKS, limit=LIMIT, progress=False), damped)
    plain = _run(base_dir)
    ll = "rys_lambada_openai", "none", "perplexity"
    assert damped.items[ll[0]][ll[1]][ll[2]]["rys"] != plain.items[ll[0]][ll[1]][ll[2]]["rys"]
    two = _run(base_dir, substeps=2)
    assert two.settings["plan"]["layer_order"] == list(LayerPlan.from_windows([WINDOW], 8, 3, 0.5).order)
    assert two.settings["plan"]["residual_scales"] == list(LayerPlan.from_windows([WINDOW], 8, 3, 0.5).scales)


def test_argument_errors():
    with pytest.raises(UsageError):
        evaluate(tasks=TASKS)  # neither target nor model
    with pytest.raises(UsageError):
        evaluate("x", model="y", windows=[WINDOW], tasks=TASKS)
    with pytest.raises(UsageError):
        evaluate(model="y", tasks=TASKS)  # no window
    with pytest.raises(UsageError):
        evaluate(model="y", windows=[WINDOW], tasks=TASKS, batch_size="many")
    with pytest.raises(UsageError):
        evaluate(model="y", windows=[WINDOW], tasks=TASKS, limit=0)
    with pytest.raises(UsageError, match="apply to --model"):
        evaluate("x", alpha=0.5, tasks=TASKS)  # an export stores its own scales
    with pytest.raises(WindowError, match="alpha must be a positive finite number"):
        evaluate(model="y", windows=[WINDOW], tasks=TASKS, alpha=0.0)
    with pytest.raises(WindowError, match="either alpha"):
        evaluate(model="y", windows=[WINDOW], tasks=TASKS, alpha=0.5, substeps=2)


def _run_dict(values: dict, aggregate: dict, metric_info: dict, groups: dict | None = None) -> dict:
    """A normalised run (what run_lm_eval returns) for one task `t`."""
    return {
        "results": aggregate,
        "groups": groups or {},
        "metric_info": {"t": metric_info},
        "items": {
            "t": {
                "none": {
                    str(i): {"doc_hash": str(i), "prompt_hash": "p", "values": {m: v[i] for m, v in values.items()}}
                    for i in range(len(next(iter(values.values()))))
                }
            }
        },
    }


def test_compare_tests_and_skips():
    info = {
        "acc": {"aggregation": "mean", "higher_is_better": True},
        "perplexity": {"aggregation": "perplexity", "higher_is_better": False},
        "bleu": {"aggregation": "bleu", "higher_is_better": True},
    }
    base_ll, rys_ll = [-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0]
    base = _run_dict(
        {"acc": [1.0, 0.0, 1.0], "perplexity": base_ll, "bleu": [None, None, None]},
        {"t": {"acc,none": 2 / 3, "acc_stderr,none": 0.3, "perplexity,none": float(np.exp(2.0)),
               "perplexity_stderr,none": 1.0, "bleu,none": 10.0, "bleu_stderr,none": 1.0},
         "grp": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
        info,
        groups={"grp": ["t"]},
    )
    rys = _run_dict(
        {"acc": [0.0, 1.0, 1.0], "perplexity": rys_ll, "bleu": [None, None, None]},
        {"t": {"acc,none": 2 / 3, "acc_stderr,none": 0.3, "perplexity,none": float(np.exp(2.0)),
               "perplexity_stderr,none": 1.0, "bleu,none": 12.0, "bleu_stderr,none": 1.0},
         "grp": {"acc,none": 0.75, "acc_stderr,none": 0.1}},
        info,
        groups={"grp": ["t"]},
    )
    rows, items, notes = compare_runs(base, rys, n_resamples=200, seed=0)
    by_metric = {(r["task"], r["metric"]): r for r in rows}
    acc = by_metric[("t", "acc")]
    assert acc["test"] == "mcnemar_exact" and (acc["b"], acc["c"]) == (1, 1) and acc["p_value"] == 1.0
    assert acc["in_group"] and not acc["is_group"]
    ppl = by_metric[("t", "perplexity")]
    assert ppl["test"] == "paired_bootstrap" and ppl["statistic"] == "perplexity" and ppl["n"] == 3
    bleu = by_metric[("t", "bleu")]
    assert bleu["test"] is None and "corpus-level" in bleu["note"] and bleu["delta"] == pytest.approx(2.0)
    group = by_metric[("grp", "acc")]
    assert group["is_group"] and group["test"] is None and group["delta"] == pytest.approx(0.25)
    assert any("bleu" in note for note in notes)
    assert items["t"]["none"]["doc_ids"] == [0, 1, 2] and "bleu" not in items["t"]["none"]
    # per-item values that do not reproduce the aggregate are not tested
    rys["results"]["t"]["acc,none"] = 0.9
    rows, _items, notes = compare_runs(base, rys, n_resamples=200, seed=0)
    assert next(r for r in rows if r["metric"] == "acc" and r["task"] == "t")["test"] is None
    assert any("reproduce" in note for note in notes)


def test_report_save_is_atomic_and_json_clean(tmp_path):
    report = EvalReport(
        rows=[{"task": "t", "metric": "acc", "filter": "none", "base": 0.5, "rys": float("nan"), "delta": None}],
        settings={"base": "b", "rys": "r"},
        timings={"total": 1.0},
    )
    path = report.save(tmp_path / "sub")
    assert path == tmp_path / "sub" / EVAL_FILE and report.saved_to == [str(path)]
    data = json.loads(path.read_text())
    assert data["rows"][0]["rys"] is None  # NaN is not valid JSON
    assert [p.name for p in path.parent.iterdir()] == [EVAL_FILE]
    assert report.save(tmp_path / "named.json") == tmp_path / "named.json"


def test_mergekit_export_scores_equal_layerlist(reports, tiny_model_dirs, tmp_path):
    """Both real export formats of one plan evaluate in lm-eval's HFLM with identical per-item scores."""
    from rys_forge.surgery.builder import build

    base_dir = tiny_model_dirs["gemma3_text"]
    merged = build(str(base_dir), [WINDOW], tmp_path / "mk", format="mergekit").path
    layered = build(str(base_dir), [WINDOW], tmp_path / "ll").path
    a = evaluate(str(merged), tasks=TASKS, limit=LIMIT, progress=False)
    b = evaluate(str(layered), tasks=TASKS, limit=LIMIT, progress=False)
    for task, metric in [("rys_arc_easy", "acc"), ("rys_arc_easy", "acc_norm"), ("rys_lambada_openai", "acc")]:
        assert a.items[task]["none"][metric] == b.items[task]["none"][metric]
    assert [(r["task"], r["metric"]) for r in a.rows] == [(r["task"], r["metric"]) for r in b.rows]
    for ra, rb in zip(a.rows, b.rows):
        assert ra["rys"] == pytest.approx(rb["rys"], rel=1e-6), (ra["task"], ra["metric"])
