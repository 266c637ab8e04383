"""`card` and `publish`: the model card of an export, rendered from its files, and the verified upload of both.

The card (`README.md` of the export) is rendered from the template `rys_forge/publish/templates/model_card.md`
(edited through `model_cards/model_card.md`, see model_cards/README.md) through
`huggingface_hub.ModelCard.from_template` with `ModelCardData` metadata (`base_model`, `base_model_relation: merge`,
`library_name: transformers`, `license` inherited from the base, `pipeline_tag: text-generation`, tags). It states
the base, the explicit layer plan, unique vs effective parameters (read from the safetensors headers, no model
load), the extra compute per token, how to load the model, the verification table, the `eval.json` table with
deltas, standard errors and p-values, and, given a `rank` run folder, the window's probe metrics and score heatmap.
The output is deterministic: the only date in it is the export's recorded `created`. A PEFT adapter merged into the
base at build time (`rys.adapter`) is named in the base section; a healed export (`heal/`, per-visit LoRA adapters
from `rys-forge heal`) gets a healing section with its training settings and loss, and a loading snippet with peft.

Usage::

    rys-forge card out/gemma-rys-6-10 --rank-run runs/rank-gemma
    rys-forge publish out/gemma-rys-6-10 --repo-id me/gemma-3-270m-rys-6-10 --dry-run
    rys-forge publish out/gemma-rys-6-10 --repo-id me/gemma-3-270m-rys-6-10

`publish` refuses folders that are not verified or changed since verification (`artifacts.check_verified`), renders
the card, and hands the Hub side to `hub.py` (token, repo lookup, one-commit upload, confirmation of every file).
The card's sections are built in `sections.py`, its numbers written by `numbers.py`.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rys_forge.artifacts import (
    CARD_FILE,
    CONFIG_FILE,
    GGUF_RECORD_FILE,
    EVAL_FILE,
    VERIFICATION_FILE,
    RysRecord,
    check_verified,
    read_export_config,
    read_heal_record,
    rys_forge_version,
)
from rys_forge.errors import UsageError
from rys_forge.files import write_atomic
from rys_forge.plan import LayerPlan
from rys_forge.publish import hub, sections
from rys_forge.publish.numbers import byte_size, count_parameters
from rys_forge.publish.sections import HUB_ID_RE
from rys_forge.verify import read_export

__all__ = ["PublishResult", "RenderedCard", "format_result", "publish", "render_card", "save_card", "write_card"]

TEMPLATE = "model_card.md"
TAGS = ["rys", "rys-forge", "layer-repeat"]


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


def _card_data(base: dict[str, Any], fmt: str, healed: bool = False) -> Any:
    from huggingface_hub import ModelCardData

    tags = list(TAGS)
    if fmt == "mergekit":
        tags += ["mergekit", "merge"]
    elif fmt == "layerlist":
        tags.append("custom_code")
    elif fmt == "gguf":
        tags += ["gguf", "llama.cpp"]
    if healed:
        tags += ["peft", "lora"]
    data: dict[str, Any] = {}
    if base["hub_id"]:
        data["base_model"] = base["hub_id"]
        # The Hub's relations are adapter, merge, quantized and finetune; a passthrough self-merge is a merge.
        data["base_model_relation"] = "merge"
    return ModelCardData(library_name="gguf" if fmt == "gguf" else "transformers", license=base["license"],
                         pipeline_tag="text-generation", tags=tags, **data)


def _template_text(template: str | Path | None) -> str:
    if template is not None:
        return Path(template).expanduser().read_text(encoding="utf-8")
    return resources.files("rys_forge.publish").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")


def _summary(base: dict[str, Any], plan: LayerPlan, healed: bool) -> str:
    windows = ", ".join(sections.window_text(str(w)) for w in plan.windows) or "an explicit layer order"
    return (
        f"A *Repeat Your Self* (RYS) variant of **{base['name']}**: the decoder layer block {windows} runs"
        f" {'twice' if plan.repeats == 2 else f'{plan.repeats} times'}, so the model executes {len(plan.order)} layer"
        f" visits instead of {plan.num_layers}."
        + (f" The repeated visits are damped: each adds {plan.alpha:g} x its attention and MLP updates to the residual"
           " stream." if plan.scaled else "")
        + (" Per-visit LoRA adapters heal the repeat (`heal/`)." if healed else "")
        + " Built and verified with rys-forge."
    )


def _provenance(record: RysRecord, fmt: str, folder: Path, base: dict[str, Any], healed: bool) -> str:
    built_by = "?" if record.rys_forge_version is None else record.rys_forge_version
    lines = [
        f"- Built by rys-forge {built_by}" + (f" on {record.created}" if record.created else "") + f"; format `{fmt}`.",
        f"- This card was generated by rys-forge {rys_forge_version()} from"
        f" `{GGUF_RECORD_FILE if fmt == 'gguf' else CONFIG_FILE}`, `{VERIFICATION_FILE}`"
        + (f" and `{EVAL_FILE}`" if (folder / EVAL_FILE).is_file() else "") + " (all in this repo).",
        "- No weights were trained or modified." if not healed and not base.get("adapter") else
        "- Weights: " + "; ".join(
            ([f"adapter `{Path(str(base['adapter'].get('path'))).name}` merged into the base"] if base.get("adapter") else [])
            + (["per-visit LoRA adapters trained by `rys-forge heal` (`heal/heal.json`)"] if healed else [])
        ) + ".",
    ]
    return "\n".join(lines)


def render_card(
    folder: str | Path,
    rank_run: str | Path | None = None,
    *,
    repo_id: str | None = None,
    template: str | Path | None = None,
    verified: dict[str, Any] | None = None,
) -> RenderedCard:
    """Render the model card of an export (nothing is written).

    Args:
        folder: a rys-forge export (config.json with an `rys` block).
        rank_run: a `rys-forge rank` run folder: adds the window's probe metrics and the score heatmap.
        repo_id: the Hub repo the card is for (used in the loading snippet; default: the folder's name).
        template: a Jinja template replacing `rys_forge/publish/templates/model_card.md`.
        verified: the folder's passing verification report when the caller has just checked it
            (`artifacts.check_verified`; saves hashing the folder again).

    Raises:
        VerificationError: the folder is not a rys-forge export.
        UsageError: the rank run or `eval.json` does not belong to this export.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder).expanduser()
    config, record, plan = read_export(folder)
    fmt = "unknown" if record.format is None else str(record.format)
    base = sections.base_facts(config, record)
    repo = repo_id or folder.resolve().name
    verification_section, report = sections.verification_section(folder, verified)
    heal = read_heal_record(folder)
    probe_section, assets = sections.probe_section(Path(rank_run), plan) if rank_run is not None else ("", {})
    card = ModelCard.from_template(
        _card_data(base, fmt, healed=heal is not None),
        template_str=_template_text(template),
        title=repo.split("/")[-1],
        summary=_summary(base, plan, heal is not None),
        weights_statement=sections.weights_statement(base, heal),
        heal_section=sections.heal_section(heal, repo) if heal is not None else "",
        base_section=sections.base_section(base, plan.num_layers),
        plan_section=sections.plan_section(plan, fmt),
        size_section=sections.size_section(count_parameters(folder, plan, per_visit=fmt == "mergekit"), plan,
                                           report.get("metrics", {})),
        load_section=sections.load_section(fmt, repo, folder, base, sections.display_recipe(folder, base)),
        verification_section=verification_section,
        eval_section=sections.eval_section(folder, plan),
        probe_section=probe_section,
        provenance_section=_provenance(record, fmt, folder, base, heal is not None),
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
    return save_card(Path(folder).expanduser(), render_card(folder, rank_run, repo_id=repo_id, template=template).text)


def save_card(folder: Path, text: str) -> Path:
    """Write `text` as the folder's `README.md` (atomically) and return its path."""
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
    head = (f"dry run: would upload {len(result.files)} files ({byte_size(result.total_bytes)}) to {result.repo_id}"
            if result.dry_run else
            f"uploaded {len(result.files)} files ({byte_size(result.total_bytes)}) to {result.repo_id}")
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

    Steps: the verification gate (`artifacts.check_verified`: a passing report whose sha256 of every file still
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
    if not isinstance(repo_id, str) or not HUB_ID_RE.match(repo_id):
        raise UsageError(f"bad --repo-id {repo_id!r}: use owner/name (letters, digits, '.', '-', '_')")
    rendered = render_card(folder, rank_run, repo_id=repo_id, verified=report)
    files = {rel: path for rel, path in hub.upload_files(folder).items() if rel not in rendered.assets}
    files.update(rendered.assets)
    record = read_export_config(folder)[1]
    notes = _local_path_notes(record, folder)
    if dry_run:
        return _dry_run(repo_id, rendered, files, notes, revision=revision, private=private, token=token)
    api, endpoint = hub.connect(token, endpoint)
    existed, remote_files = hub.existing_files(api, endpoint, repo_id, revision)
    occupied = [name for name in remote_files if name != ".gitattributes"]  # a new repo holds only this one
    if occupied and not exist_ok:
        shown = ", ".join(occupied[:5]) + (" ..." if len(occupied) > 5 else "")
        raise hub.RepoExistsError(f"{repo_id} already exists on {endpoint} with {len(occupied)} files ({shown});"
                                  " pass --exist-ok to upload into it (files with the same names are replaced)")
    card = save_card(folder, rendered.text)
    files[CARD_FILE] = card
    message = f"Upload RYS model ({LayerPlan.from_dict(record.plan).describe()}) with rys-forge {rys_forge_version()}"
    url, commit_url = hub.upload(api, endpoint, repo_id, files, dict(report.get("files") or {}), message=message,
                                 private=private, revision=revision, exist_ok=exist_ok or existed)
    if existed:
        notes.append("the repo existed: its visibility was left unchanged")
    stale = sorted(set(remote_files) - set(files) - {".gitattributes"})
    listing = sorted((rel, path.stat().st_size) for rel, path in files.items())
    return PublishResult(repo_id, url, commit_url, revision, private, False, listing, card,
                         rendered.text, existed=existed, stale_remote_files=stale, notes=notes)


def _local_path_notes(record: RysRecord, folder: Path) -> list[str]:
    """Local paths (which name the user's home folder) that the uploaded, verified files record: the base, a merged
    adapter, heal's training data. They stay (verification and `verify` from any directory need them); the card
    shows only folder names, and the user is told before the upload."""
    found = []
    source = str(record.base_model or "")
    if source.startswith(("/", "~", ".")) or Path(source).is_absolute():
        found.append(f"the base {source} (config.json, {VERIFICATION_FILE}, a mergekit recipe)")
    if record.adapter and record.adapter.get("local"):
        found.append(f"the merged adapter {record.adapter.get('path')} (config.json, {VERIFICATION_FILE})")
    heal = read_heal_record(folder) or {}
    data = (heal.get("data") or {}).get("path") if isinstance(heal.get("data"), dict) else None
    if data:
        found.append(f"the heal data {data} (heal/heal.json)")
    return [f"the upload records local paths: {'; '.join(found)}; they are uploaded as they are (verified files),"
            " the card shows only folder names"] if found else []


def _dry_run(repo_id: str, rendered: RenderedCard, files: dict[str, Path], notes: list[str], *, revision: str | None,
             private: bool, token: str | None) -> PublishResult:
    """What the upload would send (the card rendered into a temporary folder); contacts nobody."""
    with tempfile.TemporaryDirectory(prefix="rys-card-") as tmp:
        card = Path(tmp) / CARD_FILE
        card.write_text(rendered.text, encoding="utf-8")
        files[CARD_FILE] = card
        listing = sorted((rel, path.stat().st_size) for rel, path in files.items())
    if hub.offline():
        notes.append("HF_HUB_OFFLINE is set: the real upload would stop here; unset it to publish")
    if not hub.find_token(token):
        notes.append(f"no Hugging Face token found: the real upload would stop here; {hub.LOGIN_HINT}")
    notes.append(f"{CARD_FILE} was rendered into a temporary folder; the export's own {CARD_FILE} is unchanged")
    return PublishResult(repo_id, None, None, revision, private, True, listing, None, rendered.text, notes=notes)
