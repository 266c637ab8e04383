"""The sections of a model card, each ready-made Markdown built from one file of the export (or the rank run).

`card.render_card` fills the template's variables with them (see model_cards/README.md for the variables):
`base_section` and `plan_section` from the `rys` record, `size_section` from the safetensors headers and the
verification metrics, `verification_section` from verification.json, `eval_section` from eval.json,
`heal_section` from heal/heal.json, `probe_section` from a `rys-forge rank` run folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rys_forge.adapters import describe_adapter
from rys_forge.artifacts import (
    EVAL_FILE,
    RECIPE_FILE,
    SCORE_HEATMAP_FILE,
    SUMMARY_FILE,
    VERIFICATION_FILE,
    WINDOWS_FILE,
    RysRecord,
    check_verified,
    decoder_config,
    read_json,
    read_verification,
)
from rys_forge.errors import UsageError, VerificationError, well_formed
from rys_forge.plan import LayerPlan
from rys_forge.publish.numbers import (
    ParameterCount,
    byte_size,
    compact,
    finite,
    fixed,
    human,
    p_value,
    ratio,
    signed,
    table,
)

#: Name of the rank run's score heatmap in the published repo.
HEATMAP_FILE = "rys_heatmap_score.png"
SIGNIFICANCE = 0.05
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def window_text(window: str) -> str:
    """`` `6:10` (layers 6..9) ``: a window with the layers it names."""
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


def base_facts(config: dict[str, Any], record: RysRecord) -> dict[str, Any]:
    """What the card says about the base: Hub id (recorded, or the name if it looks like one), licence, name,
    model type, and any adapter merged into it."""
    info = record.base_info or {}
    source = str(record.base_model or "")
    hub_id = info.get("base_model")
    if not hub_id and HUB_ID_RE.match(source) and not source.endswith(".gguf") and not Path(source).expanduser().exists():
        hub_id = source
    model_type = str(config.get("model_type") or decoder_config(config).get("model_type")
                     or record.extra.get("model_type") or "")  # a GGUF export has no config.json: its record says
    license_ = info.get("license") or ("gemma" if model_type.startswith("gemma") else None)
    name = hub_id or (Path(source).name if source else "unknown base")
    adapter = record.adapter
    return {"hub_id": hub_id, "source": source, "info": info, "model_type": model_type, "license": license_, "name": name,
            "adapter": adapter}


def _adapter_text(adapter: dict[str, Any]) -> str:
    """`LORA r=8 alpha=16 on q_proj, v_proj` from `name`: the adapter's type, size and targets, by its folder name."""
    path = str(adapter.get("path") or "?")
    label = path if not adapter.get("local") else Path(path).name
    return f"`{label}` ({describe_adapter(adapter, with_path=False)})"


def weights_statement(base: dict[str, Any], heal: dict[str, Any] | None) -> str:
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


def heal_section(heal: dict[str, Any], repo: str) -> str:
    settings, data, loss = heal.get("settings") or {}, heal.get("data") or {}, heal.get("loss") or {}
    adapter = heal.get("adapter") or {}
    visits = ", ".join(f"{v['visit']} (layer {v['layer']})" for v in adapter.get("visits") or [])
    rows = [
        ["adapted visits (position in the order, base layer)", visits or "?"],
        ["adapted modules per visit", ", ".join(adapter.get("modules") or []) or "?"],
        ["LoRA rank / alpha", f"{compact(settings.get('rank'))} / {compact(settings.get('alpha'))}"],
        ["trainable parameters", f"{adapter.get('trainable_parameters', 0):,}"],
        ["steps, learning rate, batch", f"{compact(settings.get('steps'))}, {compact(settings.get('lr'))},"
         f" {compact(settings.get('batch_size'))} x {compact(data.get('block_tokens'))} tokens"],
        ["KL(unhealed ‖ healed) weight", compact(settings.get("kl_weight"))],
        ["training data", f"{compact(data.get('texts'))} texts, {compact(data.get('blocks'))} blocks (sha256"
         f" `{str(data.get('sha256', '?'))[:12]}`)"],
        ["next-token loss on the data, before -> after", f"{compact(loss.get('before'))} -> {compact(loss.get('after'))}"
         f" ({compact(loss.get('eval_blocks'))} blocks)"],
    ]
    code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="heal")\n')
    return "\n".join([
        "Each repeated visit has its own LoRA adapter (a LoRA on the shared layer would apply to every visit);"
        " the base weights are frozen and shared. The adapter is a standard PEFT adapter in `heal/`"
        " (`heal/heal.json` holds the settings and the loss curve); without it the model is the plain repeat.",
        "",
        table(["", "value"], rows),
        "",
        f"```python\n{code}```",
    ])


