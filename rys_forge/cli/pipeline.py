"""The pipeline's commands: info, rank, build, verify, eval, heal, card, publish (one library call each)."""

from __future__ import annotations

from typing import Any

import click

from rys_forge.plan import WINDOW_CONVENTION, resolve_damping
from rys_forge.cli.framework import (
    print_model_facts,
    adapter_option,
    at_least_two,
    check_windows,
    model_options,
    output_check,
    placement_options,
    print_top,
    print_verification,
    resumable,
    run_setup,
    split,
)


@click.command()
@model_options
@click.option("--window", "windows", multiple=True, help=f"Show the plan for a window ({WINDOW_CONVENTION}).")
@click.option("--repeats", default=2, show_default=True, type=int, help="Visits of each window's block.")
@adapter_option
def info(model_name: str, dtype: str, device: str, windows: tuple[str, ...], repeats: int, adapter: str | None) -> None:
    """Print architecture, layer count, attention type per layer, parameters and window notation."""
    from rys_forge.models import describe_model, load_model
    from rys_forge.plan import LayerPlan

    plan = None
    check_windows(windows)
    loaded = load_model(model_name, dtype=dtype, device=device, adapter=adapter)
    facts = describe_model(loaded.model)
    if windows:
        plan = LayerPlan.from_windows(windows, facts["num_layers"], repeats)
    print_model_facts(model_name, loaded, facts, plan)


