"""GGUF export of a plan (`rys_forge.surgery.gguf_export`, `rys_forge.gguf_file`) on the two real built-in GGUFs,
and `build --format gguf` through verify, eval, card and publish.

Marked `real` (like `test_real_models.py`): each module-scoped export is written once under a temporary folder;
the first structure check converts the base GGUF into the rys-forge cache (~1 min). The llama.cpp check is
skipped when llama-cpp-python is not installed.
"""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from rys_forge.errors import UsageError
from rys_forge.files import sha256_file
from rys_forge.plan import LayerPlan
from rys_forge.surgery.gguf_export import export_gguf
from rys_forge.gguf_file import (
    LLAMACPP_KL_FACTOR,
    LLAMACPP_KL_SLACK,
    STRUCTURE_KL_MAX,
    base_gguf_path,
    check_gguf_llamacpp,
    check_gguf_structure,
    compare_gguf_tensors,
    expected_extra_bytes,
    gguf_block_count,
    llamacpp_available,
    read_gguf_plan,
)

pytestmark = pytest.mark.real

#: (built-in, GGUF architecture, base block count, windows). gemma's 4:8 repeats full-attention layer 5.
CASES = {
    "gemma-one": ("gemma-3-270m", "gemma3", 18, ["4:8"]),
    "smollm2-one": ("smollm2-135m", "llama", 30, ["10:14"]),
    "smollm2-two": ("smollm2-135m", "llama", 30, ["4:6", "20:24"]),
}
TEXTS = ["The capital of France is", "def add(a, b):\n    return"]


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(built-in, arch, base path, plan, GgufExport, reader of the export, reader of the base): parsed once
    (GGUFReader takes seconds on gemma's 262k-token vocabulary)."""
    from gguf import GGUFReader

    name, arch, layers, windows = CASES[request.param]
    try:
        base = base_gguf_path(name)
    except Exception as exc:  # pragma: no cover - CI installs both packages
        pytest.skip(str(exc))
    plan = LayerPlan.from_windows(windows, layers)
    out = export_gguf(base, plan, tmp_path_factory.mktemp("gguf") / f"{name}-rys.gguf")
    return name, arch, base, plan, out, GGUFReader(out.path), GGUFReader(base)


def test_metadata_is_remapped_and_plan_recorded(exported):
    name, arch, base, plan, out, new, old = exported
    get = lambda r, key: r.get_field(key).contents()  # noqa: E731
    assert get(new, f"{arch}.block_count") == len(plan.order)
    assert get(new, "rys.order") == list(plan.order)
    assert get(new, "rys.scales") == [1.0] * len(plan.order)
    assert get(new, "rys.windows") == ",".join(str(w) for w in plan.windows)
    assert get(new, "rys.base_sha256") == out.base_sha256
    assert get(new, "general.name") == f"{get(old, 'general.name')}-RYS-{','.join(str(w) for w in plan.windows)}"
    assert read_gguf_plan(out.path) == plan
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", f"{arch}.embedding_length"):
        assert get(new, key) == get(old, key)
    if arch == "gemma3":  # llama.cpp's implicit period-6 pattern, written out and remapped
        base_swa = [k % 6 < 5 for k in range(18)]
        assert get(new, f"{arch}.attention.sliding_window_pattern") == [base_swa[k] for k in plan.order]


def test_tensors_are_copied_byte_for_byte(exported):
    *_, plan, out, new_reader, old_reader = exported
    new = {t.name: t for t in new_reader.tensors}
    old = {t.name: t for t in old_reader.tensors}
    block = [n.split(".", 2)[2] for n in old if n.startswith("blk.0.")]
    for n, k in enumerate(plan.order):
        for suffix in block:
            a, b = new[f"blk.{n}.{suffix}"], old[f"blk.{k}.{suffix}"]
            assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
            assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8))
    assert len(new) == len(old) + plan.extra_layers * len(block)


def test_size_is_base_plus_repeated_tensors(exported):
    *_, plan, out, _, old = exported
    block_bytes = Counter()
    for t in old.tensors:
        if t.name.startswith("blk."):
            block_bytes[int(t.name.split(".")[1])] += int(t.n_bytes)
    visits = Counter(plan.order)
    assert out.extra_tensor_bytes == sum((visits[k] - 1) * block_bytes[k] for k in block_bytes) > 0
    assert out.size == out.path.stat().st_size == out.base_size + out.extra_tensor_bytes + out.overhead
    assert 0 < out.overhead < 16_384  # the rys.* keys, the longer name and the pattern array, plus padding


