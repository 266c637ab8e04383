"""Faults and bad input around export folders (issue #15): `--force` replaces only what rys-forge wrote, no
code but the generated `modeling_rys.py` is ever executed, exports hold regular files only, NaN never passes a
threshold, unverified exports are not evaluated, SIGTERM leaves no staging folder, nothing is written outside
`--out` that a user owns, and a broken report is a clear one-line error."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rys_forge.artifacts import VERIFICATION_FILE, check_verified, file_hashes
from rys_forge.cli import main
from rys_forge.errors import UsageError, VerificationError
from rys_forge.surgery.builder import build
from rys_forge.verify import THRESHOLDS, verify
from tiny import make_tiny_model

WINDOW = "2:4"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def export(base, tmp_path_factory) -> Path:
    """A verified layer-list export of the tiny llama (copy it before changing anything)."""
    return build(str(base), [WINDOW], tmp_path_factory.mktemp("export") / "ll").path


@pytest.fixture
def no_load(monkeypatch):
    """Any model load by `build` fails the test: the refusals must come before the work."""
    import rys_forge.surgery.builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("build loaded the model before refusing")

    monkeypatch.setattr(builder, "load_model", refuse)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(result, code: int, fragment: str) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("rys-forge: error:"), result.output
    assert "unexpected" not in lines[0] and fragment in lines[0], lines[0]
    return lines[0]


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- 1, 15: --force replaces only rys-forge folders


def test_force_never_replaces_the_base_or_its_parent(base, tmp_path, no_load):
    mine = _copy(base, tmp_path / "models" / "base")
    before = _snapshot(mine)
    for out in (mine, mine.parent, tmp_path):
        with pytest.raises(UsageError, match="base model"):
            build(str(mine), [WINDOW], out, force=True)
    result = CliRunner().invoke(main, ["build", "--model", str(mine), "--window", WINDOW, "--out", str(mine), "--force"])
    _one_line(result, 2, "base model")
    assert _snapshot(mine) == before and not _hidden(mine.parent)


def test_force_refuses_folders_with_foreign_files(export, tmp_path, no_load):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    (user / "config.json").write_text("{}")
    for force in (True, False):
        with pytest.raises(UsageError, match="rys-forge"):
            build("anything", [WINDOW], user, force=force)
    assert (user / "notes.txt").read_text() == "my thesis"
    # an export of rys-forge that the user added a file to is theirs too
    theirs = _copy(export, tmp_path / "theirs")
    (theirs / "results.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="results.csv"):
        build("anything", [WINDOW], theirs, force=True)
    assert (theirs / "results.csv").is_file()
    # verifying the folder hashes the user's file into the report; that does not make it rys-forge's
    verify(theirs)
    assert "results.csv" in json.loads((theirs / VERIFICATION_FILE).read_text())["files"]
    with pytest.raises(UsageError, match="results.csv"):
        build("anything", [WINDOW], theirs, force=True)
    assert (theirs / "results.csv").is_file()


def test_force_refuses_the_current_directory(export, tmp_path, no_load, monkeypatch):
    here = _copy(export, tmp_path / "here")
    monkeypatch.chdir(here)
    with pytest.raises(UsageError, match="current directory"):
        build("anything", [WINDOW], ".", force=True)
    with pytest.raises(UsageError, match="current directory"):
        build("anything", [WINDOW], "..", force=True)


def test_force_out_that_is_a_file_fails_before_loading(tmp_path, no_load):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    result = CliRunner().invoke(main, ["build", "--model", "x/y", "--window", WINDOW, "--out", str(target), "--force"])
    _one_line(result, 2, "out.txt")
    with pytest.raises(UsageError, match="not a folder"):
        build("x/y", [WINDOW], target)
    assert target.read_text() == "keep me"


def test_force_replaces_its_own_export(base, export, tmp_path):
    out = _copy(export, tmp_path / "again")
    (out / "eval.json").write_text("{}")
    (out / "README.md").write_text("card")
    result = build(str(base), ["1:3"], out, force=True, verify=False)
    assert result.plan.windows[0].start == 1 and not (out / "eval.json").exists()
    build(str(base), [WINDOW], out, force=True, verify=False)  # an unverified export of its own is replaceable too
    (out / VERIFICATION_FILE).write_text("[]")  # and one with a garbled report
    build(str(base), [WINDOW], out, force=True, verify=False)
    assert not _hidden(tmp_path)


# --------------------------------------------------------------------------- 1: heal --force keeps the old adapter until the new one passed


@pytest.fixture(scope="module")
def healed(export, tmp_path_factory):
    from rys_forge.heal import HealSettings, heal

    folder = _copy(export, tmp_path_factory.mktemp("healed") / "ll")
    data = folder.parent / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n")
    heal(folder, data, HealSettings(rank=2, steps=2, max_length=32))
    return folder, data


def test_heal_force_keeps_the_old_adapter_when_the_new_one_fails(healed, tmp_path, monkeypatch):
    heal_module = importlib.import_module("rys_forge.heal")
    from rys_forge.heal import HealSettings

    folder = _copy(healed[0], tmp_path / "healed")
    before = _snapshot(folder)

    def failing_verify(path, **kwargs):
        assert (Path(path) / "heal" / "heal.json").is_file()  # the new adapter is checked in place
        raise VerificationError("verification of the new adapter failed")

    monkeypatch.setattr(heal_module, "run_verify", failing_verify)
    with pytest.raises(VerificationError, match="new adapter"):
        heal_module.heal(folder, healed[1], HealSettings(rank=2, steps=1, max_length=32, seed=5), force=True)
    assert _snapshot(folder) == before and not _hidden(folder)
    assert check_verified(folder)["passed"]


def test_heal_force_replaces_its_own_adapter_once_the_new_one_passed(healed, tmp_path):
    from rys_forge.heal import HealSettings, heal

    folder = _copy(healed[0], tmp_path / "healed")
    old = (folder / "heal" / "heal.json").read_bytes()
    result = heal(folder, healed[1], HealSettings(rank=2, steps=1, max_length=32, seed=5), force=True)
    assert result.verification["passed"] and (folder / "heal" / "heal.json").read_bytes() != old
    report = check_verified(folder)  # the previous adapter, kept aside while verifying, is not in the report
    assert not [name for name in report["files"] if name.startswith(".")] and not _hidden(folder)


def test_heal_force_refuses_a_heal_folder_it_did_not_write(export, tmp_path, monkeypatch):
    heal_module = importlib.import_module("rys_forge.heal")

    folder = _copy(export, tmp_path / "ll")
    (folder / "heal").mkdir()
    (folder / "heal" / "my_adapter.safetensors").write_bytes(b"mine")
    data = tmp_path / "data.txt"
    data.write_text("some text here\n")
    monkeypatch.setattr(heal_module, "load_model", lambda *a, **k: pytest.fail("heal loaded the export first"))
    for force in (True, False):  # never replaced, and without --force not invited to be
        with pytest.raises(UsageError, match="not a heal adapter rys-forge wrote"):
            heal_module.heal(folder, data, force=force)
    assert (folder / "heal" / "my_adapter.safetensors").read_bytes() == b"mine"


# --------------------------------------------------------------------------- 2: never execute code rys-forge did not write


def _booby_trap(folder: Path, marker: Path) -> None:
    modeling = folder / "modeling_rys.py"
    modeling.write_text(modeling.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")


def _forge_report(folder: Path) -> None:
    """Make verification.json claim the folder as it is now (an attacker can rewrite it too)."""
    report = json.loads((folder / VERIFICATION_FILE).read_text())
    report["files"] = {rel: digest for rel, digest in file_hashes(folder).items()}
    (folder / VERIFICATION_FILE).write_text(json.dumps(report))


def test_verify_refuses_an_edited_modeling_file_before_running_it(export, tmp_path):
    folder = _copy(export, tmp_path / "edited")
    marker = tmp_path / "ran.txt"
    _booby_trap(folder, marker)
    report = (folder / VERIFICATION_FILE).read_bytes()
    with pytest.raises(VerificationError, match="modeling_rys.py"):
        verify(folder)
    assert not marker.exists()
    assert (folder / VERIFICATION_FILE).read_bytes() == report  # not re-stamped
    result = CliRunner().invoke(main, ["verify", str(folder)])
    _one_line(result, 1, "modeling_rys.py")
    assert not marker.exists()


def test_forged_report_does_not_make_edited_code_publishable_or_runnable(export, tmp_path):
    from rys_forge.evaluate.subject import export_subject
    from rys_forge.heal import heal
    from rys_forge.publish import publish

    folder = _copy(export, tmp_path / "forged")
    marker = tmp_path / "ran.txt"
    _booby_trap(folder, marker)
    _forge_report(folder)
    for call in (lambda: check_verified(folder), lambda: publish(folder, "me/x", dry_run=True),
                 lambda: export_subject(str(folder), None, True)):
        with pytest.raises(VerificationError, match="modeling_rys.py"):
            call()
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    with pytest.raises(VerificationError, match="modeling_rys.py"):
        heal(folder, data)
    assert not marker.exists()


def test_other_code_in_an_export_is_refused(export, tmp_path):
    marker = tmp_path / "ran.txt"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    # a second module the config points transformers at
    folder = _copy(export, tmp_path / "automap")
    (folder / "evil.py").write_text(evil)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.RysForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerificationError, match="evil.py|auto_map"):
        verify(folder)
    # a tokenizer with remote code
    folder = _copy(export, tmp_path / "tokenizer")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.Tok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(VerificationError, match="auto_map"):
        verify(folder)
    assert not marker.exists()


def test_the_generated_export_passes_the_code_check(export, tmp_path):
    from rys_forge.artifacts import check_export

    config, record = check_export(export)
    assert record.format == "layerlist" and config["auto_map"]


# --------------------------------------------------------------------------- 3: regular files only


def test_symlink_in_an_export_is_refused_by_verify_and_publish(export, tmp_path):
    from rys_forge.publish import publish

    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    folder = _copy(export, tmp_path / "linked")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(VerificationError, match="notes.txt"):
        verify(folder)
    report = json.loads((folder / VERIFICATION_FILE).read_text())
    report["files"]["notes.txt"] = "0" * 64
    (folder / VERIFICATION_FILE).write_text(json.dumps(report))
    with pytest.raises(VerificationError, match="notes.txt"):
        publish(folder, "me/x", dry_run=True)
    result = CliRunner().invoke(main, ["publish", str(folder), "--repo-id", "me/x", "--dry-run"])
    _one_line(result, 1, "notes.txt")


def test_fifo_in_an_export_is_refused(export, tmp_path):
    folder = _copy(export, tmp_path / "fifo")
    os.mkfifo(folder / "pipe")
    with pytest.raises(VerificationError, match="pipe"):
        verify(folder)


def test_symlinked_heatmap_is_not_uploaded(export, tmp_path):
    from rys_forge.publish import publish

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"architecture": {"num_layers": 6}}))
    (run / "windows.json").write_text(json.dumps([{"window": WINDOW, "score": 1.0, "class": "x"}]))
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (run / "heatmap_score.png").symlink_to(secret)
    with pytest.raises(UsageError, match="heatmap_score.png"):
        publish(_copy(export, tmp_path / "e"), "me/x", dry_run=True, rank_run=run)


# --------------------------------------------------------------------------- 4: NaN fails every threshold


def test_nan_and_inf_fail_every_threshold():
    from rys_forge.verify import threshold_failures

    good = {"kl_mean": 0.0, "kl_max": 0.0, "max_abs_diff": 0.0, "logit_scale": 1.0, "top1_agreement": 1.0,
            "cache_max_abs_diff": 0.0, "generate_cache_equals_no_cache": True, "generate_equals_in_memory": True,
            "base_weight_bytes": 10, "bytes_ratio": 1.0}
    limits = THRESHOLDS["float32"]
    assert threshold_failures(good, limits, "layerlist", "float32", 1.0) == []
    for key in ("kl_mean", "kl_max", "max_abs_diff", "logit_scale", "top1_agreement", "cache_max_abs_diff", "bytes_ratio"):
        for bad in (float("nan"), float("inf") if key != "logit_scale" else float("nan")):
            assert threshold_failures({**good, key: bad}, limits, "layerlist", "float32", 1.0), (key, bad)
    assert threshold_failures(good, limits, "layerlist", "float32", float("nan"))


def test_a_base_with_nan_weights_does_not_build(base, tmp_path):
    from safetensors.torch import load_file, save_file

    nan_base = _copy(base, tmp_path / "nan-base")
    tensors = load_file(nan_base / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, nan_base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="failed"):
        build(str(nan_base), [WINDOW], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 8: eval only runs verified exports


@pytest.mark.parametrize("fault", ["failed", "missing", "changed"])
def test_eval_refuses_an_unverified_export(export, tmp_path, fault):
    from rys_forge.evaluate.subject import export_subject

    folder = _copy(export, tmp_path / fault)
    report_file = folder / VERIFICATION_FILE
    if fault == "failed":
        report = json.loads(report_file.read_text())
        report.update(passed=False, failures=["mean KL 0.5 > 1e-06"])
        report_file.write_text(json.dumps(report))
    elif fault == "missing":
        report_file.unlink()
    else:
        (folder / "generation_config.json").write_text("{}")
    with pytest.raises(VerificationError, match="verif"):
        export_subject(str(folder), None, True)


def test_eval_cli_refuses_a_failed_export_in_one_line(export, tmp_path):
    pytest.importorskip("lm_eval")
    folder = _copy(export, tmp_path / "failed")
    report = json.loads((folder / VERIFICATION_FILE).read_text())
    report.update(passed=False, failures=["mean KL 0.5 > 1e-06"])
    (folder / VERIFICATION_FILE).write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["eval", str(folder), "--tasks", "rys_arc_easy", "--limit", "2"])
    _one_line(result, 1, "failed verification")
    assert not (folder / "eval.json").exists()


def test_eval_of_a_verified_export_still_resolves(export):
    from rys_forge.evaluate.subject import export_subject

    subject = export_subject(str(export), None, True)
    assert subject.plan is not None and subject.target_folder == str(export)


# --------------------------------------------------------------------------- 10: SIGTERM cleans the staging folder


@pytest.mark.parametrize("via", ["cli", "library"])
def test_sigterm_during_build_leaves_no_staging_folder(base, tmp_path, via):
    out = tmp_path / "out"
    call = (f"from rys_forge.cli import main\nmain(['build', '--model', {str(base)!r}, '--window', '{WINDOW}', '--out', {str(out)!r}])"
            if via == "cli" else f"from rys_forge.surgery.builder import build\nbuild({str(base)!r}, ['{WINDOW}'], {str(out)!r})")
    script = textwrap.dedent(
        """
        import time
        import rys_forge.surgery.builder as builder
        original = builder.export_layerlist
        def slow(*args, **kwargs):
            original(*args, **kwargs)
            print("STAGED", flush=True)
            time.sleep(120)
        builder.export_layerlist = slow
        """
    ) + call
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "STAGED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "STAGED" in line, proc.stderr.read()[-2000:]
        assert _hidden(tmp_path)  # the staging folder exists now
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, -signal.SIGTERM), stderr[-2000:]  # handled, not killed outright
    assert not _hidden(tmp_path) and not out.exists()
    if via == "cli":
        lines = stderr.strip().splitlines()
        assert "Traceback" not in stderr and lines[-1].startswith("rys-forge: error:"), stderr[-2000:]


# --------------------------------------------------------------------------- 12: nothing outside --out that a user owns


def test_recipes_dir_never_overwrites_a_users_file(tmp_path, no_load):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    mine = recipes / "llama-rys-2-4.yml"
    mine.write_text("my own recipe\n")
    with pytest.raises(UsageError, match="llama-rys-2-4.yml"):
        build(str(tmp_path / "llama"), [WINDOW], tmp_path / "mk", format="mergekit", recipes_dir=recipes)
    assert mine.read_text() == "my own recipe\n"


def test_failed_build_leaves_no_recipe_and_no_users_file_overwritten(base, tmp_path, monkeypatch):
    import rys_forge.surgery.builder as builder

    def failing_verify(target, *args, **kwargs):
        (Path(target) / VERIFICATION_FILE).write_text(json.dumps({"passed": False, "failures": ["x"], "files": {}}))
        raise VerificationError("verification failed: x")

    monkeypatch.setattr(builder, "run_verify", failing_verify)
    beside = tmp_path / "mk.verification-failed.json"
    beside.write_text("my notes")
    with pytest.raises(VerificationError):
        build(str(base), [WINDOW], tmp_path / "mk", format="mergekit", recipes_dir=tmp_path / "recipes")
    assert not (tmp_path / "recipes").exists() and not (tmp_path / "mk").exists()
    assert beside.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mk.verification-failed.json"]
    # its own earlier failed report is replaced
    beside.write_text(json.dumps({"passed": False, "failures": ["old"], "files": {}}))
    with pytest.raises(VerificationError):
        build(str(base), [WINDOW], tmp_path / "mk", recipes_dir=tmp_path / "recipes")
    assert json.loads(beside.read_text())["failures"] == ["x"]


def test_recipe_copy_of_rys_forge_is_refreshed(base, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    first = build(str(base), [WINDOW], tmp_path / "a", format="mergekit", recipes_dir=recipes, verify=False)
    copy = recipes / "llama-rys-2-4.yml"
    assert copy.read_text() == (first.path / "rys_recipe.yml").read_text()
    build(str(base), [WINDOW], tmp_path / "b", format="mergekit", recipes_dir=recipes, verify=False)
    assert copy.read_text() == (tmp_path / "b" / "rys_recipe.yml").read_text()


# --------------------------------------------------------------------------- 16: a broken report is a clear error


@pytest.mark.parametrize("text", ["{not json", "[]", '{"passed": true, "files": []}', '{"passed": "yes", "files": {}}', ""])
def test_garbled_verification_report_is_a_clear_error(export, tmp_path, text):
    folder = _copy(export, tmp_path / "garbled")
    (folder / VERIFICATION_FILE).write_text(text)
    with pytest.raises(VerificationError, match="verification.json"):
        check_verified(folder)
    runner = CliRunner()
    _one_line(runner.invoke(main, ["publish", str(folder), "--repo-id", "me/x", "--dry-run"]), 1, "verification.json")
    card = runner.invoke(main, ["card", str(folder)])
    assert card.exit_code == 0 and "unexpected" not in card.output, card.output
    assert "Not valid" in (folder / "README.md").read_text()


# --------------------------------------------------------------------------- questionable: local paths in uploaded files


def test_publish_names_every_local_path_it_uploads(healed, base):
    from rys_forge.publish import publish

    result = publish(healed[0], "me/x", dry_run=True)
    note = next(n for n in result.notes if "local paths" in n)
    assert str(base) in note and str(healed[1].resolve()) in note


def test_mergekit_export_leaves_out_the_bases_remote_code_map(base, tmp_path):
    """A base whose config.json still names hub code (`auto_map`, as Phi-3's does) gives a mergekit export that runs
    no code: the map is left out, and the export passes the code check and verification."""
    remote = _copy(base, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "someone/repo--modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    result = build(str(remote), [WINDOW], tmp_path / "mk", format="mergekit")
    assert "auto_map" not in json.loads((result.path / "config.json").read_text())
    assert check_verified(result.path)["passed"]
