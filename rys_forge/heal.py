"""`heal`: train one LoRA adapter per repeated visit of a layer-list export, next-token loss on a text file.

A layer-list export runs some base layers more than once, and every visit uses the same weights. A LoRA on
such a shared module would apply to every visit (which is what plain peft gives on a weight-tied model), so
`heal` gives each chosen visit its own adapter instead: the export registers each visit's modules under
`<layers>.visits.<p>.*` (copies that share the base tensors, see `modeling_rys.py`), and the
adapter's `target_modules` is a regex over exactly those names. The base weights stay frozen and stored
once (one storage, checked by `data_ptr()` in the tests); only the LoRA A/B matrices of the chosen visits
train. With peft's default initialisation (B = 0) the healed model starts out equal to the unhealed one.

Visits: `second` adapts the repeated visits (the 2nd, 3rd, ... visit of each window layer), leaving the
first pass as the base model computes it; `all` gives every visit of a repeated layer its own adapter.

Training: torch AdamW on the LoRA parameters; the text file (`.txt`: one text per non-empty line; `.jsonl`:
a `text` field per line) is tokenised, joined with EOS and cut into blocks of `max_length` tokens; loss =
mean next-token cross-entropy, plus `kl_weight` x KL(unhealed || healed) of the next-token distributions
(the unhealed logits come from the same model with the adapters disabled).

Output, written to a temporary folder and renamed into place::

    DIR/heal/adapter_config.json, adapter_model.safetensors   a standard PEFT adapter
    DIR/heal/heal.json                                         settings, data, loss before/after, loss curve

then the folder is verified again (`verification.json` then covers `heal/`; `verify` runs the same LoRA on
the in-memory repeat through `adapters.attach_visit_adapters`). A previous adapter (`--force`, only one rys-forge
wrote) is kept beside it until that verification passed; if it fails, the folder is put back as it was. The
export's code is checked (`artifacts.check_export`) before it is loaded. The folder's names and its reading
(`heal_adapter_dir`, `read_heal_record`) belong to `rys_forge.artifacts`. Load it with::

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    model = PeftModel.from_pretrained(model, f"{DIR}/heal")
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rys_forge.adapters import quiet_peft
from rys_forge.architectures import arch_spec, get_path
from rys_forge.artifacts import (
    CONFIG_FILE,
    GGUF_RECORD_FILE,
    HEAL_DIR,
    HEAL_FILE,
    VERIFICATION_FILE,
    RysRecord,
    check_export,
    check_heal_replaceable,
    timestamp,
    versions,
)
from rys_forge.divergence import kl_from_logits
from rys_forge.errors import RysForgeError, UsageError
from rys_forge.files import sha256_file, staging_dir, swapped_in, write_atomic
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.verify import verify as run_verify

__all__ = ["HealResult", "HealSettings", "adapted_visits", "attach_heal_lora", "heal", "read_texts", "token_blocks",
           "train"]

HEAL_FORMAT = 1
VISIT_MODES = ("second", "all")


@dataclass
class HealSettings:
    """How `heal` trains (every field is recorded in heal.json).

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r); None means alpha = r.
        steps: optimiser steps.
        lr: AdamW learning rate.
        batch_size: token blocks per step.
        max_length: tokens per block.
        visits: `second` (repeated visits only) or `all` (every visit of a repeated layer).
        modules: leaf names of the linear layers to adapt (e.g. `q_proj`); None: every linear layer.
        kl_weight: weight of KL(unhealed || healed) added to the next-token loss; 0 turns it off.
        seed: seed of LoRA-A initialisation and batch order.
    """

    rank: int = 8
    alpha: float | None = None
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    max_length: int = 256
    visits: str = "second"
    modules: tuple[str, ...] | None = None
    kl_weight: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        """Raises UsageError naming the option, the bad value and what is allowed."""
        for name, flag in (("rank", "--rank"), ("steps", "--steps"), ("batch_size", "--batch-size"),
                           ("max_length", "--max-length")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{flag} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2 tokens (one next-token target), got {self.max_length}")
        if not (self.lr > 0 and self.lr == self.lr):
            raise UsageError(f"--lr must be a positive number, got {self.lr!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise UsageError(f"--alpha must be a positive number, got {self.alpha!r}")
        if not self.kl_weight >= 0:
            raise UsageError(f"--kl-weight must be >= 0, got {self.kl_weight!r}")
        if self.visits not in VISIT_MODES:
            raise UsageError(f"--visits must be one of {', '.join(VISIT_MODES)}, got {self.visits!r}")


@dataclass
class HealResult:
    """Where the adapter went, what it adapts, and how the loss moved."""

    path: Path
    settings: HealSettings
    visits: list[dict[str, int]]
    modules: list[str]
    trainable_parameters: int
    loss_before: float
    loss_after: float
    curve: list[dict[str, float]]
    verification: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- which modules of which visits


def adapted_visits(plan: LayerPlan, mode: str) -> list[int]:
    """Visit positions that get an adapter: the repeated ones (`second`) or every visit of a repeated layer (`all`)."""
    counts: dict[int, int] = {}
    for k in plan.order:
        counts[k] = counts.get(k, 0) + 1
    seen: set[int] = set()
    chosen = []
    for p, k in enumerate(plan.order):
        if counts[k] > 1 and (mode == "all" or k in seen):
            chosen.append(p)
        seen.add(k)
    return chosen


def linear_modules(layer: nn.Module, wanted: tuple[str, ...] | None = None) -> list[str]:
    """Names (relative to a decoder layer) of its linear layers, optionally only those with the wanted leaf names.

    Raises:
        UsageError: a wanted name is not a linear layer of the decoder layer (the message lists them).
    """
    names = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear) and name]
    if not wanted:
        return names
    unknown = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UsageError(f"--modules {','.join(unknown)}: not a linear layer of the decoder layer; choose from {', '.join(leaves)}")
    return [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]


def target_pattern(layers_path: str, visits: list[int], modules: list[str]) -> str:
    """The `target_modules` regex of the adapter: exactly the chosen modules of the chosen visits."""
    return (rf"{re.escape(layers_path)}\.visits\.(?:{'|'.join(str(p) for p in visits)})"
            rf"\.(?:{'|'.join(re.escape(m) for m in modules)})")


def attach_heal_lora(model: nn.Module, plan: LayerPlan, settings: HealSettings) -> Any:
    """Wrap a loaded layer-list export in a PeftModel with one LoRA per chosen visit (B = 0: no change yet).

    Returns:
        The PeftModel (its `rys_heal` attribute holds the visits and module names).

    Raises:
        UsageError: the export does not name its visits (built by an older rys-forge), or no visit repeats.
    """
    from peft import LoraConfig, get_peft_model

    spec = arch_spec(model.config.model_type)
    layers = get_path(model, spec.layers_path)
    if "visits" not in getattr(layers, "_modules", {}):
        raise UsageError("this export's modeling_rys.py does not name per-visit modules (built by an older"
                         " rys-forge); rebuild it with `rys-forge build`")
    visits = adapted_visits(plan, settings.visits)
    if not visits:
        raise UsageError(f"the plan {plan.describe()} repeats no layer: nothing to heal")
    modules = linear_modules(layers.base_layers()[plan.order[visits[0]]], settings.modules)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=0.0,
                        target_modules=target_pattern(spec.layers_path, visits, modules), bias="none")
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # peft draws LoRA-A from the global generator; leave it as it was
        torch.manual_seed(settings.seed)
        with quiet_peft():
            wrapped = get_peft_model(model, config)
    wrapped.rys_heal = {"visits": visits, "modules": modules}
    return wrapped


# --------------------------------------------------------------------------- data


def read_texts(path: str | Path) -> list[str]:
    """Texts of a `.txt` (one per non-empty line) or `.jsonl` (`text` field) file.

    Raises:
        UsageError: missing file, other extension, bad JSON line, or no text at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise UsageError(f"data file {path} must be .txt (one text per line) or .jsonl (a \"text\" field per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"data file {path} is not UTF-8 text") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}:{number} has no \"text\" string field")
        if record["text"].strip():
            texts.append(record["text"])
    if not texts:
        raise UsageError(f"data file {path} holds no text")
    return texts