def test_structure_matches_in_memory_repeat(exported):
    name, *_, out, _, _ = exported
    numbers = check_gguf_structure(out.path, name, texts=TEXTS, expected_sha256=out.sha256)
    assert numbers["tensor_mismatches"] == 0 and numbers["metadata_mismatches"] == 0
    assert numbers["base_sha256_match"] == 1 and numbers["sha256_match"] == 1
    assert numbers["kl_max"] <= STRUCTURE_KL_MAX, numbers
    assert numbers["passed"] == 1 and numbers["top1"] == 1


def test_one_tampered_byte_is_detected(tmp_path):
    base = base_gguf_path("smollm2-135m")
    plan = LayerPlan.from_windows(["10:14"], 30)
    out = export_gguf(base, plan, tmp_path / "rys.gguf")
    assert expected_extra_bytes(base, plan) == out.extra_tensor_bytes
    tampered = tmp_path / "tampered.gguf"
    shutil.copyfile(out.path, tampered)
    from gguf import GGUFReader

    last = [t for t in GGUFReader(out.path).tensors if t.name.startswith(f"blk.{len(plan.order) - 1}.")][0]
    with tampered.open("r+b") as handle:  # flip one bit inside the last visit's first tensor
        handle.seek(int(last.data_offset) + 7)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    assert sha256_file(tampered) != out.sha256 and sha256_file(out.path) == out.sha256
    assert compare_gguf_tensors(out.path, base)["tensor_mismatches"] == 0
    numbers = compare_gguf_tensors(tampered, base)
    assert numbers["tensor_mismatches"] == 1 and numbers["metadata_mismatches"] == 0


def test_damped_plan_and_safetensors_base_are_refused(tmp_path):
    base = base_gguf_path("smollm2-135m")
    damped = LayerPlan.from_windows(["10:14"], 30, alpha=0.5)
    with pytest.raises(UsageError, match="per-visit residual scale"):
        export_gguf(base, damped, tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="GGUF export needs a GGUF base"):
        base_gguf_path(str(tmp_path))
    with pytest.raises(UsageError, match="plan is for 18 layers"):
        export_gguf(base, LayerPlan.from_windows(["4:8"], 18), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
def test_llamacpp_adds_no_error_beyond_the_quantisation_floor(exported):
    name, *_, out, _, _ = exported
    numbers = check_gguf_llamacpp(out.path, name, texts=TEXTS, greedy_tokens=8)
    # llama.cpp quantises activations, so neither KL is 0; the export must not add error of its own.
    # Measured ratios 1.5-1.8; the gemma export without its sliding-window pattern array gives 3.4.
    assert numbers["kl_mean"] <= LLAMACPP_KL_FACTOR * numbers["floor_kl_mean"] + LLAMACPP_KL_SLACK, numbers
    assert numbers["top1"] >= 0.9 * numbers["floor_top1"]


@pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
def test_identity_export_runs_bitwise_like_the_base_in_llamacpp(tmp_path):
    from llama_cpp import Llama

    base = base_gguf_path("smollm2-135m")
    out = export_gguf(base, LayerPlan.identity(30), tmp_path / "identity.gguf")
    assert out.extra_tensor_bytes == 0 and out.size - out.base_size == out.overhead
    ids = [1, 504, 3575, 282, 4649, 314, 253, 1345]
    logits = []
    for path in (base, out.path):
        llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, seed=0)
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)]))
        llm.close()
    assert np.array_equal(logits[0], logits[1])


#: `build --format gguf` through the CLI: gemma one window, smollm2 a two-window plan.
PIPELINE = {"gemma-one": ("gemma-3-270m", ["4:8"]), "smollm2-two": ("smollm2-135m", ["4:6", "20:24"])}