def base_section(base: dict[str, Any], num_layers: int) -> str:
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


def plan_section(plan: LayerPlan, fmt: str) -> str:
    visits = len(plan.order)
    lines = []
    if plan.windows:
        windows = ", ".join(window_text(str(w)) for w in plan.windows)
        times = "twice" if plan.repeats == 2 else f"{plan.repeats} times"
        lines.append(f"- Repeated window{'s' if len(plan.windows) > 1 else ''}: {windows}, each run {times} in a row.")
        if plan.scaled:
            lines.append(f"- Damped visits: {plan.describe()}; per-visit residual scales `{list(plan.scales)}`"
                         " (each visit's attention and MLP outputs are multiplied by its scale before the residual add).")
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
    where = ("`rys.json` (`plan.layer_order`) and in the GGUF's own metadata (`rys.order`, `rys.plan`)" if fmt == "gguf"
             else "`config.json` (`rys.plan.layer_order`)")
    lines.append(f"- The explicit order is stored in {where} and is what the model executes; notations for ranges"
                 " differ between tools, the list does not.")
    if fmt == "layerlist":
        lines.append("- Format: layer list. The base weights are stored once; repeated visits share the same modules"
                     " and each visit has its own KV-cache slot.")
    elif fmt == "mergekit":
        lines.append("- Format: mergekit passthrough. Repeated layers are stored as copies, so the checkpoint loads"
                     " with plain transformers; per-layer config fields were remapped to the plan.")
    elif fmt == "gguf":
        lines.append("- Format: GGUF for llama.cpp. Each visit's block is the base GGUF's block copied byte for byte in"
                     " its original quantisation (no re-quantisation); `block_count` and every per-layer metadata array"
                     " were remapped to the plan (for gemma, the sliding-window pattern is written out per layer).")
    return "\n".join(lines)


def size_section(counts: ParameterCount | None, plan: LayerPlan, metrics: dict[str, Any]) -> str:
    visits = len(plan.order)
    rows = []
    if counts is not None:
        extra = counts.extra_layer_fraction
        rows += [
            ["unique parameters (the base model's)", f"{counts.unique:,} ({human(counts.unique)})"],
            ["effective parameters (executed per token, each visit counted)",
             f"{counts.effective:,} ({human(counts.effective)}, {counts.effective / counts.unique:.3f}x)"],
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
        rows.append(["stored weight bytes", f"{byte_size(metrics['export_weight_bytes'])} ({ratio(metrics.get('bytes_ratio'))} of"
                     f" the base's {byte_size(metrics.get('base_weight_bytes'))})"])
    text = table(["", "value"], rows)
    return text + (
        "\n\nCompute and KV cache are counted over the decoder layers: every visit runs the layer's attention and MLP"
        " again and keeps its own keys and values. Embeddings and the output head are unchanged."
    )


def gguf_load_section(repo: str, folder: Path, base: dict[str, Any]) -> str:
    """How to run a GGUF export: llama.cpp, llama-cpp-python, and transformers' dequantising loader."""
    name = next((p.name for p in sorted(folder.glob("*.gguf"))), "<file>.gguf")
    text = (
        "```bash\n"
        f"huggingface-cli download {repo} {name} --local-dir .\n"
        f"llama-cli -m {name} -p \"The capital of France is\" -n 20\n"
        "```\n\n"
        "```python\n"
        "from llama_cpp import Llama  # pip install llama-cpp-python\n\n"
        f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{name}")\n'
        'print(llm("The capital of France is", max_tokens=20)["choices"][0]["text"])\n'
        "```\n\n"
        "No layer-repeat support is needed at run time: the repeated blocks are ordinary blocks of the file."
    )
    if base["model_type"].startswith("gemma"):
        text += (" transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`) ignores the per-layer sliding-window"
                 " pattern this file carries, so it would give repeated layers the wrong attention type; run it in llama.cpp,"
                 " or load the base's layer-list export instead.")
    return text


def load_section(fmt: str, repo: str, folder: Path, base: dict[str, Any], recipe: str | None) -> str:
    if fmt == "gguf":
        return gguf_load_section(repo, folder, base)
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
            " order. Read it before running it. Runtimes without remote code need another format: vLLM the mergekit"
            " one (`rys-forge build --format mergekit`), llama.cpp a GGUF (`rys-forge build --format gguf`)."
        )
    elif recipe is not None:
        text += (
            "\nA plain transformers checkpoint (no remote code). The mergekit passthrough recipe it was built from"
            " (`rys_recipe.yml` in this repo is the file as run, naming the builder's local copy of the base):\n\n"
            f"```yaml\n{recipe.rstrip()}\n```"
        )
    return text