def token_blocks(tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """The texts tokenised, joined with EOS and cut into blocks: `[n_blocks, max_length]` (one shorter
    block when all tokens fit in less). A partial last block is dropped when there are full ones.

    Raises:
        UsageError: fewer than 2 tokens in total.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            stream.append(eos)
    if len(stream) < 2:
        raise UsageError("the data holds fewer than 2 tokens: nothing to predict")
    if len(stream) <= max_length:
        return torch.tensor([stream])
    n = len(stream) // max_length
    return torch.tensor(stream[: n * max_length]).view(n, max_length)


# --------------------------------------------------------------------------- training


def _losses(model: Any, ids: torch.Tensor, ref_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy and mean KL(ref || model) over positions (0 without `ref_logits`)."""
    logits = model(input_ids=ids, use_cache=False).logits.float()  # [batch, seq, vocab]
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if ref_logits is None:
        return ce, torch.zeros((), device=ce.device)
    return ce, kl_from_logits(ref_logits, logits).mean()


@torch.no_grad()
def mean_loss(model: Any, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of `model` over `blocks` (token-weighted)."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        ce, _ = _losses(model, ids, None)
        tokens = ids[:, 1:].numel()
        total, count = total + ce.item() * tokens, count + tokens
    return total / count


def _batches(n_blocks: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Block indices per step: epochs of a seeded permutation, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n_blocks)
    order: list[int] = []
    while len(order) < steps * size:
        order.extend(torch.randperm(n_blocks, generator=generator).tolist())
    return [torch.tensor(order[s * size : (s + 1) * size]) for s in range(steps)]


def train(wrapped: Any, blocks: torch.Tensor, settings: HealSettings, progress: bool = False) -> list[dict[str, float]]:
    """AdamW on the LoRA parameters of `wrapped` for `settings.steps` steps; returns the loss curve.

    Raises:
        RysForgeError: the loss became NaN or infinite (nothing is saved then).
    """
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    device = next(wrapped.parameters()).device
    curve = []
    with _Progress(progress, settings.steps) as advance:
        for step, index in enumerate(_batches(len(blocks), settings.batch_size, settings.steps, settings.seed), 1):
            ids = blocks[index].to(device)
            ref = None
            if settings.kl_weight > 0:
                with torch.no_grad(), wrapped.disable_adapter():
                    ref = wrapped(input_ids=ids, use_cache=False).logits.float()
            ce, kl = _losses(wrapped, ids, ref)
            loss = ce + settings.kl_weight * kl
            if not torch.isfinite(loss):
                raise RysForgeError(f"training diverged (loss {loss.item()} at step {step}); lower --lr")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            curve.append({"step": step, "loss": loss.item(), "ce": ce.item(), "kl": kl.item()})
            advance(loss.item())
    return curve


class _Progress:
    """A rich progress bar showing the loss (or nothing), used as `with _Progress(...) as advance:`."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("heal"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task("heal", total=self.total, loss="-")
        return lambda loss: self.bar.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- the command


def _read_plan(folder: Path) -> LayerPlan:
    """The plan of a layer-list export (UsageError for anything else)."""
    if not folder.is_dir():
        raise UsageError(f"export folder not found: {folder}")
    if not (folder / CONFIG_FILE).exists() and (folder / GGUF_RECORD_FILE).is_file():
        raise UsageError(f"{folder} is a gguf export; heal needs a layer-list export (build --format layerlist)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{folder} has no readable config.json; heal needs a rys-forge layer-list export") from None
    record = RysRecord.from_config(config)
    if record is None or not isinstance(record.plan, dict):
        raise UsageError(f"{folder} is not a rys-forge export (config.json has no rys.plan)")
    if record.format != "layerlist":
        raise UsageError(f"{folder} is a {record.format} export; heal needs a layer-list export"
                         " (mergekit exports store every visit's weights: plain peft already adapts each one)")
    return LayerPlan.from_dict(record.plan)


def _record(wrapped: Any, plan: LayerPlan, settings: HealSettings, data: str | Path, texts: list[str],
            blocks: torch.Tensor, eval_blocks: torch.Tensor, losses: tuple[float, float], curve: list[dict[str, float]],
            dtype: str, timings: dict[str, float]) -> dict[str, Any]:
    """heal.json: settings, data, plan, what the adapter adapts, the loss, versions and timings."""
    device = next(wrapped.parameters()).device
    visits = [{"visit": p, "layer": plan.order[p]} for p in wrapped.rys_heal["visits"]]
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return {
        "rys_forge_heal": HEAL_FORMAT,
        "settings": {**asdict(settings), "alpha": settings.alpha or settings.rank,
                     "modules": list(settings.modules) if settings.modules else None,
                     "optimizer": "AdamW (weight_decay 0)", "device": str(device), "dtype": dtype},
        "data": {"path": str(Path(data).expanduser().resolve()), "sha256": sha256_file(Path(data).expanduser()),
                 "texts": len(texts), "blocks": int(blocks.shape[0]), "block_tokens": int(blocks.shape[1])},
        "plan": plan.to_dict(),
        "adapter": {"visits": visits, "modules": wrapped.rys_heal["modules"], "trainable_parameters": trainable,
                    "target_modules": wrapped.peft_config["default"].target_modules},
        "loss": {"before": losses[0], "after": losses[1], "eval_blocks": int(eval_blocks.shape[0]), "curve": curve},
        "versions": versions("peft", "transformers", "torch"),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": timestamp(),
    }


def _stage(wrapped: Any, staging: Path, record: dict[str, Any]) -> Path:
    """Write the adapter and heal.json, complete, as `staging/heal` (save_pretrained makes it with the usual
    permissions)."""
    fresh = staging / HEAL_DIR
    wrapped.save_pretrained(fresh)
    (fresh / "README.md").unlink(missing_ok=True)  # peft's empty card template; the export's card covers it
    (fresh / HEAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return fresh


def _swap_in_checked(fresh: Path, folder: Path, staging: Path, check: Any) -> None:
    """Swap the staged adapter in as `folder/heal` and run `check` (the verification, or nothing). A previous adapter
    waits inside `staging` until `check` passed; if it fails (or anything interrupts it, SIGTERM included), the new
    adapter is removed and the previous adapter and `verification.json` are put back as they were."""
    report = folder / VERIFICATION_FILE
    previous_report = report.read_bytes() if report.is_file() else None
    try:
        with swapped_in(fresh, folder / HEAL_DIR, staging / "previous"):
            check()
    except BaseException:
        if previous_report is None:
            report.unlink(missing_ok=True)
        else:
            write_atomic(report, previous_report)
        raise


def heal(
    folder: str | Path,
    data: str | Path,
    settings: HealSettings | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> HealResult:
    """Train per-visit LoRA adapters on a layer-list export and save them as `folder/heal`.

    Args:
        folder: a layer-list export (`rys-forge build`).
        data: `.txt` or `.jsonl` training text.
        settings: see `HealSettings`.
        device, dtype: where and in which dtype the export is loaded and trained (LoRA weights stay float32).
        force: replace an existing `folder/heal`, if rys-forge wrote it (`artifacts.check_heal_replaceable`).
        verify: verify the folder again afterwards (the export + adapter against the in-memory repeat + adapter).
        progress: show a progress bar with the loss.

    Raises:
        UsageError: bad folder, not a layer-list export, existing adapter without `force`, bad data or settings.
        VerificationError: the folder holds code rys-forge did not write (`artifacts.check_export`, before
            loading), or the healed folder fails verification (the new adapter is removed; a previous adapter
            and its verification.json are kept as they were).
    """
    settings = settings or HealSettings()
    settings.validate()
    folder = Path(folder).expanduser().resolve()
    plan = _read_plan(folder)
    if os.path.lexists(folder / HEAL_DIR):
        check_heal_replaceable(folder / HEAL_DIR)  # someone's own folder is never replaced, --force or not
        if not force:
            raise UsageError(f"{folder / HEAL_DIR} exists; pass --force to replace it")
    check_export(folder)  # the folder's code is the generated one: before it is loaded (and run)
    texts = read_texts(data)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(str(folder), dtype=dtype, device=device, trust_remote_code=True)
    blocks = token_blocks(loaded.tokenizer, texts, settings.max_length)
    wrapped = attach_heal_lora(loaded.model, plan, settings)
    wrapped.eval()  # no dropout anywhere: the LoRA trains against the model as it runs at inference
    timings["load_s"] = time.perf_counter() - t0
    eval_blocks = blocks[:64].to(next(wrapped.parameters()).device)
    loss_before = mean_loss(wrapped, eval_blocks, settings.batch_size)
    t0 = time.perf_counter()
    curve = train(wrapped, blocks, settings, progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    loss_after = mean_loss(wrapped, eval_blocks, settings.batch_size)
    record = _record(wrapped, plan, settings, data, texts, blocks, eval_blocks, (loss_before, loss_after), curve,
                     dtype, timings)
    result = HealResult(path=folder / HEAL_DIR, settings=settings, visits=record["adapter"]["visits"],
                        modules=wrapped.rys_heal["modules"], trainable_parameters=record["adapter"]["trainable_parameters"],
                        loss_before=loss_before, loss_after=loss_after, curve=curve, seconds=timings)

    def check() -> None:
        if verify:
            t0 = time.perf_counter()
            result.verification = run_verify(folder, dtype=dtype, device=device).to_dict()
            result.seconds["verify_s"] = time.perf_counter() - t0

    with staging_dir(folder, HEAL_DIR) as staging:  # artifacts.HEAL_STAGING: not part of the verified export
        fresh = _stage(wrapped, staging, record)
        del wrapped, loaded  # verification loads the export again
        _swap_in_checked(fresh, folder, staging, check)
    return result
