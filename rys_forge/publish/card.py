"""`card` and `publish`: a generated model card, and a verified push of an export to the Hugging Face Hub.

The card (`README.md` of the export) is rendered from `rys_forge/publish/templates/model_card.md` through
`huggingface_hub.ModelCard.from_template` with `ModelCardData` metadata (`base_model`, `base_model_relation: merge`,
`library_name: transformers`, `license` inherited from the base, `pipeline_tag: text-generation`, tags). It states
the base, the explicit layer plan, unique vs effective parameters (read from the safetensors headers, no model
load), the extra compute per token, how to load the model, the verification table, the `eval.json` table with
deltas, standard errors and p-values, and, given a `rank` run folder, the window's probe metrics and score heatmap.
The output is deterministic: the only date in it is the export's recorded `created`. A PEFT adapter merged into the
base at build time (`rys.adapter`) is named in the base section; a healed export (`heal/`, per-visit LoRA adapters
from `rys-forge heal`) gets a healing section with its training settings and loss, and a loading snippet with peft.

Publishing::

    rys-forge card out/gemma-rys-6-10 --rank-run runs/rank-gemma
    rys-forge publish out/gemma-rys-6-10 --repo-id me/gemma-3-270m-rys-6-10 --dry-run
    rys-forge publish out/gemma-rys-6-10 --repo-id me/gemma-3-270m-rys-6-10

`publish` refuses folders that are not verified or changed since verification (`verify.check_verified`), needs a
token (`hf auth login` or `HF_TOKEN`; never printed or logged), refuses an existing repo unless `exist_ok`, writes
the card, creates the repo, uploads the export (hidden files and `__pycache__` left out; the score heatmap added
from the rank run, since a file added to the export would break its verification hashes), then lists the repo and
checks every uploaded file's size and hash (sha256 for LFS/xet files, the git blob id for regular ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rys_forge.errors import RysForgeError, UsageError, VerificationError, first_line
from rys_forge.files import sha256_file, write_atomic
from rys_forge.plan import LayerPlan
from rys_forge.verify import REPORT, check_verified, read_rys_config

__all__ = [
    "CARD_FILE",
    "HEATMAP_FILE",
    "HubAuthError",
    "PublishError",
    "PublishResult",
    "RenderedCard",
    "RepoExistsError",
    "count_parameters",
    "format_result",
    "publish",
    "render_card",
    "write_card",
]

CARD_FILE = "README.md"
#: Name of the rank run's score heatmap in the published repo.
HEATMAP_FILE = "rys_heatmap_score.png"
EVAL_FILE = "eval.json"
TEMPLATE = "model_card.md"
TAGS = ["rys", "rys-forge", "layer-repeat"]
SIGNIFICANCE = 0.05
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN to a write token)"


class PublishError(RysForgeError):
    """Publishing failed: offline mode, the Hub refused a request, or the upload could not be confirmed."""


class HubAuthError(PublishError):
    """No Hugging Face token, or the Hub rejected it."""


class RepoExistsError(UsageError):
    """The target repo exists and `exist_ok` was not given."""


# --------------------------------------------------------------------------- small helpers


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _g(value: Any, digits: int = 4) -> str:
    """Compact float (`.4g`); `-` for missing or non-finite."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    number = _num(value)
    return "-" if number is None else f"{number:.{digits}g}"


def _f(value: Any) -> str:
    """Scores and standard errors: 4 decimals, scientific outside [1e-3, 1e4)."""
    number = _num(value)
    if number is None:
        return "-"
    if number != 0 and not 1e-3 <= abs(number) < 1e4:
        return f"{number:.3e}"
    return f"{number:.4f}"


