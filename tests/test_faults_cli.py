"""Faults and bad input at the command line (issue #15): every failure is one stderr line, an early Ctrl-C
included; file-system errors name the file and what to do; local models are recorded by absolute path;
an unwritable eval --out fails before any work; library noise stays out of the user's terminal."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from rys_forge.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One tiny llama (the other architectures are not needed here)."""
    from tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("faults") / "llama")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(result, code: int, *fragments: str) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("rys-forge: error:"), result.output
    assert "Traceback" not in result.output and "unexpected" not in lines[0], result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    return lines[0]


# ------------------------------------------------------------------ 9: local models by absolute path


def test_relative_model_path_is_recorded_absolute(tiny, tmp_path, monkeypatch):
    """`build --model llama` run beside the model records the absolute path, so the export names its base
    from any other working folder."""
    monkeypatch.chdir(tiny.parent)
    out = tmp_path / "export"
    result = _run(["build", "--model", tiny.name, "--window", "2:4", "--out", out, "--no-verify"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())["rys"]
    assert record["base_model"] == str(tiny.resolve())
    assert record["base_info"].get("local") is True
    monkeypatch.chdir(tmp_path)
    assert (Path(record["base_model"]) / "config.json").is_file()


def test_owner_name_shaped_local_folder_is_local(tiny, tmp_path, monkeypatch):
    """A relative path shaped like a hub id (`org/name`) that exists is a local folder, recorded absolute;
    one that does not exist stays a hub id."""
    import rys_forge.models as models

    shutil.copytree(tiny, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    folder, info = models.resolve_source("org/name")
    assert folder == str((tmp_path / "org" / "name").resolve()) and info == {"local": True}
    loaded = models.load_model("org/name")
    assert loaded.source == folder and loaded.info["source"] == folder and loaded.path == folder
    canonical_source, is_local_source = models.canonical_source, models.is_local_source
    assert canonical_source("other/name") == "other/name" and not is_local_source("other/name")
    assert canonical_source("./nope") == str(tmp_path.resolve() / "nope")
    assert canonical_source("gemma-3-270m") == "gemma-3-270m"


def test_eval_records_absolute_paths_and_hides_lm_eval_notices(tiny, tmp_path, monkeypatch, caplog):
    """eval.json names the (relative) --model by absolute path; lm-eval's notices about being handed an
    already-loaded model do not reach the user."""
    monkeypatch.chdir(tiny.parent)
    caplog.set_level(logging.INFO)
    result = _run(["eval", "--model", tiny.name, "--window", "2:4", "--tasks", "rys_arc_easy", "--limit", "2",
                   "--out", tmp_path / "ev"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "ev" / "eval.json").read_text())["settings"]
    assert settings["model"] == settings["base"] == str(tiny.resolve())
    notices = [r.getMessage() for r in caplog.records if "`pretrained`" in r.getMessage()]
    assert notices == [] and "`pretrained`" not in result.output


# ------------------------------------------------------------------ 11: outputs checked before any work


def _no_model_loads(monkeypatch):
    from rys_forge.evaluate import harness

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr(harness, "load_model", refuse)


def test_eval_unwritable_out_fails_before_any_work(tiny, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    args = ["eval", "--model", tiny, "--window", "2:4", "--tasks", "rys_arc_easy", "--limit", "2"]
    _one_line(_run([*args, "--out", blocker / "results"]), 2, "cannot write", str(blocker))
    assert blocker.read_text() == "mine\n"
    (tmp_path / "folder.json").mkdir()
    _one_line(_run([*args, "--out", tmp_path / "folder.json"]), 2, "is a folder")


def _lock(monkeypatch, locked: Path) -> None:
    """Make `locked` refuse new files, as a read-only mount or a folder without permission does (simulated:
    root may write anywhere)."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002
        if dir is not None and Path(dir) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".probe"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_eval_read_only_out_fails_before_any_work(tiny, tmp_path, monkeypatch):
    """A folder that refuses new files fails in one line naming it, and nothing is left there."""
    _no_model_loads(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    _lock(monkeypatch, locked)
    line = _one_line(_run(["eval", "--model", tiny, "--window", "2:4", "--tasks", "rys_arc_easy",
                           "--out", locked / "sub"]), 2, str(locked), "permission denied")
    assert "choose" in line and list(locked.iterdir()) == []


def test_every_output_is_checked_before_any_work(tiny, tmp_path, monkeypatch):
    """build, rank, sweep, validate, calibrate, verify: an output that could not be written is refused while
    the options are parsed (one line, exit 2), not after a long build or evaluation; nothing is touched."""
    import rys_forge.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    locked, blocker = tmp_path / "locked", tmp_path / "a-file"
    locked.mkdir()
    blocker.write_text("mine\n")
    _lock(monkeypatch, locked)
    model = ["--model", tiny, "--window", "2:4"]
    cases = [
        (["build", *model, "--out", locked / "export"], str(locked)),
        (["build", *model, "--out", blocker], "is a file where a folder is needed"),
        (["build", *model, "--format", "mergekit", "--out", tmp_path / "ok", "--recipes-dir", blocker / "r"], str(blocker)),
        (["rank", *model, "--out", locked / "run"], str(locked)),
        (["sweep", *model, "--tasks", "rys_arc_easy", "--out", blocker / "run"], str(blocker)),
        (["validate", tmp_path, tmp_path, "--out", locked / "v"], str(locked)),
        (["calibrate", tmp_path, tmp_path, "--out", tmp_path], "is a folder where a file is needed"),
        (["verify", locked], str(locked)),
    ]
    for args, fragment in cases:
        _one_line(_run(args), 2, "cannot write", fragment)
    assert blocker.read_text() == "mine\n" and list(locked.iterdir()) == [] and not (tmp_path / "ok").exists()


# ------------------------------------------------------------------ 13: Ctrl-C at any moment


def _start(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "rys_forge.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, delay, code, word", [(signal.SIGINT, 0.3, 130, "interrupted"),
                                                      (signal.SIGINT, 0.8, 130, "interrupted"),
                                                      (signal.SIGTERM, 1.0, 143, "terminated")])
def test_early_signal_is_one_line(tiny, tmp_path, signum, delay, code, word):
    """SIGINT or SIGTERM while the command is still importing its libraries or starting: one line, exit
    130 / 143, no traceback (not a silent death)."""
    proc = _start(["rank", "--model", tiny, "--out", tmp_path / "run"], {"RYS_FORGE_CACHE": str(tmp_path / "c")})
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith(f"rys-forge: error: {word}"), err


def test_sigterm_runs_the_cleanups_written_for_ctrl_c(tmp_path, monkeypatch):
    """SIGTERM is raised as `Terminated` (a KeyboardInterrupt) in the command, so `finally` blocks and
    `except KeyboardInterrupt` cleanups run (a temporary export folder is removed, as on Ctrl-C)."""
    publish = importlib.import_module("rys_forge.publish")

    staging = tmp_path / ".export.tmp-1"
    seen = []

    def write_card(*args, **kwargs):
        staging.mkdir()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises in here
        except KeyboardInterrupt as exc:
            seen.append(type(exc).__name__)
            raise
        finally:
            staging.rmdir()

    def not_here(signum, frame):  # without the CLI's handler the signal would end the test session
        raise AssertionError("SIGTERM reached the caller's handler, not the command's")

    monkeypatch.setattr(publish, "write_card", write_card)
    previous = signal.signal(signal.SIGTERM, not_here)
    try:
        _one_line(_run(["card", tmp_path]), 143, "terminated (SIGTERM)")
        assert signal.getsignal(signal.SIGTERM) is not_here  # restored for in-process callers
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["Terminated"] and not staging.exists()


@pytest.mark.parametrize("signum, code, fragment", [
    (signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)"),
])
def test_interrupt_inside_a_finaliser_is_not_lost(tmp_path, monkeypatch, signum, code, fragment):
    """A signal that lands while Python runs a `__del__` (garbage collection during the lazy imports, as CI
    once hit) is "unraisable": Python prints "Exception ignored" and carries on. The command must still stop
    with its one line and exit code, not print a traceback and finish as if never interrupted."""
    publish = importlib.import_module("rys_forge.publish")

    finished = []

    class DiesLoudly:
        def __del__(self):
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the handler raises in here, inside the finaliser

    def write_card(*args, **kwargs):
        obj = DiesLoudly()
        del obj
        for _ in range(100):  # the interrupt must arrive in here, after the finaliser
            time.sleep(0.05)
        finished.append(True)

    monkeypatch.setattr(publish, "write_card", write_card)
    previous = sys.unraisablehook
    _one_line(_run(["card", tmp_path]), code, fragment)
    assert not finished and sys.unraisablehook is previous


# ------------------------------------------------------------------ 16: file-system errors in one line


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
])
def test_os_errors_name_the_file_and_what_to_do(tmp_path, monkeypatch, code, fragment):
    publish = importlib.import_module("rys_forge.publish")

    def write_card(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "export" / "README.md"))

    monkeypatch.setattr(publish, "write_card", write_card)
    _one_line(_run(["card", tmp_path / "export"]), 1, str(tmp_path / "export" / "README.md"), fragment)


def test_wrapped_os_error_is_not_unexpected(tmp_path, monkeypatch):
    """A library that wraps the OSError (`raise RuntimeError(...) from exc`, or Rust's `(os error 28)`)."""
    publish = importlib.import_module("rys_forge.publish")

    def write_card(*args, **kwargs):
        raise RuntimeError("safetensors: failed to write: No space left on device (os error 28)")

    monkeypatch.setattr(publish, "write_card", write_card)
    _one_line(_run(["card", tmp_path]), 1, "no space left")


def test_full_disk_during_rank_says_resume_continues(tiny, tmp_path, monkeypatch):
    import rys_forge.rank as rank

    out = tmp_path / "run"

    def rank_windows(*args, out_dir, **kwargs):
        Path(out_dir).mkdir()
        (Path(out_dir) / "run.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / "windows.jsonl"))

    monkeypatch.setattr(rank, "rank_windows", rank_windows)
    _one_line(_run(["rank", "--model", tiny, "--out", out, "--window", "2:4"]), 1,
              str(out / "windows.jsonl"), "no space left", f"--resume --out {out}")


def test_out_under_a_file_is_one_line(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine\n")
    result = _run(["rank", "--model", tiny, "--out", blocker / "run", "--window", "2:4"])
    assert result.exit_code != 0
    _one_line(result, result.exit_code, str(blocker))
    assert blocker.read_text() == "mine\n"


# ------------------------------------------------------------------ 17: library warnings


def test_known_library_warnings_are_silenced_ours_are_not(tiny, tmp_path):
    """transformers' `past_key_values` deprecation notices (raised during rank's forward passes) do not
    reach the user; the filters are precise (another FutureWarning still shows) and undone afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run(["rank", "--model", tiny, "--out", tmp_path / "run", "--window", "2:4", "--jacobian", "none",
                       "--prompts-per-family", "1", "--max-tokens", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    noise = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert noise == []
    import re

    from rys_forge.cli.framework import LIBRARY_WARNINGS

    ours = "--score-config constant 'alpha' is deprecated and will be removed"
    assert not any(re.match(pattern, ours) for _, pattern in LIBRARY_WARNINGS)
    assert not any(f[1] is not None and "past_key_values" in f[1].pattern for f in warnings.filters if f[0] == "ignore")


# ------------------------------------------------------------------ usage errors and questionable items


def test_click_usage_errors_are_one_line():
    _one_line(_run(["build", "--window", "2:4"]), 2, "Missing option '--out'")
    _one_line(_run(["rank", "--no-such-flag"]), 2, "--no-such-flag")
    _one_line(_run(["nope"]), 2, "No such command")


def test_repeats_one_is_refused(tiny, tmp_path):
    """`--repeats 1` visits the block once: the base model itself, not a repeat; refused before any work."""
    out = tmp_path / "export"
    _one_line(_run(["build", "--model", tiny, "--window", "2:4", "--repeats", "1", "--out", out]), 2, "--repeats", "no repeat")
    assert not out.exists()
    _one_line(_run(["eval", "--model", tiny, "--window", "2:4", "--repeats", "1", "--tasks", "rys_arc_easy"]), 2,
              "no repeat")


def test_credentials_in_urls_are_redacted(tmp_path, monkeypatch):
    """A Hub endpoint with credentials (HF_ENDPOINT=https://user:token@host) never reaches the terminal."""
    publish = importlib.import_module("rys_forge.publish")
    from rys_forge.errors import RysForgeError, first_line

    secret = "hf_" + "s3cr3t" * 6

    def run_publish(*args, **kwargs):
        raise RysForgeError(f"Hub request failed: https://bob:{secret}@hub.example.com/api/models (check HF_ENDPOINT)")

    monkeypatch.setattr(publish, "publish", run_publish)
    line = _one_line(_run(["publish", tmp_path, "--repo-id", "me/model"]), 1, "https://***@hub.example.com/api/models")
    assert secret not in line and "bob" not in line
    assert secret not in first_line(ValueError(f"GET https://x:{secret}@h/ failed"))


def test_resume_without_out_is_refused(tiny, tmp_path, monkeypatch):
    """`--resume` continues the run in --out: without --out it would start a new run folder under ./runs."""
    monkeypatch.chdir(tmp_path)
    _one_line(_run(["rank", "--model", tiny, "--resume", "--prompts-per-family", "1"]), 2, "--resume needs --out")
    _one_line(_run(["sweep", "--model", tiny, "--tasks", "rys_arc_easy", "--resume"]), 2, "--resume needs --out")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["eval", "{export}", "--tasks", "rys_arc_easy"],
                                     ["learn-score", "--run", "a", "x", "y", "--run", "b", "x", "y", "-o", "{out}"],
                                     ["calibrate", "x", "y", "-o", "{out}"], ["rank", "--model", "{model}"],
                                     ["validate", "x", "y"], ["heal", "x", "--data", "y"], ["sweep", "--tasks", "t"]])
def test_negative_seed_is_refused_by_every_command(tiny, tmp_path, command):
    args = [str(a).format(export=tmp_path, out=tmp_path / "o.json", model=tiny) for a in command]
    _one_line(_run([*args, "--seed", "-1"]), 2, "--seed")


def test_eval_and_validate_do_not_replace_a_file_they_did_not_write(tiny, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    mine = tmp_path / "e" / "eval.json"
    mine.parent.mkdir()
    mine.write_text('{"mine": 1}\n')
    args = ["eval", "--model", tiny, "--window", "2:4", "--tasks", "rys_arc_easy", "--limit", "2", "--out", mine.parent]
    _one_line(_run(args), 2, "not an eval report rys-forge wrote")
    assert mine.read_text() == '{"mine": 1}\n'
    notes = tmp_path / "v" / "validation.json"
    notes.parent.mkdir()
    notes.write_text("notes\n")
    from rys_forge.research.validate import check_options

    from rys_forge.errors import UsageError
    with pytest.raises(UsageError, match="validate did not write it"):
        check_options(0.1, 10, 0, 10, notes)
    assert notes.read_text() == "notes\n"
    notes.write_text('{"rys_forge_validation": 1}\n')
    check_options(0.1, 10, 0, 10, notes)  # an earlier report: replaced by the next run