@pytest.fixture(scope="module", params=list(PIPELINE))
def built(request, tmp_path_factory):
    """(built-in, windows, export folder, build output) of one `rys-forge build --format gguf`."""
    from click.testing import CliRunner

    from rys_forge.cli import main

    name, windows = PIPELINE[request.param]
    out = tmp_path_factory.mktemp("build") / "export"
    args = ["build", "-m", name, "--format", "gguf", "--out", str(out), *[a for w in windows for a in ("--window", w)]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return name, windows, out, result.output


def test_build_gguf_verifies_cards_and_publishes(built):
    """The folder holds the .gguf, rys.json and a passing report (KL 0 against the in-memory repeat, no tensor or
    metadata mismatch, llama.cpp within its factor where installed); its size is the base's plus the repeated
    blocks; the card is a GGUF card; publish --dry-run lists the file."""
    import json

    from click.testing import CliRunner

    from rys_forge.cli import main
    from rys_forge.publish import render_card

    name, windows, out, output = built
    base = base_gguf_path(name)
    plan = LayerPlan.from_windows(windows, gguf_block_count(base))
    gguf = [p for p in out.iterdir() if p.suffix == ".gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf[0].name, "rys.json", "verification.json"])
    report = json.loads((out / "verification.json").read_text())
    metrics = report["metrics"]
    assert report["passed"] and report["format"] == "gguf" and report["failures"] == []
    assert metrics["kl_max"] <= STRUCTURE_KL_MAX and metrics["generate_equals_in_memory"]
    assert metrics["gguf_tensor_mismatches"] == 0 and metrics["gguf_metadata_mismatches"] == 0
    extra = metrics["export_weight_bytes"] - metrics["base_weight_bytes"] - expected_extra_bytes(base, plan)
    assert metrics["base_weight_bytes"] == base.stat().st_size and 0 < extra < 16384  # metadata and padding only
    if llamacpp_available():
        assert metrics["llamacpp_kl_ratio"] <= LLAMACPP_KL_FACTOR + LLAMACPP_KL_SLACK / metrics["llamacpp_floor_kl_mean"]
        assert "llama.cpp: mean KL" in output
    else:
        assert metrics["llamacpp"].startswith("not run")
    record = json.loads((out / "rys.json").read_text())
    assert record["format"] == "gguf" and record["base_model"] == name and record["plan"] == plan.to_dict()
    card = render_card(out, repo_id="me/rys-gguf")
    assert card.metadata["library_name"] == "gguf" and "gguf" in card.metadata["tags"]
    assert f"llama-cli -m {gguf[0].name}" in card.text and "GGUF check" in card.text
    dry = CliRunner().invoke(main, ["publish", str(out), "--repo-id", "me/rys-gguf", "--dry-run"])
    assert dry.exit_code == 0 and gguf[0].name in dry.output, dry.output


def test_tampered_gguf_export_is_refused(built, tmp_path):
    """One bit flipped in the last visit's first tensor: publish refuses (changed since verification) and verify
    fails on the tensor bytes, each in one line."""
    import json

    from click.testing import CliRunner
    from gguf import GGUFReader

    from rys_forge.cli import main

    name, windows, out, _ = built
    if name != "smollm2-135m":
        pytest.skip("one model is enough for the tamper check")
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    gguf = next(p for p in copy.iterdir() if p.suffix == ".gguf")
    visits = json.loads((copy / "rys.json").read_text())["plan"]["layer_order"]
    last = next(t for t in GGUFReader(gguf).tensors if t.name.startswith(f"blk.{len(visits) - 1}."))
    with gguf.open("r+b") as handle:
        handle.seek(int(last.data_offset) + 7)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    runner = CliRunner()
    refused = runner.invoke(main, ["publish", str(copy), "--repo-id", "me/x", "--dry-run"])
    assert refused.exit_code != 0 and "changed since verification" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    failed = runner.invoke(main, ["verify", str(copy)])
    assert failed.exit_code != 0 and "1 tensors and 0 metadata values differ" in failed.output


def test_eval_of_a_gguf_export_equals_the_in_memory_repeat(built, tmp_path, monkeypatch):
    """`eval EXPORT` on the GGUF export gives the per-item results of `eval --model --window` (KL 0 exports)."""
    from rys_forge.evaluate import evaluate

    name, windows, out, _ = built
    if name != "smollm2-135m":
        pytest.skip("one model is enough for eval")
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    tasks = ["rys_piqa", "rys_arc_easy"]
    exported = evaluate(str(out), tasks=tasks, limit=4, progress=False)
    in_memory = evaluate(model=name, windows=windows, tasks=tasks, limit=4, progress=False)
    for task, metric in [("rys_piqa", "acc"), ("rys_arc_easy", "acc_norm")]:
        assert exported.items[task]["none"][metric] == in_memory.items[task]["none"][metric]
    assert exported.settings["plan"] == in_memory.settings["plan"]


def test_gguf_build_refuses_bad_input_in_one_line(tiny_model_dirs, tmp_path):
    """A transformers base of an architecture the GGUF writer does not cover, a damped plan and another dtype are
    refused before anything is written."""
    from click.testing import CliRunner

    from rys_forge.cli import main

    out = tmp_path / "out"
    cases = [
        (["-m", str(tiny_model_dirs["gemma3_text"]), "--window", "1:3"], "from a transformers base supports llama"),
        (["-m", "smollm2-135m", "--window", "10:14", "--alpha", "0.5"], "no per-visit residual scale"),
        (["-m", "smollm2-135m", "--window", "10:14", "--dtype", "bfloat16"], "verified in float32"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["build", *args, "--format", "gguf", "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
