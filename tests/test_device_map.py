"""Big-model placement: a tiny model split by accelerate between the CPU and disk offload (hooks that move
weights in at each layer's forward). The in-memory repeat must stay exact: a visit copy of an offloaded
layer needs its own accelerate hook, else it runs with the weights of no device (or a stale one)."""

from __future__ import annotations

import pytest
import torch

from rys_forge.models import load_model
from rys_forge.plan import LayerPlan, Window
from rys_forge.repeat import repeated
from test_repeat import materialised_reference

pytest.importorskip("accelerate")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_repeat_on_an_offloaded_model_matches_the_materialised_reference(tiny_model_dirs, model_type, tmp_path, monkeypatch):
    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_dirs[model_type]
    plain = load_model(str(folder)).model
    n = plain.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
    for k in range(n):
        device_map[f"model.layers.{k}"] = "disk" if k % 2 else "cpu"  # odd layers offloaded
    split = load_model(str(folder), device_map=device_map, offload_folder=str(tmp_path / "offload")).model
    assert any("_hf_hook" in layer.__dict__ for layer in split.model.layers), "accelerate hooks expected"
    ids = torch.randint(4, plain.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    plan = LayerPlan.from_windows([Window(1, 4)], n, 2)
    reference = materialised_reference(plain, plan.order)
    with torch.no_grad():
        expected = reference(ids).logits
        with repeated(split, plan):
            got = split(ids).logits
            cached = split.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
        again = split(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(cached, reference.generate(ids[:1, :8], max_new_tokens=6, do_sample=False))
    assert (again - plain(ids).logits).abs().max() < 1e-5  # restored


def test_placement_options_parse_and_fail_in_one_line(tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from rys_forge.cli import main
    from rys_forge.models import placement

    assert placement() == {}
    assert placement("auto", "0=70GiB, 1=70GiB,cpu=200GiB") == {
        "device_map": "auto", "max_memory": {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, "offload_folder": None}
    model = str(tiny_model_dirs["llama"])
    for args, fragment in (
        (["--max-memory", "0=1GiB"], "need --device-map"),
        (["--device-map", "everywhere"], "--device-map 'everywhere'"),
        (["--device-map", "auto", "--max-memory", "gpu0:1GiB"], "--max-memory item 'gpu0:1GiB'"),
    ):
        result = CliRunner().invoke(main, ["rank", "--model", model, "--out", str(tmp_path / "r"), *args])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output
        assert not (tmp_path / "r").exists()


def test_rank_with_part_of_the_model_on_disk(tiny_model_dirs, tmp_path, monkeypatch):
    """`--device-map` with a CPU budget that sends layers to disk (accelerate hooks): rank gives the rows of
    the plain run; a layer-list build on such a placement is refused in one line."""
    import json

    from click.testing import CliRunner

    from rys_forge.cli import main

    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    model = str(tiny_model_dirs["llama"])
    size = sum(p.numel() * p.element_size() for p in load_model(model).model.parameters())
    mapped = ["--device-map", "sequential", "--max-memory", f"cpu={size // 2}", "--offload-folder", str(tmp_path / "off")]
    common = ["--model", model, "--prompts-per-family", "1", "--max-tokens", "10", "--jacobian", "none", "--no-progress",
              "--max-width", "3"]
    for name, extra in (("plain", []), ("mapped", mapped)):
        result = CliRunner().invoke(main, ["rank", *common, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    plain, split = (json.loads((tmp_path / n / "windows.json").read_text()) for n in ("plain", "mapped"))
    assert [r["window"] for r in plain] == [r["window"] for r in split]
    for a, b in zip(plain, split):
        for key in ("score", "cka_plateau", "delta_0", "r_0", "d_dec", "d_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["window"], key)
    # A layer-list export shares the base tensors between visits, which weight offloading cannot serve:
    # refused in one line before anything is written.
    result = CliRunner().invoke(main, ["build", "--model", model, "--window", "1:3", "--out", str(tmp_path / "x"), *mapped])
    assert result.exit_code == 2 and "offloads weights to CPU or disk" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_build_and_verify_with_a_device_map_that_keeps_everything_resident(tiny_model_dirs, tmp_path, monkeypatch):
    """`--device-map auto` without offloading (here: the whole model on the CPU): both the base and the
    export load through accelerate's placement, and the layer-list build verifies."""
    import json

    from click.testing import CliRunner

    from rys_forge.cli import main

    monkeypatch.setenv("RYS_FORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x"
    result = CliRunner().invoke(main, ["build", "--model", str(tiny_model_dirs["qwen3"]), "--window", "1:3", "--out", str(out),
                                       "--device-map", "auto"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and report["settings"]["device_map"] == "auto" and report["metrics"]["kl_max"] < 1e-6