@click.command()
@model_options
@click.option("--window", "windows", multiple=True, help=f"Probe only these windows (repeatable). {WINDOW_CONVENTION}.")
@click.option("--min-width", default=2, show_default=True, type=int, help="Smallest window width j-i.")
@click.option("--max-width", default=None, type=int, help="Largest window width (default: all).")
@click.option("--probes", default=None, help="Comma list of probes (default: all). See --list-probes.")
@click.option("--list-probes", is_flag=True, help="List the probes and exit.")
@click.option("--iterations", default=4, show_default=True, type=int, help="Iterates z_1..z_n of the block map.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(), help="Prompt file (.txt: one per line; .jsonl: text field).")
@click.option("--families", default=None, help="Comma list of shipped prompt families (default: all).")
@click.option("--prompts-per-family", default=None, type=int, help="Prompts taken from each family (default: 8 of each shipped family; a --prompts file is used whole).")
@click.option("--max-tokens", default=48, show_default=True, type=int, help="Tokens kept per prompt.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Prompts per batch.")
@click.option("--kl-positions", default=4, show_default=True, type=int, help="Positions per prompt where logits are compared.")
@click.option("--kl-fraction", default=1.0, show_default=True, type=float, help="Share of prompts that carry KL positions (the KL's tail pass runs on those only).")
@click.option("--deep-fraction", default=0.5, show_default=True, type=float, help="Share of prompts that also get z_3..z_n (n^2 fit, r_1+, curves); the score's inputs use the --visit-fraction share.")
@click.option("--visit-fraction", default=1.0, show_default=True, type=float, help="Share of prompts that get the second visit z_2 (r_0, D_dec, stationarity; >= the deep and KL shares, which it holds); the plateau CKA and delta_0 use all prompts. Below 1 on a GPU: about half a window's layer passes are z_2.")
@click.option("--debiased-cka", is_flag=True, help="Use the debiased CKA estimator (Davari et al. 2022).")
@click.option("--jacobian", type=click.Choice(["top", "all", "none"]), default="top", show_default=True, help="Windows that get the Jacobian spectrum: the top by score, all, or none.")
@click.option("--jacobian-top", default=5, show_default=True, type=int, help="How many top windows get the Jacobian spectrum.")
@click.option("--top-k", default=10, show_default=True, type=int, help="Windows in the short list, the table and the curves.")
@click.option("--overlap", default=None, help="Two prompt families, e.g. math,reasoning: report their top-k overlap.")
@click.option("--score-config", default=None, type=click.Path(), help="JSON overriding the score constants and class thresholds.")
@click.option("--learned-score", default=None, type=click.Path(), help="Order the windows by this learned score (a file from `rys-forge learn-score`) instead of Score(B); the prior stays in the score column and summary.json: ordering says which score produced the order.")
@click.option("--outlier-factor", default=5.0, show_default=True, help="Exclude tokens whose residual norm at some layer exceeds this multiple of the layer's median (massive activations, attention sinks); 0 keeps every token.")
@click.option("--shortlist-overlap", default=0.3, show_default=True, help="Short list: skip a window whose layer overlap (intersection over union) with a better listed one exceeds this (1: raw score order).")
@click.option("--stats-dtype", type=click.Choice(["float64", "float32", "tf32"]), default="float64", show_default=True, help="Arithmetic of the statistics (tf32: float32 with TF32 tensor-core CKA products on CUDA).")
@click.option("--attn", default="eager", show_default=True, help="Attention backend (eager or sdpa); eager is exact on CPU.")
@click.option("--matmul", type=click.Choice(["auto", "float32", "bf16"]), default="auto", show_default=True, help="CPU matrix products of a float32 model: float32, or bf16 (inputs rounded to bfloat16, float32 accumulation; residual stream and statistics stay float32/float64; a whole rank run about 1.8x faster on a Xeon with AMX; scores within 1%). auto: bf16 where a model-sized product runs >= 1.3x faster, else float32. Stored in the run folder.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of every subsample.")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Residual scale of the repeated visits: probe the damped block map (each repeated visit adds alpha x its attention and MLP updates; as `build --alpha`).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="CPU: windows probed at once, one torch thread each (0: auto, up to 4; the numbers do not change).")
@click.option("--out", default=None, type=click.Path(), callback=output_check(folder=True), help="Run folder (default: runs/rank-<model>-<time>).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@adapter_option
@placement_options
def rank(model_name: str, dtype: str, device: str, windows: tuple[str, ...], min_width: int, max_width: int | None,
         probes: str | None, list_probes: bool, iterations: int, prompts_file: str | None, families: str | None,
         prompts_per_family: int | None, max_tokens: int, batch_size: int, kl_positions: int, kl_fraction: float, deep_fraction: float,
         visit_fraction: float, debiased_cka: bool, jacobian: str, jacobian_top: int, top_k: int, overlap: str | None, score_config: str | None,
         learned_score: str | None, outlier_factor: float, shortlist_overlap: float,
         stats_dtype: str, attn: str, matmul: str, seed: int, alpha: float, workers: int, out: str | None, resume: bool,
         no_progress: bool, adapter: str | None, placement: dict[str, Any]) -> None:
    """Probe every window i:j from one cached activation pass, score it, and save a ranked run folder.

    Writes windows.csv/json (one row per window, every metric), summary.json, heatmaps (PNG) and
    repeat-count curves of the top windows; prints the short list. Ctrl-C keeps finished windows;
    continue with --resume --out DIR.
    """
    from rys_forge.models import load_model
    from rys_forge.rank import (LearnedScore, RankSettings, ScoreConfig, check_score_inputs, load_prompts,
                                per_family_limit, probe_descriptions, rank_windows, select_probes)

    if list_probes:
        for name, text in probe_descriptions().items():
            click.echo(f"{name:15s} {text}")
        return
    settings = RankSettings(
        windows=list(windows) or None, min_width=min_width, max_width=max_width,
        probes=select_probes(split(probes)) if probes else None, iterations=iterations, max_tokens=max_tokens,
        batch_size=batch_size, kl_positions=kl_positions, kl_fraction=kl_fraction, deep_fraction=deep_fraction, debiased_cka=debiased_cka, jacobian=jacobian,
        jacobian_top=jacobian_top, top_k=top_k, overlap_families=tuple(split(overlap)), stats_dtype=stats_dtype, seed=seed,
        outlier_factor=outlier_factor, shortlist_overlap=shortlist_overlap, alpha=alpha, matmul=matmul,
        visit_fraction=visit_fraction,
    )
    settings.validate()
    config = ScoreConfig.from_json(score_config) if score_config else ScoreConfig()
    check_score_inputs(select_probes(settings.probes), settings.kl_positions, config)
    learned = LearnedScore.load(learned_score) if learned_score else None
    prompts = load_prompts(families=split(families) or None, path=prompts_file,
                           limit_per_family=per_family_limit(prompts_file, prompts_per_family))
    check_windows(windows)
    shard, out, device = run_setup("rank", model_name, out, device, resume)
    loaded = load_model(model_name, dtype=dtype, device=device, attn_implementation=attn, adapter=adapter, **placement)
    with resumable("rank", out):
        result = rank_windows(
            loaded.model, loaded.tokenizer, prompts, settings, config, out_dir=out, resume=resume,
            progress=not no_progress and shard.rank == 0, model_info={**loaded.info, "path": loaded.path},
            learned_score=learned, workers=workers,
        )
    if shard.rank != 0:
        return
    print_top(result, top_k)
    timings = result.summary["timings"]
    click.echo(
        f"{result.summary['windows']} windows, {result.summary['prompts']['tokens']} prompt tokens; "
        f"base pass {timings['base_pass_s']:.1f}s, windows {timings['windows_s']:.1f}s, "
        f"jacobian {timings['jacobian_s']:.1f}s, total {timings['total_s']:.1f}s"
    )
    click.echo(f"classes: {result.summary['classes']}")
    if "family_overlap" in result.summary:
        fo = result.summary["family_overlap"]
        click.echo(
            f"top-{fo['k']} overlap {fo['families'][0]} vs {fo['families'][1]}: {fo['overlap']} "
            f"(chance {fo['expected_by_chance']:.2f}, hypergeometric p={fo['p_value']:.2g})"
        )
    click.echo(f"run folder: {result.out_dir}")


@click.command()
@model_options
@click.option("--window", "windows", multiple=True, required=True, help=f"Window to repeat (repeatable). {WINDOW_CONVENTION}.")
@click.option("--repeats", default=2, show_default=True, type=int, callback=at_least_two,
              help="Visits of each window's block (2 or more).")
@click.option("--alpha", default=None, type=float, help="Residual scale of the repeated visits (the first pass stays 1): each adds alpha x its attention and MLP updates; 1 = plain RYS.")
@click.option("--substeps", default=None, type=int, help="Replace each window's second pass by K damped sub-steps at 1/K (= --repeats K+1 --alpha 1/K).")
@click.option("--format", "fmt", type=click.Choice(["layerlist", "mergekit", "gguf"]), default="layerlist", show_default=True,
              help="layerlist: weights stored once + modeling_rys.py (trust_remote_code); mergekit: passthrough recipe, duplicated weights; gguf: one .gguf for llama.cpp from a GGUF base, quantised blocks copied byte for byte (no damped plans).")
@click.option("--out", required=True, type=click.Path(), callback=output_check(folder=True), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace an existing output folder that rys-forge wrote (never the base or a folder with other files), after the new build verified.")
@click.option("--recipes-dir", default=None, type=click.Path(), callback=output_check(folder=True), help="Also keep a copy of the mergekit recipe here, as <name>.yml (default: only OUT/rys_recipe.yml; nothing is written outside --out).")
@click.option("--no-verify", is_flag=True, help="Skip verification (the folder then cannot be published).")
@adapter_option
@placement_options
def build(model_name: str, dtype: str, device: str, windows: tuple[str, ...], repeats: int, alpha: float | None,
          substeps: int | None, fmt: str, out: str, force: bool, recipes_dir: str | None, no_verify: bool,
          adapter: str | None, placement: dict[str, Any]) -> None:
    """Export a RYS checkpoint of --model with --window repeated, then verify it.

    The export lands in --out only if verification passes.
    """
    from rys_forge.surgery.builder import build as run_build

    check_windows(windows)
    resolve_damping(repeats, alpha, substeps)  # bad scales: one line before anything loads
    result = run_build(model_name, list(windows), out, format=fmt, repeats=repeats, alpha=alpha, substeps=substeps,
                       force=force, dtype=dtype, device=device, recipes_dir=recipes_dir if fmt == "mergekit" else None,
                       verify=not no_verify, adapter=adapter, placement=placement)
    click.echo(f"built {result.format} export of {model_name}: {result.plan.describe()}")
    click.echo(f"order: {list(result.plan.order)}")
    if result.plan.scaled:
        click.echo(f"residual scales: {list(result.plan.scales)}")
    if result.verification:
        print_verification(result.verification)
    click.echo("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    click.echo(f"export: {result.path}")


@click.command()
@click.argument("folder", type=click.Path(), callback=output_check(folder=True, existing_only=True))
@click.option("--model", "-m", "model_name", default=None, help="Base model (default: the one recorded at build time).")
@click.option("--dtype", default="float32", show_default=True, help="dtype of both models; thresholds follow it.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@placement_options
def verify(folder: str, model_name: str | None, dtype: str, device: str, placement: dict[str, Any]) -> None:
    """Check that an export computes exactly what the in-memory repeat of its base computes.

    Writes FOLDER/verification.json; exits 1 if any threshold fails.
    """
    from rys_forge.verify import verify as run_verify

    report = run_verify(folder, model_name, dtype=dtype, device=device, placement=placement)
    print_verification(report.to_dict())
    if report.settings.get("heal_adapter"):
        click.echo(f"healed: per-visit LoRA adapters in {report.settings['heal_adapter']}/ applied on both sides")
    click.echo(f"verified: {folder}")


@click.command(name="eval")
@click.argument("target", required=False)
@click.option("--model", "-m", "model_name", default=None, help="Evaluate the in-memory repeat of this model (with --window) instead of an export.")
@click.option("--window", "windows", multiple=True, help=f"With --model: window(s) to repeat. {WINDOW_CONVENTION}.")
@click.option("--repeats", default=2, show_default=True, type=int, callback=at_least_two,
              help="With --model: visits of each window's block (2 or more).")
@click.option("--alpha", default=None, type=float, help="With --model: residual scale of the repeated visits (as build --alpha; 1 = plain RYS).")
@click.option("--substeps", default=None, type=int, help="With --model: the second pass as K damped sub-steps at 1/K (as build --substeps).")
@click.option("--base", default=None, help="Base model of TARGET (default: the one recorded at build time).")
@click.option("--tasks", required=True, help="Comma list of tasks: local (rys_arc_easy, rys_piqa, ..., rys_suite) or lm-eval registry names.")
@click.option("--limit", default=None, type=int, help="Items per task (default: all).")
@click.option("--num-fewshot", default=None, type=int, help="Few-shot examples (default: the task's).")
@click.option("--include-path", default=None, type=click.Path(), help="Extra folder of lm-eval task YAMLs.")
@click.option("--batch-size", default="1", show_default=True, help="Batch size (N, auto or auto:N).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--out", default=None, type=click.Path(), help="Folder for eval.json (an export folder gets one anyway).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of lm-eval and the bootstrap.")
@click.option("--adapter", default=None, help="With --model: PEFT adapter merged into the model first (an export records its own).")
@click.option("--no-heal", is_flag=True, help="Ignore TARGET's heal adapter (evaluate the plain export only).")
def eval_command(target: str | None, model_name: str | None, windows: tuple[str, ...], repeats: int, alpha: float | None,
                 substeps: int | None, base: str | None,
                 tasks: str, limit: int | None, num_fewshot: int | None, include_path: str | None, batch_size: str,
                 device: str, dtype: str, out: str | None, seed: int, adapter: str | None, no_heal: bool) -> None:
    """Evaluate TARGET (a verified local export folder) or --model M --window i:j against its base with lm-eval.

    Prints base, RYS, delta and standard errors per task and metric, with a paired test per task
    (McNemar's exact test for accuracies, a paired bootstrap otherwise); saves eval.json.
    A healed TARGET (TARGET/heal from `rys-forge heal`) is evaluated before and after healing.
    Offline by default: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set unless you set them yourself.
    """
    from rys_forge.errors import UsageError
    from rys_forge.evaluate import evaluate, format_table

    if bool(target) == bool(model_name):
        raise UsageError("give either TARGET (an export folder) or --model M --window i:j")
    if model_name and not windows:
        raise UsageError("--model needs at least one --window i:j")
    report = evaluate(
        target, model=model_name, windows=list(windows), repeats=repeats, alpha=alpha, substeps=substeps, base=base,
        tasks=split(tasks), limit=limit,
        num_fewshot=num_fewshot, include_path=include_path, batch_size=batch_size, device=device, dtype=dtype,
        out=out, seed=seed, progress=True, adapter=adapter, heal=not no_heal,
    )
    click.echo(format_table(report))
    for path in report.saved_to:
        click.echo(f"saved: {path}")


@click.command()
@click.argument("folder", type=click.Path(), callback=output_check(folder=True, existing_only=True))
@click.option("--data", required=True, type=click.Path(), help="Training text: .txt (one text per line) or .jsonl (a \"text\" field per line).")
@click.option("--rank", "lora_rank", default=8, show_default=True, type=int, help="LoRA rank r.")
@click.option("--alpha", default=None, type=float, help="LoRA alpha (scaling alpha/r; default: alpha = r).")
@click.option("--steps", default=100, show_default=True, type=int, help="Optimiser steps.")
@click.option("--lr", default=2e-4, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--batch-size", default=4, show_default=True, type=int, help="Token blocks per step.")
@click.option("--max-length", default=256, show_default=True, type=int, help="Tokens per block.")
@click.option("--visits", type=click.Choice(["second", "all"]), default="second", show_default=True,
              help="second: one adapter per repeated visit (2nd, 3rd, ...); all: one per visit of every repeated layer.")
@click.option("--modules", default=None, help="Comma list of linear layers to adapt, e.g. q_proj,v_proj (default: every linear layer).")
@click.option("--kl-weight", default=0.0, show_default=True, type=float, help="Weight of KL(unhealed || healed) added to the loss.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of LoRA initialisation and batch order.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--dtype", default="float32", show_default=True, help="dtype of the export while training (LoRA weights stay float32).")
@click.option("--force", is_flag=True, help="Replace FOLDER/heal if rys-forge wrote it; the old adapter stays until the new one passed verification.")
@click.option("--no-verify", is_flag=True, help="Skip verifying the healed folder (it then cannot be published).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def heal(folder: str, data: str, lora_rank: int, alpha: float | None, steps: int, lr: float, batch_size: int,
         max_length: int, visits: str, modules: str | None, kl_weight: float, seed: int, device: str, dtype: str,
         force: bool, no_verify: bool, no_progress: bool) -> None:
    """Train per-visit LoRA adapters on a layer-list export (next-token loss on --data); save FOLDER/heal.

    Each repeated visit gets its own adapter while the base weights stay frozen and shared. The result is a
    standard PEFT adapter: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FOLDER,
    trust_remote_code=True), FOLDER/heal). Settings and the loss curve go to FOLDER/heal/heal.json; the
    folder is verified again afterwards.
    """
    from rys_forge.heal import HealSettings
    from rys_forge.heal import heal as run_heal

    settings = HealSettings(rank=lora_rank, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size,
                            max_length=max_length, visits=visits, modules=tuple(split(modules)) or None,
                            kl_weight=kl_weight, seed=seed)
    result = run_heal(folder, data, settings, device=device, dtype=dtype, force=force, verify=not no_verify,
                      progress=not no_progress)
    visits_text = ", ".join(f"{v['visit']}(layer {v['layer']})" for v in result.visits)
    click.echo(f"adapted visits: {visits_text}; modules: {', '.join(result.modules)}")
    click.echo(f"trainable parameters: {result.trainable_parameters:,}")
    click.echo(f"loss on the data: {result.loss_before:.4f} -> {result.loss_after:.4f} ({settings.steps} steps)")
    if result.verification:
        print_verification(result.verification)
    click.echo(f"adapter: {result.path}")


@click.command()
@click.argument("folder", type=click.Path())
@click.option("--rank-run", default=None, type=click.Path(), help="Rank run folder: adds the window's probe metrics and score heatmap.")
@click.option("--repo-id", default=None, help="Hub repo id the card will live at (for load snippets).")
def card(folder: str, rank_run: str | None, repo_id: str | None) -> None:
    """Write or refresh FOLDER/README.md, the model card of an export (nothing else is touched)."""
    from rys_forge.publish import write_card

    click.echo(f"wrote {write_card(folder, rank_run, repo_id=repo_id)}")


@click.command()
@click.argument("folder", type=click.Path())
@click.option("--repo-id", required=True, help="Hub repository, owner/name.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to push to (created if missing).")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded; upload nothing.")
@click.option("--exist-ok", is_flag=True, help="Allow pushing into a repository that already has files.")
@click.option("--rank-run", default=None, type=click.Path(), help="Rank run folder for the card's probe metrics and heatmap.")
def publish(folder: str, repo_id: str, private: bool, revision: str | None, dry_run: bool, exist_ok: bool,
            rank_run: str | None) -> None:
    """Push a verified export with a generated model card to the Hugging Face Hub.

    Refuses folders without a passing verification.json or whose files changed since. The token comes
    from `hf auth login` or HF_TOKEN (never printed); HF_ENDPOINT selects another Hub.
    """
    from rys_forge.publish import format_result
    from rys_forge.publish import publish as run_publish

    click.echo(format_result(run_publish(folder, repo_id, private=private, revision=revision, dry_run=dry_run,
                                         exist_ok=exist_ok, rank_run=rank_run)))
