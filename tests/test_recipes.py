"""recipes/ holds the passthrough recipes of the reference exports in docs/results, in sync with the code."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from rys_forge.plan import LayerPlan
from rys_forge.surgery.mergekit_export import plan_to_slices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("reference_recipes", ROOT / "bench" / "reference_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_match_the_code(generator):
    """`python bench/reference_recipes.py` would change nothing (the version line aside)."""
    assert generator.stale() == []
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yml")) == sorted(p.name for p in generator.expected())


def test_stale_recipe_is_reported(generator, tmp_path, monkeypatch):
    monkeypatch.setattr(generator, "RECIPES", tmp_path)
    assert len(generator.stale()) == len(generator.REFERENCES)  # all missing
    assert generator.main([]) == 0 and generator.stale() == []
    first = sorted(tmp_path.glob("*.yml"))[0]
    first.write_text(first.read_text().replace("passthrough", "linear"))
    assert generator.stale() == [f"recipes/{first.name}: differs from what the code generates"]
    versioned = sorted(tmp_path.glob("*.yml"))[1]
    versioned.write_text(re.sub(r"(?m)^# rys-forge version: .*$", "# rys-forge version: 9.9.9", versioned.read_text()))
    assert len(generator.stale()) == 1  # the version line alone does not make a recipe stale


@pytest.mark.parametrize("index", [0, 1])
def test_recipe_is_the_recorded_plan(generator, index):
    """Each recipe is a valid mergekit passthrough configuration whose slices run the plan in docs/results."""
    import yaml
    from mergekit.config import MergeConfiguration

    name, results = generator.REFERENCES[index]
    plan = LayerPlan.from_dict(json.loads((ROOT / results).read_text())["settings"]["plan"])
    path = next(p for p in generator.expected() if p.name.startswith(f"{name}-rys-"))
    parsed = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    assert parsed.merge_method == "passthrough"
    slices = [tuple(s.sources[0].layer_range) for s in parsed.slices]
    assert slices == plan_to_slices(plan.order)
    assert [k for a, b in slices for k in range(a, b)] == list(plan.order)
    assert f"# layer order (base layer index of each visit): {list(plan.order)}" in path.read_text()
