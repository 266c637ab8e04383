"""Issue 15, bad input and faults around rank / sweep / validate / calibrate: a user's prompt file is used whole,
a resume cannot mix numbers (dtype, attention, weights), bad score constants and settings are one-line usage
errors, an all-NaN ranking is a failure, a failed run leaves no run folder, a full disk or a locked folder is
one line, a huge prompt line is cut before tokenising."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rys_forge.artifacts import RUN_FILE
from rys_forge.runs import RunFolder
from rys_forge.cli import main
from rys_forge.distributed import Shard
from rys_forge.errors import PromptError, RysForgeError, UsageError
from rys_forge.models import load_model
from rys_forge.rank import Prompt, RankSettings, ScoreConfig, load_prompts, rank_windows, score_terms
from rys_forge.rank import activations as activations_module

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "2 + 2 = 4, 3 * 7 = 21, and 10 / 4 = 2.5 in decimal arithmetic.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
]
#: A small, fast run: two windows, short prompts, no Jacobians.
FAST = dict(windows=["1:3", "2:4"], max_tokens=12, jacobian="none", top_k=2)


def _prompts() -> list[Prompt]:
    return [Prompt(f"p{k}", "a" if k % 2 else "b", text) for k, text in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def _rank(loaded, out, resume=False, info=None, **settings):
    return rank_windows(loaded.model, loaded.tokenizer, _prompts(), RankSettings(**{**FAST, **settings}), out_dir=out,
                        resume=resume, progress=False, model_info=info or {"source": "llama", "path": loaded.path})


def _one_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output and "unexpected" not in lines[0], result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _cli_rank(model_dir, out, *args):
    return CliRunner().invoke(main, ["rank", "--model", str(model_dir), "--out", str(out), "--no-progress",
                                     "--window", "1:3", "--jacobian", "none", "--max-tokens", "12", *args])


# --------------------------------------------------------------------------- 5: a user's prompt file is used whole


def test_prompt_file_is_used_whole_unless_a_limit_is_given(tmp_path):
    from rys_forge.rank import DEFAULT_PER_FAMILY, per_family_limit

    path = tmp_path / "mine.txt"
    path.write_text("\n".join(f"prompt number {k}" for k in range(12)))
    assert per_family_limit(path, None) is None and per_family_limit(None, None) == DEFAULT_PER_FAMILY == 8
    assert len(load_prompts(path=path, limit_per_family=per_family_limit(path, None))) == 12
    assert len(load_prompts(path=path, limit_per_family=per_family_limit(path, 5))) == 5  # asked for: cut
    assert len(load_prompts(["math"], limit_per_family=per_family_limit(None, None))) == 8


def test_rank_cli_uses_every_prompt_of_a_file(tiny_model_dirs, tmp_path):
    """Needs the CLI: `--prompts-per-family` default None, `limit_per_family=per_family_limit(prompts_file, ...)`."""
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(f"prompt number {k} about the quick brown fox" for k in range(12)))
    result = _cli_rank(tiny_model_dirs["llama"], tmp_path / "run", "--prompts", str(path))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["prompts"]["count"] == 12


# --------------------------------------------------------------------------- 6: a resume cannot mix numbers


def test_resume_refuses_another_dtype_attention_or_weights(llama, tiny_model_dirs, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    info = {"source": "llama", "path": str(model_dir)}
    _rank(llama, tmp_path / "run", info=info)
    half = load_model(str(model_dir), dtype="bfloat16")
    with pytest.raises(UsageError, match=r"settings differ.*dtype"):
        _rank(half, tmp_path / "run", resume=True, info=info)
    sdpa = load_model(str(model_dir), attn_implementation="sdpa")
    with pytest.raises(UsageError, match=r"settings differ.*attention"):
        _rank(sdpa, tmp_path / "run", resume=True, info=info)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # the same size, other values
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"settings differ.*files"):
        _rank(llama, tmp_path / "run", resume=True, info=info)
    identity = json.loads((tmp_path / "run" / RUN_FILE).read_text())["model_identity"]
    assert identity["dtype"] == ["float32"] and identity["attention"] == "eager" and identity["device_type"] == ["cpu"]


def test_sweep_resume_refuses_another_dtype(tiny_model_dirs, tmp_path):
    pytest.importorskip("lm_eval")
    from rys_forge.research.sweep import sweep_windows

    def sweep(loaded, **kwargs):
        return sweep_windows(loaded.model, loaded.tokenizer, tasks=["rys_arc_easy"], limit=2, windows=["1:3"],
                             engine="lm-eval", out_dir=tmp_path / "sweep", progress=False,
                             model_info={"source": "llama", "path": loaded.path}, **kwargs)

    sweep(load_model(str(tiny_model_dirs["llama"])))
    with pytest.raises(UsageError, match=r"settings differ.*dtype"):
        sweep(load_model(str(tiny_model_dirs["llama"]), dtype="bfloat16"), resume=True)


# --------------------------------------------------------------------------- 7: bad constants, NaN scores


@pytest.mark.parametrize("text, fragment", [
    ('{"alpha": NaN}', "'alpha' = nan"),
    ('{"eta": Infinity}', "'eta' = inf"),
    ('{"c": -1}', "'c' = -1"),
    ('{"c": 0}', "'c' = 0"),
    ('{"plateau_max": 2}', "'plateau_max' = 2"),
    ('{"gamma": "5"}', "'gamma' = '5'"),
    ('{"beta": true}', "'beta' = True"),
    ('{"score": 5}', "must be a JSON object"),
    ('{"score": {"alpha": -0.5}}', "'alpha' = -0.5"),
    ("[]", "must be a JSON object"),
    ('{"alhpa": 1}', "unknown key 'alhpa'"),
])
def test_score_config_is_checked(tmp_path, text, fragment):
    path = tmp_path / "score.json"
    path.write_text(text)
    with pytest.raises(UsageError, match="score config") as caught:
        ScoreConfig.from_json(path)
    assert fragment in str(caught.value) and str(path) in str(caught.value)


def test_score_config_errors_are_one_line_in_every_command(tiny_model_dirs, tmp_path):
    bad = tmp_path / "nan.json"
    bad.write_text('{"alpha": NaN}')
    _one_line(_cli_rank(tiny_model_dirs["llama"], tmp_path / "r", "--score-config", str(bad)), 2, "'alpha' = nan")
    _one_line(_cli_rank(tiny_model_dirs["llama"], tmp_path / "r", "--score-config", str(tmp_path)), 2, "is a folder")
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(main, ["validate", str(tmp_path), str(tmp_path), "--score-config", str(bad)])
    _one_line(result, 2, "'alpha' = nan")


def test_a_zero_weight_drops_its_term_and_a_switched_off_probe_is_refused(llama, tmp_path):
    terms = score_terms(0.9, 0.05, 1.2, 0.1, math.nan, alpha=5.0, c=0.1, beta=3.0, gamma=5.0, eta=0.0)
    assert math.isfinite(float(terms["score"])) and float(terms["D"]) == pytest.approx(math.exp(-0.5))
    with pytest.raises(UsageError, match="--kl-positions 0"):
        _rank(llama, tmp_path / "a", kl_positions=0)
    with pytest.raises(UsageError, match="leaves out 'kl'"):
        _rank(llama, tmp_path / "b", probes=["update", "cka", "decoder"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    no_kl = rank_windows(llama.model, llama.tokenizer, _prompts(), RankSettings(**FAST, kl_positions=0),
                         ScoreConfig(eta=0.0), progress=False)
    assert all(math.isfinite(r["score"]) for r in no_kl.rows) and all(math.isnan(r.get("d_kl", math.nan)) for r in no_kl.rows)


def test_a_ranking_whose_scores_are_all_nan_fails(llama, tmp_path, monkeypatch):
    from rys_forge.rank import pipeline

    real = pipeline.probe_window
    monkeypatch.setattr(pipeline, "probe_window", lambda *a, **k: {**real(*a, **k), "r_0": math.nan})
    with pytest.raises(RysForgeError, match="every window's score is NaN: r_0 is NaN"):
        _rank(llama, tmp_path / "run")
    assert not (tmp_path / "run" / "windows.json").exists()


@pytest.mark.parametrize("name, value", [
    ("max_tokens", 1), ("kl_positions", -1), ("jacobian_top", 0), ("jacobian_top", -1), ("jacobian_iters", 0),
    ("jacobian_tokens", 1), ("mmd_samples", 0), ("seed", -1), ("batch_size", 0), ("deep_fraction", math.nan),
    ("kl_fraction", -0.5), ("outlier_factor", math.nan), ("shortlist_overlap", math.inf),
])
def test_rank_settings_out_of_range(name, value):
    with pytest.raises(UsageError, match=f"--{name.replace('_', '-')}"):
        RankSettings(**{name: value}).validate()


def test_validate_and_calibrate_options_out_of_range(tmp_path):
    from rys_forge.research.calibrate import calibrate_score
    from rys_forge.research.validate import validate_runs

    for kwargs, flag in ((dict(n_permutations=0), "--permutations"), (dict(seed=-1), "--seed"),
                         (dict(top_fraction=math.nan), "--top-fraction"), (dict(top_fraction=0.0), "--top-fraction")):
        with pytest.raises(UsageError, match=flag):
            validate_runs(tmp_path, tmp_path, **kwargs)
    for kwargs, flag in ((dict(seed=-1), "--seed"), (dict(trials=-1), "--trials"), (dict(repeats=0), "--repeats")):
        with pytest.raises(UsageError, match=flag):
            calibrate_score(tmp_path, tmp_path, **kwargs)


def test_sweep_seed_out_of_range(llama):
    pytest.importorskip("lm_eval")
    from rys_forge.research.sweep import sweep_windows

    with pytest.raises(UsageError, match="--seed"):
        sweep_windows(llama.model, llama.tokenizer, tasks=["rys_arc_easy"], windows=["1:3"], seed=-1, progress=False)


def test_garbled_run_files_are_usage_errors(tmp_path):
    from rys_forge.research.sweep import read_sweep
    from rys_forge.research.validate import validate_runs

    rank, sweep = tmp_path / "rank", tmp_path / "sweep"
    rank.mkdir()
    sweep.mkdir()
    (rank / "windows.json").write_text("{not json")
    (sweep / "sweep.json").write_text('{"rows": 5}')
    with pytest.raises(UsageError, match="windows.json"):
        validate_runs(rank, sweep)
    with pytest.raises(UsageError, match="wrong shape"):
        read_sweep(sweep)
    (rank / "windows.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="wrong shape"):
        validate_runs(rank, sweep)


# --------------------------------------------------------------------------- 14: no run folder after an early failure


def test_rank_max_tokens_1_is_a_usage_error_and_leaves_nothing(tiny_model_dirs, tmp_path):
    _one_line(_cli_rank(tiny_model_dirs["llama"], tmp_path / "run", "--max-tokens", "1"), 2, "--max-tokens")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [PromptError("no usable tokens"), KeyboardInterrupt()])
def test_a_run_that_fails_before_its_first_window_leaves_no_folder(llama, tmp_path, monkeypatch, error):
    from rys_forge.rank import pipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "cache_activations", fail)
    out = tmp_path / "runs" / "deep" / "run"
    with pytest.raises(type(error)):
        _rank(llama, out)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is kept (empty, as it was)
    with pytest.raises(type(error)):
        _rank(llama, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_run_that_fails_after_a_window_keeps_it_for_resume(llama, tmp_path, monkeypatch):
    from rys_forge.rank import pipeline

    real, calls = pipeline.probe_window, []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "probe_window", once)
    with pytest.raises(KeyboardInterrupt):
        _rank(llama, tmp_path / "run")
    assert len(RunFolder.records(tmp_path / "run")) == 1
    monkeypatch.setattr(pipeline, "probe_window", real)
    assert _rank(llama, tmp_path / "run", resume=True).summary["timings"]["windows_probed_this_session"] == 1


def test_a_single_prompt_ranks(llama):
    """One prompt: the deep share (half the prompts) must not round to none."""
    result = rank_windows(llama.model, llama.tokenizer, _prompts()[:1], RankSettings(**FAST), progress=False)
    assert all(math.isfinite(r["score"]) for r in result.rows)


# --------------------------------------------------------------------------- 16: file-system faults are one line


def test_out_in_a_read_only_folder_is_one_line(llama, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if tmp_path / "ro" in (self, *self.parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UsageError, match=r"cannot create the run folder: .*ro/run"):
        _rank(llama, tmp_path / "ro" / "run")


def test_a_full_disk_names_the_file_and_says_resume(llama, tiny_model_dirs, tmp_path, monkeypatch):
    import rys_forge.runs as artifacts  # RunFolder writes through its module's write_atomic

    real_write = artifacts.write_atomic

    def full(path, data):
        if Path(path).name == "windows.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(artifacts, "write_atomic", full)
    with pytest.raises(RysForgeError, match=r"cannot write .*windows\.json: no space left.*--resume --out"):
        _rank(llama, tmp_path / "a")
    assert RunFolder.records(tmp_path / "a")  # the windows stay
    monkeypatch.setattr(artifacts, "write_atomic", real_write)

    def no_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_fsync)
    result = _cli_rank(tiny_model_dirs["llama"], tmp_path / "b")
    _one_line(result, 1, "windows.jsonl", "--resume")


def test_a_torn_log_line_does_not_swallow_the_next_record(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / "windows.jsonl").write_text('{"window": "1:3", "probe_s": 1}\n{"window": "2:4", "to')
    folder.append({"window": "3:5", "probe_s": 2})
    assert set(RunFolder.records(tmp_path)) == {"1:3", "3:5"}


def test_a_second_process_on_a_run_folder_is_refused(llama, tmp_path):
    _rank(llama, tmp_path / "run")
    fd = os.open(tmp_path / "run", os.O_RDONLY)  # another process holding the run folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="in use by another rys-forge process"):
            _rank(llama, tmp_path / "run", resume=True)
    finally:
        os.close(fd)
    _rank(llama, tmp_path / "run", resume=True)  # released: fine again


def test_a_window_parallel_run_needs_a_folder():
    with pytest.raises(UsageError, match="--out"):
        RunFolder.session(None, {}, False, Shard(0, 2), model=torch.nn.Linear(1, 1), model_info=None)


# --------------------------------------------------------------------------- a huge prompt line


def test_a_huge_prompt_is_cut_before_tokenising(llama, monkeypatch):
    seen: list[int] = []
    tokenizer = llama.tokenizer

    class Recording:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return tokenizer(texts, **kwargs)

    huge = "word " * 400_000
    cache = activations_module.cache_activations(llama.model, Recording(), [huge, TEXTS[0]], max_tokens=16, kl_positions=2)
    assert max(seen) <= activations_module.CHARS_PER_TOKEN * 16 and cache.batches
    cut = activations_module.tokenize(tokenizer, TEXTS, 16)["input_ids"]
    assert cut == tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]  # ordinary prompts: unchanged
