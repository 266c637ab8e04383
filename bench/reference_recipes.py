"""Regenerate `recipes/`: the mergekit passthrough recipes of the reference exports in docs/results.

Each reference export is a built-in model and the results file that records its plan (`settings.plan` of an
`eval.json`); its recipe is what `rys-forge build MODEL --window ... --format mergekit` runs, with the base named
by its Hub id instead of the builder's local conversion folder, so the file is portable. Nothing is loaded or
built: the text comes from `rys_forge.surgery.mergekit_export.recipe_yaml`.

    python bench/reference_recipes.py           # rewrite recipes/*.yml
    python bench/reference_recipes.py --check   # exit 1 if a recipe is missing or differs (tests/test_recipes.py)

The `# rys-forge version:` header line records the version that wrote the file; `--check` ignores it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rys_forge.models import BUILTIN_MODELS
from rys_forge.plan import LayerPlan
from rys_forge.surgery.mergekit_export import default_recipe_name, recipe_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
#: (built-in model, results file recording the plan) of each reference export.
REFERENCES = [
    ("gemma-3-270m", "docs/results/eval_gemma-3-270m_6-10_h100_full_suite.json"),
    ("smollm2-135m", "docs/results/eval_smollm2-135m_4-8_healed_h100.json"),
]
DTYPE = "float32"  # the built-ins are GGUF files dequantised to float32
_VERSION_LINE = re.compile(r"^# rys-forge version: .*$", re.M)


def expected(version: str | None = None) -> dict[Path, str]:
    """recipe file -> its text, for every reference export."""
    from rys_forge.artifacts import rys_forge_version

    texts = {}
    for name, results in REFERENCES:
        model = BUILTIN_MODELS[name]
        plan = LayerPlan.from_dict(json.loads((ROOT / results).read_text())["settings"]["plan"])
        label = f"{model.hub_id} (rys-forge built-in {name}: {model.description}; plan from {results})"
        text = recipe_yaml(model.hub_id, plan, DTYPE, version or rys_forge_version(), base_label=label)
        texts[RECIPES / f"{default_recipe_name(name, plan)}.yml"] = text
    return texts


def stale() -> list[str]:
    """Recipes that are missing or differ from what the code generates (the version line aside)."""
    problems = []
    for path, text in expected().items():
        if not path.is_file():
            problems.append(f"recipes/{path.name}: missing")
        elif _VERSION_LINE.sub("", path.read_text(encoding="utf-8")) != _VERSION_LINE.sub("", text):
            problems.append(f"recipes/{path.name}: differs from what the code generates")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a recipe is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        print("\n".join(problems) or "recipes/ is up to date")
        return 1 if problems else 0
    RECIPES.mkdir(exist_ok=True)
    for path, text in expected().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote recipes/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