def display_recipe(folder: Path, base: dict[str, Any]) -> str | None:
    path = folder / RECIPE_FILE
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


def verification_section(folder: Path, checked: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    report_file = folder / VERIFICATION_FILE
    if checked is None and not report_file.is_file():
        return f"Not verified: the folder has no `{VERIFICATION_FILE}` (`rys-forge verify` writes it).", {}
    try:
        report = checked if checked is not None else check_verified(folder)
        status = (f"**Passed.** Every file of this repo except the card and the reports matches the sha256 recorded in"
                  f" `{VERIFICATION_FILE}`; `rys-forge publish` refuses to upload otherwise.")
    except VerificationError as exc:
        try:
            report = read_verification(folder)
        except VerificationError:  # garbled or not a report: the status line says why
            report = {}
        status = f"**Not valid:** {exc}"
    m, t, s = (report.get(key) if isinstance(report.get(key), dict) else {} for key in ("metrics", "thresholds", "settings"))
    scale = compact(m.get("logit_scale"))
    rows = [
        ["mean KL(in-memory repeat ‖ export) per token", compact(m.get("kl_mean")), f"<= {compact(t.get('kl_mean'))}"],
        ["max KL per token", compact(m.get("kl_max")), f"<= {compact(t.get('kl_max'))}"],
        ["max abs logit difference", compact(m.get("max_abs_diff")), f"<= {compact(t.get('max_abs_rel'))} x logit scale {scale}"],
        ["top-1 agreement", compact(m.get("top1_agreement")), f">= {compact(t.get('top1'))}"],
        ["KV-cache decoding vs full forward, max abs diff", compact(m.get("cache_max_abs_diff")),
         f"<= {compact(t.get('cache_rel'))} x logit scale"],
        ["greedy generation with cache == without", compact(m.get("generate_cache_equals_no_cache")), "yes"],
        ["greedy generation == in-memory repeat", compact(m.get("generate_equals_in_memory")), "yes (float32)"],
        ["stored weight bytes / base", compact(m.get("bytes_ratio")), "about 1 for a layer list"],
    ]
    lines = [
        status,
        "",
        f"The export was reloaded from disk and compared with the base model run in memory with the same plan, on"
        f" {compact(m.get('tokens'))} token positions (dtype `{s.get('dtype', '?')}`, device `{s.get('device', '?')}`).",
        "",
        table(["check", "value", "threshold"], rows),
    ]
    if "gguf_tensor_mismatches" in m:
        gguf_rows = [["tensors / metadata values differing from the base GGUF's (remapped through the plan)",
                      f"{compact(m.get('gguf_tensor_mismatches'))} / {compact(m.get('gguf_metadata_mismatches'))}", "0 / 0"]]
        if "llamacpp_kl_mean" in m:
            gguf_rows += [
                ["llama.cpp: mean KL to the in-memory repeat", compact(m.get("llamacpp_kl_mean")),
                 f"<= {compact(t.get('llamacpp_kl_factor'))} x llama.cpp's floor on the base, {compact(m.get('llamacpp_floor_kl_mean'))}"],
                ["llama.cpp: greedy tokens equal to the in-memory repeat's (of each prompt's first N)",
                 f"{compact(m.get('llamacpp_greedy_match'))} of {compact(m.get('llamacpp_greedy_tokens'))}",
                 f"reported (base: {compact(m.get('llamacpp_floor_greedy_match'))})"],
            ]
        else:
            gguf_rows.append(["llama.cpp run", str(m.get("llamacpp", "not run")), "-"])
        lines += ["", table(["GGUF check", "value", "threshold"], gguf_rows)]
    if s.get("heal_adapter"):
        lines[2] += (f" Both sides ran with the per-visit LoRA adapters of `{s['heal_adapter']}/` (the export through"
                     " `PeftModel.from_pretrained`, the in-memory repeat with the same LoRA injected per visit).")
    if report.get("failures"):
        lines += ["", "Failures: " + "; ".join(str(f) for f in report["failures"])]
    return "\n".join(lines), report


def eval_section(folder: Path, plan: LayerPlan) -> str:
    path = folder / EVAL_FILE
    if not path.is_file():
        return "Not evaluated yet (`rys-forge eval` writes `eval.json` into the export folder)."
    with well_formed(path, "an evaluation report"):
        return _eval_text(path, read_json(path, "evaluation report"), plan)


def _eval_text(path: Path, data: dict[str, Any], plan: LayerPlan) -> str:
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
        base = fixed(row.get("base")) + (f" ± {fixed(row['base_stderr'])}" if finite(row.get("base_stderr")) is not None else "")
        rys = fixed(row.get("rys")) + (f" ± {fixed(row['rys_stderr'])}" if finite(row.get("rys_stderr")) is not None else "")
        test = {"mcnemar_exact": "McNemar", "paired_bootstrap": "bootstrap"}.get(row.get("test") or "", "-")
        rows.append([row.get("task", "?"), metric, base, rys, signed(row.get("delta")), p_value(row.get("p_value")), test,
                     compact(row.get("n"))])
        if finite(row.get("p_value")) is not None:
            tested.append(row)
    limit = settings.get("limit")
    lines = [
        table(["task", "metric", "base ± se", "RYS ± se", "delta", "p", "test", "n"], rows),
        "",
        f"delta = RYS - base. ± is lm-eval's standard error. p is a two-sided paired test on the per-item results"
        f" (exact McNemar for 0/1 scores, paired bootstrap otherwise). Items per task: {limit or 'all'};"
        f" few-shot: {settings.get('num_fewshot_effective') or settings.get('num_fewshot') or 'task default'};"
        f" dtype `{settings.get('dtype', '?')}`; lm-eval {(settings.get('versions') or {}).get('lm_eval', '?')}.",
        "",
    ]
    if data.get("healing_rows"):
        lines[2] += " RYS is the healed model (with the adapters of `heal/`)."
        heal_rows = [[row.get("task", "?"), row.get("metric", "?"), fixed(row.get("unhealed")), fixed(row.get("healed")),
                      signed(row.get("delta")), p_value(row.get("p_value"))] for row in data["healing_rows"]]
        lines += ["Before and after healing (delta = healed - unhealed, same paired tests):", "",
                  table(["task", "metric", "unhealed", "healed", "delta", "p"], heal_rows), ""]
    significant = [r for r in tested if finite(r["p_value"]) < SIGNIFICANCE]
    if not tested:
        lines.append("No paired significance test was available for these metrics: the deltas are point estimates"
                     " only.")
    elif not significant:
        lines.append(f"None of the {len(tested)} tested differences is statistically significant (all p >="
                     f" {SIGNIFICANCE}): on this evidence the RYS model cannot be told apart from its base on these"
                     " tasks." + (" Each task was run on a limited sample, so small effects cannot be resolved."
                                  if limit else ""))
    else:
        listed = "; ".join(f"{r.get('task')} {r.get('metric')} {signed(r.get('delta'))} (p = {p_value(r['p_value'])})"
                           for r in significant)
        bonferroni = SIGNIFICANCE / len(tested)
        surviving = sum(finite(r["p_value"]) < bonferroni for r in significant)
        lines.append(f"{len(significant)} of {len(tested)} tested differences have p < {SIGNIFICANCE}: {listed}."
                     f" With {len(tested)} tests, a Bonferroni threshold of {compact(bonferroni, 3)} keeps {surviving}"
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


def probe_section(run: Path, plan: LayerPlan) -> tuple[str, dict[str, Path]]:
    run = Path(run).expanduser()
    summary_file, windows_file = run / SUMMARY_FILE, run / WINDOWS_FILE
    if not summary_file.is_file() or not windows_file.is_file():
        raise UsageError(f"{run} is not a rank run folder (it needs summary.json and windows.json from `rys-forge rank`)")
    with well_formed(run, "a rank run folder"):
        return _probe_text(run, read_json(summary_file, "rank summary"), read_json(windows_file, "rank table"), plan)


def _probe_text(run: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                plan: LayerPlan) -> tuple[str, dict[str, Path]]:
    layers = (summary.get("architecture") or {}).get("num_layers")
    if layers is not None and int(layers) != plan.num_layers:
        raise UsageError(f"rank run {run} is for a model with {layers} layers, this export's base has {plan.num_layers}")
    if not plan.windows:
        raise UsageError("this export has an explicit layer order without windows; a rank run cannot be matched to it")
    by_window = {str(r.get("window")): r for r in rows}
    scores = sorted((finite(r.get("score")) for r in rows if finite(r.get("score")) is not None), reverse=True)
    model = summary.get("model") or {}
    prompts = summary.get("prompts") or {}
    model_name = model.get("base_model") or Path(str(model.get("source", "?"))).name
    lines = [
        f"From a `rys-forge rank` run over {len(rows)} windows of `{model_name}`"
        f" ({prompts.get('count', '?')} prompts, {compact(prompts.get('tokens'))} tokens"
        + (f", created {summary['created']}" if summary.get("created") else "") + ").",
        "Notation: `x_l` is the residual stream entering layer `l`; `z_0 = x_i` and `z_{n+1}` applies the window once"
        " more, so `z_1 = x_j`.",
    ]
    for window in plan.windows:
        row = by_window.get(str(window))
        if row is None:
            raise UsageError(f"rank run {run} has no row for window {window}; rank with a width range that includes it")
        score = finite(row.get("score"))
        rank = (sum(s > score for s in scores) + 1) if score is not None else None
        lines += [
            "",
            f"Window {window_text(str(window))}: class `{row.get('class', '?')}`"
            + (f", rank {rank} of {len(scores)} scored windows" if rank else "") + ".",
            "",
            table(["metric", "value", "meaning"],
                   [[f"`{k}`", compact(row[k]), meaning] for k, meaning in _PROBE_METRICS if k in row]),
        ]
    assets = {}
    heatmap = run / SCORE_HEATMAP_FILE
    if heatmap.is_symlink() or (heatmap.exists() and not heatmap.is_file()):
        raise UsageError(f"{heatmap} is not a regular file (a symbolic link or a special file); the card uploads only"
                         " files of the rank run itself: replace it by a copy or remove it")
    if heatmap.is_file():
        assets[HEATMAP_FILE] = heatmap
        lines += ["", f"![score over all windows i:j]({HEATMAP_FILE})", "",
                  "Score of every window `i:j` of the rank run (the model's window is among them)."]
    lines += ["", "The probes predict which windows are safe to repeat; the evaluation above is what measures it."]
    return "\n".join(lines), assets