def _signed(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else ("+" if number > 0 else "") + _f(number)


def _p(value: Any) -> str:
    number = _num(value)
    if number is None:
        return "-"
    return f"{number:.2e}" if number < 1e-3 else f"{number:.3f}"


def _ratio(value: Any) -> str:
    number = _num(value)
    return "-" if number is None else f"{number:.3f}x"


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _bytes(count: Any) -> str:
    number = _num(count)
    if number is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if number >= size:
            return f"{number / size:.2f} {unit}"
    return f"{int(number)} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _window_text(window: str) -> str:
    i, j = (int(x) for x in window.split(":"))
    layers = f"layer {i}" if j - i == 1 else f"layers {i}..{j - 1}"
    return f"`{window}` ({layers})"


def _runs(order: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive base indices as half-open ranges (mergekit's slices)."""
    runs: list[tuple[int, int]] = []
    start = prev = int(order[0])
    for k in order[1:]:
        if int(k) != prev + 1:
            runs.append((start, prev + 1))
            start = int(k)
        prev = int(k)
    runs.append((start, prev + 1))
    return runs


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None


def _card_version() -> str:
    from rys_forge import __version__

    return __version__


# --------------------------------------------------------------------------- parameters


@dataclass
class ParameterCount:
    """Parameters of an export from its safetensors headers.

    Attributes:
        unique: parameters of the base model (each stored tensor once; tied embeddings once).
        effective: parameters executed per token, counting each visit of a layer (the size of the equivalent
            model with duplicated layers).
        base_layers: parameters of the base's decoder layers (all of them, once).
        visit_layers: parameters of the decoder layers summed over the plan's visits.
    """

    unique: int
    effective: int
    base_layers: int
    visit_layers: int

    @property
    def extra_layer_fraction(self) -> float:
        """Extra decoder-layer FLOPs (and KV cache) per token relative to the base."""
        return self.visit_layers / self.base_layers - 1 if self.base_layers else float("nan")


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = list(entry["shape"])
    return shapes


def count_parameters(folder: str | Path, plan: LayerPlan, *, per_visit: bool | None = None) -> ParameterCount | None:
    """Unique and effective parameter counts of an export from its safetensors headers (no model load).

    Layer tensors are found by name (`...layers.<n>....`). A layer-list export stores base layers (indices
    `0..L-1`); a mergekit export stores one copy per visit (indices `0..len(order)-1`), mapped back to base
    layers through the plan. `per_visit` says which (default: guessed from the largest layer index).
    Returns None when the folder has no safetensors files.
    """
    shapes = _safetensors_shapes(Path(folder))
    if not shapes:
        return None
    per_index: dict[int, int] = {}
    other = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        match = _LAYER_RE.search(name)
        if match:
            per_index[int(match.group(1))] = per_index.get(int(match.group(1)), 0) + numel
        else:
            other += numel
    visits = len(plan.order)
    if per_visit is None:
        per_visit = bool(per_index) and max(per_index) + 1 == visits and visits != plan.num_layers
    if per_visit:
        # One stored copy per visit (mergekit passthrough): base layer k is the first visit of k.
        per_base = {}
        for v, k in enumerate(plan.order):
            per_base.setdefault(k, per_index.get(v, 0))
        visit_layers = sum(per_index.values())
    else:
        per_base = per_index
        visit_layers = sum(per_base.get(k, 0) for k in plan.order)
    base_layers = sum(per_base.values())
    return ParameterCount(other + base_layers, other + visit_layers, base_layers, visit_layers)


# --------------------------------------------------------------------------- card sections


@dataclass
class RenderedCard:
    """A rendered card and the files it refers to.

    Attributes:
        text: the full `README.md` (YAML metadata + Markdown).
        assets: files the card shows that are not part of the export, `{name in repo: source path}`
            (the rank run's score heatmap); `publish` uploads them next to the card.
        metadata: the card's metadata as a dict.
    """

    text: str
    assets: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config if "num_hidden_layers" in config else config.get("text_config") or config


def _base_facts(config: dict[str, Any]) -> dict[str, Any]:
    rys = config["rys"]
    info = rys.get("base_info") or {}
    source = str(rys.get("base_model") or "")
    hub_id = info.get("base_model")
    if not hub_id and _HUB_ID_RE.match(source) and not source.endswith(".gguf") and not Path(source).expanduser().exists():
        hub_id = source
    model_type = str(config.get("model_type") or _text_config(config).get("model_type") or "")
    license_ = info.get("license") or ("gemma" if model_type.startswith("gemma") else None)
    name = hub_id or (Path(source).name if source else "unknown base")
    adapter = rys.get("adapter") if isinstance(rys.get("adapter"), dict) else None
    return {"hub_id": hub_id, "source": source, "info": info, "model_type": model_type, "license": license_, "name": name,
            "adapter": adapter}


def _adapter_text(adapter: dict[str, Any]) -> str:
    """`LORA r=8 alpha=16 on q_proj, v_proj` from `name`: the adapter's type, size and targets, by its folder name."""
    from rys_forge.adapters import describe_adapter

    path = str(adapter.get("path") or "?")
    label = path if not adapter.get("local") else Path(path).name
    return f"`{label}` ({describe_adapter(adapter, with_path=False)})"


def _read_heal(folder: Path) -> dict[str, Any] | None:
    """heal/heal.json of a healed export, or None."""
    from rys_forge.heal import HEAL_DIR, HEAL_FILE, heal_adapter_dir

    if heal_adapter_dir(folder) is None:
        return None
    path = folder / HEAL_DIR / HEAL_FILE
    return _read_json(path, "heal record") if path.is_file() else {}


def _weights_statement(base: dict[str, Any], heal: dict[str, Any] | None) -> str:
    repeat = 'The\nmodel simply runs a block of its decoder layers more than once ("Repeat Your Self", RYS).'
    if not base.get("adapter") and heal is None:
        return "No weight was trained, merged from another model or changed: every parameter is the base model's own. " + repeat
    parts = []
    if base.get("adapter"):
        parts.append("The base weights include a PEFT adapter merged in before the repeat (see Base model).")
    if heal is not None:
        parts.append("Small LoRA adapters, one per repeated visit, were trained afterwards to heal the repeat (see"
                     " Healing); the base weights stay frozen and are stored once.")
    else:
        parts.append("Nothing was trained by rys-forge.")
    return " ".join(parts) + " " + repeat.replace("The\nmodel", "The model")


def _heal_section(heal: dict[str, Any], repo: str) -> str:
    settings, data, loss = heal.get("settings") or {}, heal.get("data") or {}, heal.get("loss") or {}
    adapter = heal.get("adapter") or {}
    visits = ", ".join(f"{v['visit']} (layer {v['layer']})" for v in adapter.get("visits") or [])
    rows = [
        ["adapted visits (position in the order, base layer)", visits or "?"],
        ["adapted modules per visit", ", ".join(adapter.get("modules") or []) or "?"],
        ["LoRA rank / alpha", f"{_g(settings.get('rank'))} / {_g(settings.get('alpha'))}"],
        ["trainable parameters", f"{adapter.get('trainable_parameters', 0):,}"],
        ["steps, learning rate, batch", f"{_g(settings.get('steps'))}, {_g(settings.get('lr'))},"
         f" {_g(settings.get('batch_size'))} x {_g(data.get('block_tokens'))} tokens"],
        ["KL(unhealed ‖ healed) weight", _g(settings.get("kl_weight"))],
        ["training data", f"{_g(data.get('texts'))} texts, {_g(data.get('blocks'))} blocks (sha256"
         f" `{str(data.get('sha256', '?'))[:12]}`)"],
        ["next-token loss on the data, before -> after", f"{_g(loss.get('before'))} -> {_g(loss.get('after'))}"
         f" ({_g(loss.get('eval_blocks'))} blocks)"],
    ]
    code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="heal")\n')
    return "\n".join([
        "Each repeated visit has its own LoRA adapter (a LoRA on the shared layer would apply to every visit);"
        " the base weights are frozen and shared. The adapter is a standard PEFT adapter in `heal/`"
        " (`heal/heal.json` holds the settings and the loss curve); without it the model is the plain repeat.",
        "",
        _table(["", "value"], rows),
        "",
        f"```python\n{code}```",
    ])


def _base_section(base: dict[str, Any], num_layers: int) -> str:
    lines = []
    if base["hub_id"]:
        lines.append(f"- Base: [{base['hub_id']}](https://huggingface.co/{base['hub_id']}) ({num_layers} decoder layers,"
                     f" `model_type: {base['model_type']}`)")
    else:
        lines.append(f"- Base: `{base['name']}`, a local model without a recorded Hub id ({num_layers} decoder layers,"
                     f" `model_type: {base['model_type']}`)")
    info = base["info"]
    if info.get("description"):
        lines.append(f"- Weights: {info['description']}")
    if info.get("gguf_file"):
        lines.append(f"- Converted from the GGUF file `{info['gguf_file']}` (dequantised on load): the weights are the"
                     " GGUF's, not the original checkpoint's.")
    if base.get("adapter"):
        lines.append(f"- Adapter: {_adapter_text(base['adapter'])}, merged into the base weights"
                     " (`merge_and_unload`) before the layer plan was applied.")
    if base["license"] == "gemma":
        lines.append("- Licence: `gemma`. Gemma is provided under and subject to the Gemma Terms of Use,"
                     " https://ai.google.dev/gemma/terms; this derivative is distributed under the same terms.")
    elif base["license"]:
        lines.append(f"- Licence: `{base['license']}`, inherited from the base model.")
    else:
        lines.append("- Licence: not recorded. The base model's licence applies; check it before using or sharing"
                     " this model.")
    return "\n".join(lines)


def _plan_section(plan: LayerPlan, fmt: str) -> str:
    visits = len(plan.order)
    lines = []
    if plan.windows:
        windows = ", ".join(_window_text(str(w)) for w in plan.windows)
        times = "twice" if plan.repeats == 2 else f"{plan.repeats} times"
        lines.append(f"- Repeated window{'s' if len(plan.windows) > 1 else ''}: {windows}, each run {times} in a row.")
    else:
        lines.append("- An explicit layer order (no windows recorded).")
    lines.append("- Convention: a window `i:j` means layers i..j-1, 0-based (half-open like Python slices; mergekit's"
                 " `layer_range: [i, j]` and David Ng's `(i, j)` agree, ExLlamaV3's `layer_map` ranges are inclusive).")
    lines.append(f"- Execution order, the base layer index of each of the {visits} visits ({plan.num_layers} base"
                 f" layers, {plan.extra_layers:+d}):")
    lines.append("")
    lines.append(f"  `{list(plan.order)}`")
    lines.append("")
    runs = ", then ".join(f"{a}..{b - 1}" for a, b in _runs(plan.order))
    lines.append(f"- As contiguous runs of base layers: {runs}.")
    lines.append("- The explicit order is stored in `config.json` (`rys.plan.layer_order`) and is what the model"
                 " executes; notations for ranges differ between tools, the list does not.")
    if fmt == "layerlist":
        lines.append("- Format: layer list. The base weights are stored once; repeated visits share the same modules"
                     " and each visit has its own KV-cache slot.")
    elif fmt == "mergekit":
        lines.append("- Format: mergekit passthrough. Repeated layers are stored as copies, so the checkpoint loads"
                     " with plain transformers; per-layer config fields were remapped to the plan.")
    return "\n".join(lines)


def _size_section(counts: ParameterCount | None, plan: LayerPlan, metrics: dict[str, Any]) -> str:
    visits = len(plan.order)
    rows = []
    if counts is not None:
        extra = counts.extra_layer_fraction
        rows += [
            ["unique parameters (the base model's)", f"{counts.unique:,} ({_human(counts.unique)})"],
            ["effective parameters (executed per token, each visit counted)",
             f"{counts.effective:,} ({_human(counts.effective)}, {counts.effective / counts.unique:.3f}x)"],
            ["decoder layers", f"{plan.num_layers} base -> {visits} visits"],
            ["extra decoder-layer compute per token", f"{extra * 100:+.1f}% FLOPs"],
            ["extra KV cache per token", f"{extra * 100:+.1f}%"],
        ]
    else:
        extra = plan.extra_layers / plan.num_layers
        rows += [
            ["decoder layers", f"{plan.num_layers} base -> {visits} visits"],
            ["extra decoder-layer compute per token", f"{extra * 100:+.1f}% FLOPs (by layer count; no safetensors"
             " headers to count parameters)"],
        ]
    if metrics.get("export_weight_bytes"):
        rows.append(["stored weight bytes", f"{_bytes(metrics['export_weight_bytes'])} ({_ratio(metrics.get('bytes_ratio'))} of"
                     f" the base's {_bytes(metrics.get('base_weight_bytes'))})"])
    text = _table(["", "value"], rows)
    return text + (
        "\n\nCompute and KV cache are counted over the decoder layers: every visit runs the layer's attention and MLP"
        " again and keeps its own keys and values. Embeddings and the output head are unchanged."
    )


def _load_section(fmt: str, repo: str, folder: Path, base: dict[str, Any], recipe: str | None) -> str:
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok_repo = repo if has_tokenizer else (base["hub_id"] or "<base model>")
    code = "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
    if fmt == "layerlist":
        code += f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)\n'
    else:
        code += f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
    code += f'tokenizer = AutoTokenizer.from_pretrained("{tok_repo}")\n'
    code += ('inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
             "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n")
    text = f"```python\n{code}```\n"
    if fmt == "layerlist":
        text += (
            "\n`trust_remote_code=True` runs `modeling_rys.py` from this repo: a short, self-contained file (torch and"
            " transformers only, rys-forge not needed) that builds the base model and runs its layers in the stored"
            " order. Read it before running it. Runtimes without remote code (vLLM, llama.cpp) need the mergekit"
            " format instead (`rys-forge build --format mergekit`)."
        )
    elif recipe is not None:
        text += (
            "\nA plain transformers checkpoint (no remote code). The mergekit passthrough recipe it was built from"
            " (`rys_recipe.yml` in this repo is the file as run, naming the builder's local copy of the base):\n\n"
            f"```yaml\n{recipe.rstrip()}\n```"
        )
    return text


def _display_recipe(folder: Path, base: dict[str, Any]) -> str | None:
    path = folder / "rys_recipe.yml"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    label = base["hub_id"] or base["name"]
    locals_ = set(re.findall(r'model:\s*"([^"]+)"', text))
    if base["source"]:
        locals_.add(base["source"])
    for local in sorted(locals_, key=len, reverse=True):
        if local != label:
            text = text.replace(local, label)
    return text


def _verification_section(folder: Path, checked: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    report_file = folder / REPORT
    if checked is None and not report_file.is_file():
        return f"Not verified: the folder has no `{REPORT}` (`rys-forge verify` writes it).", {}
    try:
        report = checked if checked is not None else check_verified(folder)
        status = (f"**Passed.** Every file of this repo except the card and the reports matches the sha256 recorded in"
                  f" `{REPORT}`; `rys-forge publish` refuses to upload otherwise.")
    except VerificationError as exc:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        status = f"**Not valid:** {exc}"
    m, t, s = report.get("metrics", {}), report.get("thresholds", {}), report.get("settings", {})
    scale = _g(m.get("logit_scale"))
    rows = [
        ["mean KL(in-memory repeat ‖ export) per token", _g(m.get("kl_mean")), f"<= {_g(t.get('kl_mean'))}"],
        ["max KL per token", _g(m.get("kl_max")), f"<= {_g(t.get('kl_max'))}"],
        ["max abs logit difference", _g(m.get("max_abs_diff")), f"<= {_g(t.get('max_abs_rel'))} x logit scale {scale}"],
        ["top-1 agreement", _g(m.get("top1_agreement")), f">= {_g(t.get('top1'))}"],
        ["KV-cache decoding vs full forward, max abs diff", _g(m.get("cache_max_abs_diff")),
         f"<= {_g(t.get('cache_rel'))} x logit scale"],
        ["greedy generation with cache == without", _g(m.get("generate_cache_equals_no_cache")), "yes"],
        ["greedy generation == in-memory repeat", _g(m.get("generate_equals_in_memory")), "yes (float32)"],
        ["stored weight bytes / base", _g(m.get("bytes_ratio")), "about 1 for a layer list"],
    ]
    lines = [
        status,
        "",
        f"The export was reloaded from disk and compared with the base model run in memory with the same plan, on"
        f" {_g(m.get('tokens'))} token positions (dtype `{s.get('dtype', '?')}`, device `{s.get('device', '?')}`).",
        "",
        _table(["check", "value", "threshold"], rows),
    ]
    if s.get("heal_adapter"):
        lines[2] += (f" Both sides ran with the per-visit LoRA adapters of `{s['heal_adapter']}/` (the export through"
                     " `PeftModel.from_pretrained`, the in-memory repeat with the same LoRA injected per visit).")
    if report.get("failures"):
        lines += ["", "Failures: " + "; ".join(report["failures"])]
    return "\n".join(lines), report


def _eval_section(folder: Path, plan: LayerPlan) -> str:
    path = folder / EVAL_FILE
    if not path.is_file():
        return "Not evaluated yet (`rys-forge eval` writes `eval.json` into the export folder)."
    data = _read_json(path, "evaluation report")
    settings = data.get("settings") or {}
    stored = (settings.get("plan") or {}).get("layer_order")
    if stored is not None and [int(k) for k in stored] != list(plan.order):
        raise UsageError(f"{path} was made for the layer order {stored}, not this export's {list(plan.order)};"
                         " run `rys-forge eval` on this folder again")
    rows, tested = [], []
    for row in data.get("rows") or []:
        metric = row.get("metric", "?")
        if row.get("filter") not in (None, "none"):
            metric += f" ({row['filter']})"
        if row.get("higher_is_better") is not None:
            metric += " ↑" if row["higher_is_better"] else " ↓"
        base = _f(row.get("base")) + (f" ± {_f(row['base_stderr'])}" if _num(row.get("base_stderr")) is not None else "")
        rys = _f(row.get("rys")) + (f" ± {_f(row['rys_stderr'])}" if _num(row.get("rys_stderr")) is not None else "")
        test = {"mcnemar_exact": "McNemar", "paired_bootstrap": "bootstrap"}.get(row.get("test") or "", "-")
        rows.append([row.get("task", "?"), metric, base, rys, _signed(row.get("delta")), _p(row.get("p_value")), test,
                     _g(row.get("n"))])
        if _num(row.get("p_value")) is not None:
            tested.append(row)
    limit = settings.get("limit")
    lines = [
        _table(["task", "metric", "base ± se", "RYS ± se", "delta", "p", "test", "n"], rows),
        "",
        f"delta = RYS - base. ± is lm-eval's standard error. p is a two-sided paired test on the per-item results"
        f" (exact McNemar for 0/1 scores, paired bootstrap otherwise). Items per task: {limit or 'all'};"
        f" few-shot: {settings.get('num_fewshot_effective') or settings.get('num_fewshot') or 'task default'};"
        f" dtype `{settings.get('dtype', '?')}`; lm-eval {(settings.get('versions') or {}).get('lm_eval', '?')}.",
        "",
    ]
    if data.get("healing_rows"):
        lines[2] += " RYS is the healed model (with the adapters of `heal/`)."
        heal_rows = [[row.get("task", "?"), row.get("metric", "?"), _f(row.get("unhealed")), _f(row.get("healed")),
                      _signed(row.get("delta")), _p(row.get("p_value"))] for row in data["healing_rows"]]
        lines += ["Before and after healing (delta = healed - unhealed, same paired tests):", "",
                  _table(["task", "metric", "unhealed", "healed", "delta", "p"], heal_rows), ""]
    significant = [r for r in tested if _num(r["p_value"]) < SIGNIFICANCE]
    if not tested:
        lines.append("No paired significance test was available for these metrics: the deltas are point estimates"
                     " only.")
    elif not significant:
        lines.append(f"None of the {len(tested)} tested differences is statistically significant (all p >="
                     f" {SIGNIFICANCE}): on this evidence the RYS model cannot be told apart from its base on these"
                     " tasks." + (" Each task was run on a limited sample, so small effects cannot be resolved."
                                  if limit else ""))
    else:
        listed = "; ".join(f"{r.get('task')} {r.get('metric')} {_signed(r.get('delta'))} (p = {_p(r['p_value'])})"
                           for r in significant)
        bonferroni = SIGNIFICANCE / len(tested)
        surviving = sum(_num(r["p_value"]) < bonferroni for r in significant)
        lines.append(f"{len(significant)} of {len(tested)} tested differences have p < {SIGNIFICANCE}: {listed}."
                     f" With {len(tested)} tests, a Bonferroni threshold of {_g(bonferroni, 3)} keeps {surviving}"
                     " of them.")
    return "\n".join(lines)


_PROBE_METRICS = [
    ("score", "score P·A·S·D (higher: a better predicted repeat)"),
    ("P", "plateau factor exp(-alpha (1 - cka_plateau))"),
    ("A", "activity factor delta_0 / (delta_0 + c)"),
    ("S", "stability factor exp(-beta max(0, r_0 - 1))"),
    ("D", "decoder factor exp(-gamma d_dec - eta d_kl)"),
    ("cka_plateau", "linear CKA(x_i, x_j) between the stream entering and leaving the window"),
    ("delta_0", "update size of one pass, ‖z_1 - z_0‖ / ‖z_0‖"),
    ("r_0", "update ratio delta_1 / delta_0 (below 1: the second pass moves the state less)"),
    ("d_dec", "decoder tolerance 1 - CKA(z_2, x_j)"),
    ("d_kl", "mean KL(p_base ‖ p_RYS) of next-token distributions on the probe prompts"),
    ("jac_sv_1", "leading singular value of the window's Jacobian at x_i"),
    ("rho", "residual force ‖x_j - x_i‖ / ‖x_i‖"),
    ("cos_phi", "cosine between x_i and the window's update x_j - x_i"),
    ("stat_ratio", "second-pass stationarity ‖S_1‖ / ‖S_0‖"),
    ("mmd2", "junction mismatch: RBF MMD^2 between x_j (what layer i receives again) and x_i"),
]


def _probe_section(run: Path, plan: LayerPlan) -> tuple[str, dict[str, Path]]:
    run = Path(run).expanduser()
    summary_file, windows_file = run / "summary.json", run / "windows.json"
    if not summary_file.is_file() or not windows_file.is_file():
        raise UsageError(f"{run} is not a rank run folder (it needs summary.json and windows.json from `rys-forge rank`)")
    summary = _read_json(summary_file, "rank summary")
    rows = _read_json(windows_file, "rank table")
    layers = (summary.get("architecture") or {}).get("num_layers")
    if layers is not None and int(layers) != plan.num_layers:
        raise UsageError(f"rank run {run} is for a model with {layers} layers, this export's base has {plan.num_layers}")
    if not plan.windows:
        raise UsageError("this export has an explicit layer order without windows; a rank run cannot be matched to it")
    by_window = {str(r.get("window")): r for r in rows}
    scores = sorted((_num(r.get("score")) for r in rows if _num(r.get("score")) is not None), reverse=True)
    model = summary.get("model") or {}
    prompts = summary.get("prompts") or {}
    model_name = model.get("base_model") or Path(str(model.get("source", "?"))).name
    lines = [
        f"From a `rys-forge rank` run over {len(rows)} windows of `{model_name}`"
        f" ({prompts.get('count', '?')} prompts, {_g(prompts.get('tokens'))} tokens"
        + (f", created {summary['created']}" if summary.get("created") else "") + ").",
        "Notation: `x_l` is the residual stream entering layer `l`; `z_0 = x_i` and `z_{n+1}` applies the window once"
        " more, so `z_1 = x_j`.",
    ]
    for window in plan.windows:
        row = by_window.get(str(window))
        if row is None:
            raise UsageError(f"rank run {run} has no row for window {window}; rank with a width range that includes it")
        score = _num(row.get("score"))
        rank = (sum(s > score for s in scores) + 1) if score is not None else None
        lines += [
            "",
            f"Window {_window_text(str(window))}: class `{row.get('class', '?')}`"
            + (f", rank {rank} of {len(scores)} scored windows" if rank else "") + ".",
            "",
            _table(["metric", "value", "meaning"],
                   [[f"`{k}`", _g(row[k]), meaning] for k, meaning in _PROBE_METRICS if k in row]),
        ]
    assets = {}
    heatmap = run / "heatmap_score.png"
    if heatmap.is_file():
        assets[HEATMAP_FILE] = heatmap
        lines += ["", f"![score over all windows i:j]({HEATMAP_FILE})", "",
                  "Score of every window `i:j` of the rank run (the model's window is among them)."]
    lines += ["", "The probes predict which windows are safe to repeat; the evaluation above is what measures it."]
    return "\n".join(lines), assets


def _card_data(base: dict[str, Any], fmt: str, healed: bool = False) -> Any:
    from huggingface_hub import ModelCardData

    tags = list(TAGS)
    if fmt == "mergekit":
        tags += ["mergekit", "merge"]
    elif fmt == "layerlist":
        tags.append("custom_code")
    if healed:
        tags += ["peft", "lora"]
    data: dict[str, Any] = {}
    if base["hub_id"]:
        data["base_model"] = base["hub_id"]
        # The Hub's relations are adapter, merge, quantized and finetune; a passthrough self-merge is a merge.
        data["base_model_relation"] = "merge"
    return ModelCardData(library_name="transformers", license=base["license"], pipeline_tag="text-generation",
                         tags=tags, **data)


def _template_text(template: str | Path | None) -> str:
    if template is not None:
        return Path(template).expanduser().read_text(encoding="utf-8")
    return resources.files("rys_forge.publish").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")


def render_card(
    folder: str | Path,
    rank_run: str | Path | None = None,
    *,
    repo_id: str | None = None,
    template: str | Path | None = None,
) -> RenderedCard:
    """Render the model card of an export (nothing is written).

    Args:
        folder: a rys-forge export (config.json with an `rys` block).
        rank_run: a `rys-forge rank` run folder: adds the window's probe metrics and the score heatmap.
        repo_id: the Hub repo the card is for (used in the loading snippet; default: the folder's name).
        template: a Jinja template replacing `rys_forge/publish/templates/model_card.md`.

    Raises:
        VerificationError: the folder is not a rys-forge export.
        UsageError: the rank run or `eval.json` does not belong to this export.
    """
    return _render(folder, rank_run, repo_id, template, None)


def _render(
    folder: str | Path,
    rank_run: str | Path | None,
    repo_id: str | None,
    template: str | Path | None,
    checked: dict[str, Any] | None,
) -> RenderedCard:
    """`render_card`, with the verification report when the caller has just checked it (saves a re-hash)."""
    from huggingface_hub import ModelCard

    folder = Path(folder).expanduser()
    config = read_rys_config(folder)
    rys = config["rys"]
    try:
        plan = LayerPlan.from_dict(rys["plan"])
    except (RysForgeError, KeyError, TypeError) as exc:
        raise VerificationError(f"the plan stored in {folder}/config.json is invalid: {exc}") from None
    fmt = str(rys.get("format", "unknown"))
    base = _base_facts(config)
    repo = repo_id or folder.resolve().name
    title = repo.split("/")[-1]
    verification_section, report = _verification_section(folder, checked)
    heal = _read_heal(folder)
    probe_section, assets = _probe_section(Path(rank_run), plan) if rank_run is not None else ("", {})
    windows = ", ".join(_window_text(str(w)) for w in plan.windows) or "an explicit layer order"
    summary = (
        f"A *Repeat Your Self* (RYS) variant of **{base['name']}**: the decoder layer block {windows} runs"
        f" {'twice' if plan.repeats == 2 else f'{plan.repeats} times'}, so the model executes {len(plan.order)} layer"
        f" visits instead of {plan.num_layers}."
        + (" Per-visit LoRA adapters heal the repeat (`heal/`)." if heal is not None else "")
        + " Built and verified with rys-forge."
    )
    provenance = [
        f"- Built by rys-forge {rys.get('rys_forge_version', '?')}"
        + (f" on {rys['created']}" if rys.get("created") else "") + f"; format `{fmt}`.",
        f"- This card was generated by rys-forge {_card_version()} from `config.json`, `{REPORT}`"
        + (f" and `{EVAL_FILE}`" if (folder / EVAL_FILE).is_file() else "") + " (all in this repo).",
        "- No weights were trained or modified." if heal is None and not base.get("adapter") else
        "- Weights: " + "; ".join(
            ([f"adapter `{Path(str(base['adapter'].get('path'))).name}` merged into the base"] if base.get("adapter") else [])
            + (["per-visit LoRA adapters trained by `rys-forge heal` (`heal/heal.json`)"] if heal is not None else [])
        ) + ".",
    ]
    card = ModelCard.from_template(
        _card_data(base, fmt, healed=heal is not None),
        template_str=_template_text(template),
        title=title,
        summary=summary,
        weights_statement=_weights_statement(base, heal),
        heal_section=_heal_section(heal, repo) if heal is not None else "",
        base_section=_base_section(base, plan.num_layers),
        plan_section=_plan_section(plan, fmt),
        size_section=_size_section(count_parameters(folder, plan, per_visit=fmt == "mergekit"), plan, report.get("metrics", {})),
        load_section=_load_section(fmt, repo, folder, base, _display_recipe(folder, base)),
        verification_section=verification_section,
        eval_section=_eval_section(folder, plan),
        probe_section=probe_section,
        provenance_section="\n".join(provenance),
    )
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip("\n") + "\n"
    parsed = ModelCard(text)
    return RenderedCard(text=text, assets=assets, metadata=parsed.data.to_dict())


def write_card(
    folder: str | Path,
    rank_run: str | Path | None = None,
    *,
    repo_id: str | None = None,
    template: str | Path | None = None,
) -> Path:
    """Write (or refresh) the export's `README.md` and return its path.

    Only `README.md` is written: it is excluded from the verification hashes, so the folder stays publishable.
    The rank run's heatmap is not copied into the folder (that would change the verified file set); `publish`
    uploads it next to the card. See `render_card` for the arguments.
    """
    return _write_text(Path(folder).expanduser(), render_card(folder, rank_run, repo_id=repo_id, template=template).text)


def _write_text(folder: Path, text: str) -> Path:
    path = folder / CARD_FILE
    write_atomic(path, text)  # no temporary leftover: it would count as an added file for verification
    return path


# --------------------------------------------------------------------------- publish


@dataclass
class PublishResult:
    """What `publish` did (or, for a dry run, would do).

    Attributes:
        repo_id: the target repo.
        url: the repo's URL (with `/tree/<revision>` for a branch); None for a dry run.
        commit_url: the upload's commit; None for a dry run.
        revision: the branch pushed to (None: the default branch).
        private: whether a new repo was created private.
        dry_run: nothing was uploaded.
        files: `(path in repo, size in bytes)` of every file uploaded (or to be uploaded), sorted.
        card: the card written into the folder, or None (dry run: rendered into a temporary folder only).
        card_text: the rendered card.
        existed: the repo existed before (only with `exist_ok`).
        stale_remote_files: files already in the repo that this upload does not replace (left in place).
        notes: remarks for the user (missing token or offline mode in a dry run, ...).
    """

    repo_id: str
    url: str | None
    commit_url: str | None
    revision: str | None
    private: bool
    dry_run: bool
    files: list[tuple[str, int]]
    card: Path | None
    card_text: str
    existed: bool = False
    stale_remote_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def format_result(result: PublishResult) -> str:
    """Human-readable lines for the terminal (the dry run's file list, or the URL of the upload)."""
    width = max((len(path) for path, _ in result.files), default=0)
    head = (f"dry run: would upload {len(result.files)} files ({_bytes(result.total_bytes)}) to {result.repo_id}"
            if result.dry_run else
            f"uploaded {len(result.files)} files ({_bytes(result.total_bytes)}) to {result.repo_id}")
    if result.revision:
        head += f" (branch {result.revision})"
    lines = [head]
    lines += [f"  {path.ljust(width)}  {size:>14,} B" for path, size in result.files]
    lines += [f"note: {note}" for note in result.notes]
    if result.stale_remote_files:
        lines.append(f"note: left in the repo from earlier uploads: {', '.join(result.stale_remote_files)}")
    if result.url:
        lines.append(result.url)
    return "\n".join(lines)


def _upload_files(folder: Path) -> dict[str, Path]:
    """Files of the export that are uploaded: everything but hidden files/folders and Python caches."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (not path.is_file() or any(part.startswith(".") for part in rel.parts)
                or "__pycache__" in rel.parts or path.suffix == ".pyc"):
            continue
        files[rel.as_posix()] = path
    return files


def _stage(files: dict[str, Path], root: Path) -> None:
    """Mirror `files` under `root` by symlinks (hard links or copies where links are not allowed)."""
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = source.resolve()
        try:
            os.symlink(source, target)
        except OSError:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)


def _offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def _find_token(token: str | None) -> str | None:
    if token:
        return token
    import huggingface_hub

    return huggingface_hub.get_token()



@contextlib.contextmanager
def _hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Hub client failures -> one-line `PublishError`s (the token never appears in them)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the network; unset HF_HUB_OFFLINE (and"
                           " TRANSFORMERS_OFFLINE) and retry") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise HubAuthError(f"the Hub rejected the token while trying to {what} (401): {_LOGIN_HINT}") from None
        if status == 403:
            raise HubAuthError(f"the token may not {what} (403): use a token with write access to the namespace") from None
        raise PublishError(f"could not {what}: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise PublishError(f"could not {what} on {endpoint}: {first_line(exc)}") from None
    except Exception as exc:  # httpx transport errors and the like
        if any(c.__module__.startswith(("httpx", "httpcore", "huggingface_hub")) for c in type(exc).__mro__):
            raise PublishError(f"could not {what} on {endpoint}: {first_line(exc)}") from None
        raise


def _remote_files(api: Any, repo_id: str, revision: str | None) -> list[str]:
    """Files of the branch pushed to; a branch that does not exist yet starts from the default branch."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return sorted(api.list_repo_files(repo_id, revision=revision))
    except RevisionNotFoundError:
        return sorted(api.list_repo_files(repo_id))


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _confirm_upload(api: Any, repo_id: str, revision: str | None, files: dict[str, Path], hashes: dict[str, str]) -> None:
    """Every uploaded file is in the repo with the local size and hash (LFS/xet: sha256; regular: git blob id)."""
    from huggingface_hub.hf_api import RepoFile

    remote = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(e, RepoFile)}
    bad = []
    for rel, path in files.items():
        entry = remote.get(rel)
        if entry is None or entry.size != path.stat().st_size:
            bad.append(rel)
        elif entry.lfs is not None:
            if entry.lfs.sha256 != (hashes.get(rel) or sha256_file(path)):
                bad.append(rel)
        elif entry.blob_id != _git_blob_id(path):
            bad.append(rel)
    if bad:
        raise PublishError(f"the upload to {repo_id} could not be confirmed: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''} missing or different in the repo; publish again")


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    exist_ok: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    rank_run: str | Path | None = None,
) -> PublishResult:
    """Upload a verified export to the Hugging Face Hub with a generated card.

    Steps: the verification gate (`check_verified`: a passing report whose sha256 of every file still
    matches); the card; offline mode and token checks; the repo must not exist unless `exist_ok`; the card is
    written into the folder; the repo (and branch) are created; the export is uploaded in one `upload_folder`
    call (hidden files and `__pycache__` left out, the rank heatmap added); the repo is listed and every
    uploaded file's size and hash are checked.

    A dry run runs the gate and renders the card into a temporary folder (the export's `README.md` is not
    touched), lists exactly the files the upload would send with their sizes, and contacts nobody; a missing
    token or offline mode is reported in `notes` instead of failing.

    Args:
        folder: the export folder (`rys-forge build`, verified).
        repo_id: `owner/name` of the model repo.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to push to (created from the default branch if missing); default: the default branch.
        dry_run: list, do not upload.
        exist_ok: upload into an existing repo that holds files (files with the same names are replaced; others
            are left and listed in `stale_remote_files`). An existing empty repo needs no `exist_ok`.
        token: Hugging Face token (default: `huggingface_hub.get_token()`: HF_TOKEN or `hf auth login`).
        endpoint: Hub URL (default: HF_ENDPOINT or https://huggingface.co).
        rank_run: a `rys-forge rank` run folder for the card's probe metrics and heatmap.

    Returns:
        A `PublishResult` (URL, commit, file list).

    Raises:
        VerificationError: not verified, failed, or changed since verification.
        UsageError: a bad `repo_id`; `RepoExistsError`: the repo exists and not `exist_ok`.
        HubAuthError: no token, or the Hub rejected it.
        PublishError: offline mode, a Hub request failed, or the upload could not be confirmed.
    """
    folder = Path(folder).expanduser()
    report = check_verified(folder)
    if not isinstance(repo_id, str) or not _HUB_ID_RE.match(repo_id):
        raise UsageError(f"bad --repo-id {repo_id!r}: use owner/name (letters, digits, '.', '-', '_')")
    rendered = _render(folder, rank_run, repo_id, None, report)
    files = {rel: path for rel, path in _upload_files(folder).items() if rel not in rendered.assets}
    files.update(rendered.assets)
    notes: list[str] = []
    rys = read_rys_config(folder)["rys"]
    source = str(rys.get("base_model") or "")
    if source.startswith(("/", "~", ".")) or Path(source).is_absolute():
        notes.append(f"config.json, {REPORT} (and a mergekit recipe) record the local base path {source}; they are"
                     " uploaded as they are (verified files), the card shows only the folder name")

    if dry_run:
        with tempfile.TemporaryDirectory(prefix="rys-card-") as tmp:
            card = Path(tmp) / CARD_FILE
            card.write_text(rendered.text, encoding="utf-8")
            files[CARD_FILE] = card
            listing = sorted((rel, path.stat().st_size) for rel, path in files.items())
        if _offline():
            notes.append("HF_HUB_OFFLINE is set: the real upload would stop here; unset it to publish")
        if not _find_token(token):
            notes.append(f"no Hugging Face token found: the real upload would stop here; {_LOGIN_HINT}")
        notes.append(f"{CARD_FILE} was rendered into a temporary folder; the export's own {CARD_FILE} is unchanged")
        return PublishResult(repo_id, None, None, revision, private, True, listing, None, rendered.text, notes=notes)

    from huggingface_hub import HfApi, constants

    if _offline():
        raise PublishError("HF_HUB_OFFLINE is set (offline mode): publishing needs the network; unset HF_HUB_OFFLINE"
                           " (and TRANSFORMERS_OFFLINE) and retry")
    token = _find_token(token)
    if not token:
        raise HubAuthError(f"no Hugging Face token found: {_LOGIN_HINT}, then publish again")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors("check the token", endpoint):
        api.whoami()
    with _hub_errors(f"look up {repo_id}", endpoint):
        existed = api.repo_exists(repo_id)
        remote_files = _remote_files(api, repo_id, revision) if existed else []
    occupied = [name for name in remote_files if name != ".gitattributes"]  # a new repo holds only this one
    if occupied and not exist_ok:
        shown = ", ".join(occupied[:5]) + (" ..." if len(occupied) > 5 else "")
        raise RepoExistsError(f"{repo_id} already exists on {endpoint} with {len(occupied)} files ({shown});"
                              " pass --exist-ok to upload into it (files with the same names are replaced)")

    card = _write_text(folder, rendered.text)
    files[CARD_FILE] = card
    hashes = dict(report.get("files") or {})
    with _hub_errors(f"create {repo_id}", endpoint):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=exist_ok or existed, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    plan = LayerPlan.from_dict(rys["plan"])
    with tempfile.TemporaryDirectory(prefix="rys-publish-") as tmp, _hub_errors(f"upload to {repo_id}", endpoint):
        staging = Path(tmp)
        _stage(files, staging)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            revision=revision,
            commit_message=f"Upload RYS model ({plan.describe()}) with rys-forge {_card_version()}",
            commit_description=f"Verified export: {REPORT} passed; every file matches its recorded sha256.",
        )
    with _hub_errors(f"list {repo_id} after the upload", endpoint):
        _confirm_upload(api, repo_id, revision, files, hashes)
    url = str(repo_url).rstrip("/")
    if revision and revision != constants.DEFAULT_REVISION:
        url += f"/tree/{revision}"
    if existed:
        notes.append("the repo existed: its visibility was left unchanged")
    stale = sorted(set(remote_files) - set(files) - {".gitattributes"})
    listing = sorted((rel, path.stat().st_size) for rel, path in files.items())
    return PublishResult(repo_id, url, getattr(commit, "commit_url", None), revision, private, False, listing, card,
                         rendered.text, existed=existed, stale_remote_files=stale, notes=notes)
