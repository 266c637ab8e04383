"""build + verify on tiny models: layer-list exports equal the in-memory repeat and an independent
duplicated-weights reference; corrupted exports fail verification with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from rys_forge.artifacts import check_verified, weight_bytes
from rys_forge.cli import main
from rys_forge.errors import UsageError, VerificationError
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.surgery.builder import build
from rys_forge.verify import verify
from test_repeat import materialised_reference
from tiny import MODEL_TYPES, SLIDING_WINDOW


@pytest.fixture(scope="module")
def layerlist_exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("layerlist")
    return {mt: build(str(tiny_model_dirs[mt]), ["2:5"], root / mt) for mt in MODEL_TYPES}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layerlist_matches_reference(layerlist_exports, tiny_model_dirs, model_type):
    from transformers import AutoModelForCausalLM

    result = layerlist_exports[model_type]
    metrics = result.verification["metrics"]
    assert result.verification["passed"]
    assert metrics["kl_mean"] <= 1e-6 and metrics["max_abs_diff"] <= 1e-4
    assert metrics["generate_cache_equals_no_cache"] and metrics["generate_equals_in_memory"]
    assert abs(metrics["bytes_ratio"] - 1.0) <= 0.01
    # Independent reference: a model materialised with duplicated weights in plan order.
    base = load_model(str(tiny_model_dirs[model_type])).model
    reference = materialised_reference(base, result.plan.order)
    export = AutoModelForCausalLM.from_pretrained(result.path, trust_remote_code=True, attn_implementation="eager").eval()
    ids = torch.randint(4, 300, (2, 3 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (export(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert export.config.num_hidden_layers == len(result.plan.order)
    assert sum(p.numel() for p in export.parameters()) == sum(p.numel() for p in base.parameters())


def test_layerlist_loads_without_rys_forge_and_round_trips(layerlist_exports, tmp_path):
    folder = layerlist_exports["gemma3_text"].path
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["rys_forge"] = None  # any import of rys_forge now fails
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, attn_implementation="eager").eval()
        ids = torch.arange(4, 28).reshape(1, 24)
        with torch.no_grad():
            a = m(ids).logits
        m.save_pretrained({str(tmp_path / 'again')!r})
        m2 = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'again')!r}, trust_remote_code=True, attn_implementation="eager").eval()
        with torch.no_grad():
            b = m2(ids).logits
        assert torch.equal(a, b), (a - b).abs().max()
        assert "rys_forge" not in {{k.split('.')[0] for k, v in sys.modules.items() if v is not None}}
        print("ok", m.config.num_hidden_layers, len(m.model.layers), len(m.model.layers.base_layers()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["11", "11", "8"]
    assert weight_bytes(tmp_path / "again") == weight_bytes(folder)


def test_truncated_weights_fail_verification(layerlist_exports, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(layerlist_exports["llama"].path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VerificationError, match="does not load"):
        verify(folder)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("rys-forge: error: export")


def test_edited_plan_fails_verification(layerlist_exports, tmp_path):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(layerlist_exports["llama"].path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rys"]["plan"]["layer_order"][7] = 0  # no longer what the windows say
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerificationError, match="invalid"):
        verify(folder)
    # A self-consistent new order on a layer-list export is a valid model, but not the one that was
    # verified: the publish gate's hashes catch it.
    config["rys"]["plan"] = LayerPlan.from_windows(["1:4"], 6).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerificationError, match="changed since verification"):
        check_verified(folder)


def test_plan_edit_that_leaves_layer_types_stale_fails(layerlist_exports, tmp_path):
    import shutil

    folder = tmp_path / "stale"
    shutil.copytree(layerlist_exports["gemma3_text"].path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rys"]["plan"] = LayerPlan.from_windows(["0:3"], 8).to_dict()  # 11 visits, as before
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "config.layer_types does not follow the stored plan" in result.output


def test_tampering_after_verification_is_detected(layerlist_exports, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(layerlist_exports["qwen2"].path, folder)
    assert check_verified(folder)["passed"]
    (folder / "modeling_rys.py").write_text((folder / "modeling_rys.py").read_text() + "\n# edited\n")
    with pytest.raises(VerificationError, match="changed since verification"):
        check_verified(folder)


def test_build_refuses_existing_out_and_cli_reports(tiny_model_dirs, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(UsageError, match="--force"):
        build(str(tiny_model_dirs["llama"]), ["2:5"], out)
    result = CliRunner().invoke(main, ["build", "--model", str(tiny_model_dirs["llama"]), "--window", "2:5", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.output
    bad = CliRunner().invoke(main, ["build", "--model", str(tiny_model_dirs["llama"]), "--window", "2:9", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "ends past the model's 6 layers" in bad.output
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3"])
def test_both_formats_agree_and_mergekit_grows(layerlist_exports, tiny_model_dirs, tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    merged = build(str(tiny_model_dirs[model_type]), ["2:5"], tmp_path / "mk", format="mergekit", recipes_dir=tmp_path / "recipes")
    assert merged.verification["passed"] and merged.verification["format"] == "mergekit"
    assert (tmp_path / "mk" / "rys_recipe.yml").exists() and list((tmp_path / "recipes").glob("*.yml"))
    plan = merged.plan
    expected = 1 + plan.extra_layers / plan.num_layers  # the repeated layers' share (embeddings make it a bit less)
    assert 1.0 < merged.verification["metrics"]["bytes_ratio"] <= expected
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", attn_implementation="eager").eval()
    b = AutoModelForCausalLM.from_pretrained(layerlist_exports[model_type].path, trust_remote_code=True, attn_implementation="eager").eval()
    ids = torch.randint(4, 300, (2, 3 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() <= 1e-5


def test_cli_mergekit_build_writes_nothing_outside_out(tiny_model_dirs, tmp_path, monkeypatch):
    """`build --format mergekit` keeps its recipe in the export folder; a recipes folder only when named."""
    monkeypatch.chdir(tmp_path)
    base = str(tiny_model_dirs["llama"])
    result = CliRunner().invoke(main, ["build", "--model", base, "--window", "2:5", "--format", "mergekit", "--out", "mk"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mk"]  # no stray recipes/ in the working directory
    assert (tmp_path / "mk" / "rys_recipe.yml").is_file()
    named = CliRunner().invoke(main, ["build", "--model", base, "--window", "2:5", "--format", "mergekit", "--out", "mk2",
                                      "--no-verify", "--recipes-dir", "kept"])
    assert named.exit_code == 0, named.output
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["llama-rys-2-5.yml"]
    assert (tmp_path / "kept" / "llama-rys-2-5.yml").read_text() == (tmp_path / "mk2" / "rys_recipe.yml").read_text()

