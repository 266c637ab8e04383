"""rank: probes against independent references, and the run folder (resume, errors, outputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import rys_forge.rank
from rys_forge.architectures import ArchSpec
from rys_forge.cli import main
from rys_forge.errors import UsageError
from rys_forge.models import load_model
from rys_forge.plan import LayerPlan
from rys_forge.rank import Prompt, RankSettings, ScoreConfig, rank_windows, score
from rys_forge.rank import probes as probes_module
from rys_forge.rank.activations import ActivationCache, CachedBatch, cache_activations
from rys_forge.rank.probes import ProbeSettings, Trajectory, jacobian_spectrum, probe_window
from rys_forge.repeat import repeated

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "2 + 2 = 4, 3 * 7 = 21, and 10 / 4 = 2.5 in decimal arithmetic.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
]


@pytest.fixture(scope="module")
def gemma(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["gemma3_text"]))


@pytest.fixture(scope="module")
def cache(gemma):
    return cache_activations(gemma.model, gemma.tokenizer, TEXTS, ["a", "b", "a", "b"], max_tokens=20, batch_size=3, kl_positions=5)


def _capture_inputs(model, ids, mask, positions):
    """Residual stream entering the given visit positions of the (repeated) model."""
    seen = {}
    hooks = [
        model.model.layers[p].register_forward_pre_hook(lambda m, a, k, p=p: seen.__setitem__(p, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        for p in positions
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen, out.logits


@pytest.mark.parametrize("repeats,alpha", [(2, 1.0), (3, 1.0), (2, 0.5), (3, 0.5)])
def test_iterates_equal_manual_forward_through_repeated_model(gemma, cache, repeats, alpha):
    """z_n and the KL probe against the repeated model itself, plain and damped (`rank --alpha`: the repeated
    visits at residual scale alpha; gemma3 puts the scale on its post-norms)."""
    i, j = 2, 5
    batch = cache.batches[0]
    mask = (batch.input_ids != gemma.tokenizer.pad_token_id).long()
    plan = LayerPlan.from_windows([f"{i}:{j}"], 8, repeats, alpha)
    # In the repeated model, visit position j + (n-1)(j-i) receives z_n.
    positions = [j + (n - 1) * (j - i) for n in range(1, repeats + 1)]
    with repeated(gemma.model, plan):
        seen, logits = _capture_inputs(gemma.model, batch.input_ids, mask, positions)
    t = Trajectory(cache, i, j, ProbeSettings(alpha=alpha))
    with torch.no_grad():
        for n, p in enumerate(positions, start=1):
            assert (t.states(n)[0] - seen[p])[batch.valid].abs().max().item() <= 1e-5
        if alpha != 1:  # the damped iterates are not the plain ones
            plain = Trajectory(cache, i, j, ProbeSettings())
            assert (plain.states(2)[0] - t.states(2)[0])[batch.valid].abs().max().item() > 1e-3
        assert torch.equal(t.states(1)[0], batch.hidden[j])  # z_1 is the cached x_j
        if repeats == 2:
            # KL probe against torch.distributions on the repeated model's own logits.
            rows, cols = batch.kl_index[:, 0], batch.kl_index[:, 1]
            base_logits = gemma.model(input_ids=batch.input_ids, attention_mask=mask).logits[rows, cols]
            kl_ref = torch.distributions.kl_divergence(
                torch.distributions.Categorical(logits=base_logits), torch.distributions.Categorical(logits=logits[rows, cols])
            )
            kl_probe, _ = t.kl_per_position(2)
            assert torch.allclose(kl_probe[: kl_ref.numel()], kl_ref, atol=1e-6, rtol=1e-4)
            # Wildly different distributions must not overflow (exp of large logit gaps).
            far = batch.base_logits[: 2] + 200.0 * torch.eye(2, batch.base_logits.shape[1])
            kl_far, _ = cache.kl_to_base(batch, torch.cat([far, batch.base_logits[2:]]))
            ref_far = torch.distributions.kl_divergence(  # float64: float32 underflows to inf here
                torch.distributions.Categorical(logits=batch.base_logits[:2].double()),
                torch.distributions.Categorical(logits=far.double()),
            ).float()
            assert torch.isfinite(kl_far).all() and torch.allclose(kl_far[:2], ref_far, rtol=1e-4)


def test_residual_force_closed_form_matches_raw_cosine(cache):
    row = probe_window(cache, 1, 4, ["residual_force"], ProbeSettings())
    x_i = cache.pooled(1).double()
    x_j = cache.pooled(4).double()
    raw = (x_i * x_j).sum() / (x_i.norm() * x_j.norm())
    closed = (1 + row["rho"] * row["cos_phi"]) / math.sqrt(1 + row["rho"] ** 2 + 2 * row["rho"] * row["cos_phi"])
    assert abs(closed - raw.item()) <= 1e-9
    assert abs(row["cos_raw"] - raw.item()) <= 1e-9
    assert abs(row["rho"] - ((x_j - x_i).norm() / x_i.norm()).item()) <= 1e-9


def test_score_and_delta_definitions(cache):
    row = probe_window(cache, 2, 6, ["update", "cka", "decoder", "kl"], ProbeSettings())
    t = Trajectory(cache, 2, 6, ProbeSettings())
    with torch.no_grad():
        z = [t.z(n).double() for n in range(4)]
    d0 = ((z[1] - z[0]).norm() / z[0].norm()).item()
    d1 = ((z[2] - z[1]).norm() / z[1].norm()).item()
    assert row["delta_0"] == pytest.approx(d0, rel=1e-9) and row["r_0"] == pytest.approx(d1 / d0, rel=1e-9)
    config = ScoreConfig()
    s = score(row, config)
    expected = (
        math.exp(-config.alpha * (1 - row["cka_plateau"])) * d0 / (d0 + config.c)
        * math.exp(-config.beta * max(0.0, d1 / d0 - 1)) * math.exp(-config.gamma * row["d_dec"] - config.eta * row["d_kl"])
    )
    assert s["score"] == pytest.approx(expected, rel=1e-9)


class _LinearResidual(nn.Module):
    def __init__(self, a: torch.Tensor, eps: float):
        super().__init__()
        self.a, self.eps = a, eps

    def forward(self, z, **_):
        return z + self.eps * z @ self.a.T


def test_n2_law_on_near_linear_residual_block():
    """T(z) = z + eps A z: 1-CKA(z_n, z_0) ~ n^2 (1-CKA(z_1, z_0)) to first order in eps."""
    gen = torch.Generator().manual_seed(0)
    d, n_tokens = 16, 400
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    x0 = torch.randn(1, n_tokens, d, generator=gen, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64))
    layer = _LinearResidual(a, eps=0.01)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    batch = CachedBatch(
        input_ids=torch.zeros(1, n_tokens, dtype=torch.long), valid=torch.ones(1, n_tokens, dtype=torch.bool),
        hidden=[x0, layer(x0)], layer_kwargs=[{}], kl_index=torch.zeros(0, 2, dtype=torch.long), base_logits=None, base_top1=None, families=["x"],
    )
    cache = ActivationCache(model=model, spec=ArchSpec(), batches=[batch], num_layers=1)
    row = probe_window(cache, 0, 1, ["cka", "n2_fit"], ProbeSettings())
    assert row["n2_r2_pure"] > 0.995
    assert row["n2_a_pure"] == pytest.approx(row["cka_drift_1"], rel=0.05)
    assert row["cka_drift_2"] / row["cka_drift_1"] == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_jacobian_top_singular_value_matches_explicit_jacobian(tiny_model_dirs, alpha):
    loaded = load_model(str(tiny_model_dirs["llama"]))
    small = cache_activations(loaded.model, loaded.tokenizer, TEXTS[:1], max_tokens=6, kl_positions=0)
    settings = ProbeSettings(jacobian_k=2, jacobian_iters=300, alpha=alpha)
    values = jacobian_spectrum(small, 1, 3, settings)
    batch = small.batches[0]
    z0 = batch.hidden[1].detach()
    # The damped block by hand: x + alpha * branch(x) around every sublayer of layers 1 and 2.
    branch = [(m.self_attn.o_proj, m.mlp.down_proj) for m in loaded.model.model.layers]
    handles = [module.register_forward_hook(lambda m, a, out: out * alpha) for pair in branch[1:3] for module in pair]
    try:
        jac = torch.autograd.functional.jacobian(lambda z: small.block(batch, 1, 3, z), z0)
    finally:
        for handle in handles:
            handle.remove()
    reference = torch.linalg.svdvals(jac.reshape(z0.numel(), z0.numel()).double())
    assert values["jac_sv_1"] == pytest.approx(reference[0].item(), rel=1e-3)
    assert values["jac_sv_2"] == pytest.approx(reference[1].item(), rel=1e-2)


def _prompts():
    return [Prompt(f"p{k}", fam, text) for k, (fam, text) in enumerate(zip(["a", "b", "a", "b"], TEXTS))]


def test_rank_run_folder_resume_and_outputs(gemma, tmp_path, monkeypatch):
    settings = RankSettings(max_tokens=16, jacobian_top=2, jacobian_iters=3, top_k=3, overlap_families=("a", "b"))
    full = rank_windows(gemma.model, gemma.tokenizer, _prompts(), settings, out_dir=tmp_path / "full", progress=False)
    assert len(full.rows) == 28  # 8 layers, width >= 2
    for row in full.rows:
        for key in ("score", "cka_plateau", "delta_0", "r_0", "d_dec", "d_kl", "mmd2", "mahalanobis", "n2_a"):
            assert not math.isnan(row[key]), (row["window"], key)
    assert full.summary["self_check"]["max_abs_diff"] == 0.0
    assert "jac_sv_1" in full.rows[0] and "jac_sv_1" not in full.rows[-1]
    assert [r["score"] for r in full.rows] == sorted((r["score"] for r in full.rows), reverse=True)
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"windows.csv", "windows.json", "summary.json", "heatmap_score.png", "heatmap_d_kl.png", "layer_cka.png", "repeat_curves.png"} <= files
    assert full.summary["family_overlap"]["k"] == 3

    # Interrupt after 5 windows, then resume: the same table.
    real = probes_module.probe_window
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("rys_forge.rank.pipeline.probe_window", flaky)
    with pytest.raises(KeyboardInterrupt):
        rank_windows(gemma.model, gemma.tokenizer, _prompts(), settings, out_dir=tmp_path / "part", progress=False)
    log = (tmp_path / "part" / "windows.jsonl").read_text().splitlines()
    assert len(log) == 5 and not (tmp_path / "part" / "summary.json").exists()
    with (tmp_path / "part" / "windows.jsonl").open("a") as handle:
        handle.write('{"window": "7:8", "torn')  # a torn last line must be ignored
    monkeypatch.setattr("rys_forge.rank.pipeline.probe_window", real)
    with pytest.raises(UsageError, match="--resume"):
        rank_windows(gemma.model, gemma.tokenizer, _prompts(), settings, out_dir=tmp_path / "part", progress=False)
    other = RankSettings(**{**settings.__dict__, "max_tokens": 17})
    with pytest.raises(UsageError, match="settings differ"):
        rank_windows(gemma.model, gemma.tokenizer, _prompts(), other, out_dir=tmp_path / "part", resume=True, progress=False)
    with pytest.raises(UsageError, match="settings differ"):  # same settings, another (merged) adapter
        rank_windows(gemma.model, gemma.tokenizer, _prompts(), settings, out_dir=tmp_path / "part", resume=True,
                     progress=False, model_info={"adapter": {"path": "other-adapter"}})
    resumed = rank_windows(gemma.model, gemma.tokenizer, _prompts(), settings, out_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed.summary["timings"]["windows_probed_this_session"] == 23
    by_window = {r["window"]: r for r in full.rows}
    for row in resumed.rows:
        assert row["score"] == pytest.approx(by_window[row["window"]]["score"], rel=1e-9, abs=1e-12)


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_kl_fraction_is_the_kl_of_the_chosen_prompts(gemma, monkeypatch):
    """With --kl-fraction the tail pass runs on the KL prompts' batches only, and D_KL is exactly the
    full run's per-position KL averaged over those prompts (positions depend on the prompt, not the batch)."""
    texts = TEXTS * 3
    full = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3)
    part = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3,
                             deep_fraction=0.5, kl_fraction=0.25)
    kl_prompts = {k for b in part.batches if b.kl_index.numel() for k in b.prompt_ids}
    deep_prompts = {k for b in part.batches if b.deep for k in b.prompt_ids}
    assert len(kl_prompts) == 3 and kl_prompts <= deep_prompts  # round(0.25 * 12), nested in the deep set
    assert all(b.kl_index.numel() == 0 for b in part.batches if not set(b.prompt_ids) <= kl_prompts)

    t_full = Trajectory(full, 2, 5, ProbeSettings())
    kl_full, _ = t_full.kl_per_position(2)
    owner = [b.prompt_ids[r] for b in full.batches for r in b.kl_index[:, 0].tolist()]
    expected = kl_full[torch.tensor([k in kl_prompts for k in owner])].double().mean().item()

    tails = []
    original = ActivationCache.tail_states
    monkeypatch.setattr(ActivationCache, "tail_states", lambda self, batch, *a: tails.append(batch) or original(self, batch, *a))
    a = probe_window(full, 2, 5, ["update", "cka", "decoder"], ProbeSettings())
    b = probe_window(part, 2, 5, ["update", "cka", "decoder", "kl"], ProbeSettings())
    assert b["d_kl"] == pytest.approx(expected, rel=1e-5)
    assert tails and all(batch.kl_index.numel() for batch in tails)  # no tail pass for prompts without KL
    for key in ("cka_plateau", "delta_0", "r_0", "d_dec"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def _linear_cka64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased linear CKA in float64 from the feature-space formula ||A'B||^2 / (||A'A|| ||B'B||), A, B centred."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


def test_visit_fraction_computes_z2_on_its_share_only(gemma, monkeypatch):
    """`--visit-fraction 0.5`: z_2 is replayed on half of the prompts (holding the deep and KL ones); r_0, D_dec and
    stationarity are those of the visit prompts' tokens, the plateau CKA and delta_0 those of every token, and
    D_KL is unchanged: each against float64 formulas on the full cache's states."""
    texts = TEXTS * 3
    full = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3)
    part = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3,
                             deep_fraction=0.25, kl_fraction=0.25, visit_fraction=0.5)
    members = lambda flag: {k for b in part.batches if getattr(b, flag) for k in b.prompt_ids}  # noqa: E731
    visit, deep = members("visit"), members("deep")
    kl = {k for b in part.batches if b.kl_index.numel() for k in b.prompt_ids}
    assert len(visit) == 6 and deep <= visit and kl <= visit and len(deep) == len(kl) == 3

    replayed = []
    original = ActivationCache.block
    monkeypatch.setattr(ActivationCache, "block", lambda self, batch, *a: replayed.append(batch.visit) or original(self, batch, *a))
    names = ["update", "cka", "stationarity", "decoder", "kl"]
    got = probe_window(part, 2, 5, names, ProbeSettings())
    assert replayed and all(replayed)  # no layer replay for a prompt outside the visit share
    monkeypatch.setattr(ActivationCache, "block", original)

    every = probe_window(full, 2, 5, names, ProbeSettings())
    for key in ("r_0", "d_dec", "stat_ratio"):  # the share's numbers are not the full run's (the test can tell)
        assert abs(got[key] - every[key]) > 1e-3 * abs(every[key]), key
    t = Trajectory(full, 2, 5, ProbeSettings())
    with torch.no_grad():
        z = [t.states(n) for n in range(3)]
    pool = lambda n, keep: torch.cat([s[n][b.valid & torch.tensor([k in keep for k in b.prompt_ids])[:, None]]  # noqa: E731
                                      for s, b in zip([[z[m][i] for m in range(3)] for i in range(len(full.batches))], full.batches)])
    everyone = set(range(len(texts)))
    z0, z1 = pool(0, everyone).double(), pool(1, everyone).double()
    v0, v1, v2 = (pool(n, visit).double() for n in range(3))
    step = lambda a, b: float((b - a).norm() / a.norm())  # noqa: E731
    assert got["cka_plateau"] == pytest.approx(_linear_cka64(z0, z1), rel=1e-9)
    assert got["delta_0"] == pytest.approx(step(z0, z1), rel=1e-9)
    assert got["delta_1"] == pytest.approx(step(v1, v2), rel=1e-5)
    assert got["r_0"] == pytest.approx(step(v1, v2) / step(v0, v1), rel=1e-5)
    assert got["d_dec"] == pytest.approx(1 - _linear_cka64(v2, v1), rel=1e-4, abs=1e-7)
    assert got["stat_ratio"] == pytest.approx(float((v2 - v1).norm() / (v1 - v0).norm()), rel=1e-5)
    kl_full, _ = t.kl_per_position(2)
    owner = [b.prompt_ids[r] for b in full.batches for r in b.kl_index[:, 0].tolist()]
    assert got["d_kl"] == pytest.approx(kl_full[torch.tensor([k in kl for k in owner])].double().mean().item(), rel=1e-5)
    # every prompt in the share: the numbers of a run without the option
    same = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3, visit_fraction=1.0)
    assert probe_window(same, 2, 5, names, ProbeSettings()) == every


def test_visit_fraction_keeps_a_second_visit_in_every_family(tiny_model_dirs, tmp_path):
    """`--overlap` compares the score's inputs per prompt family: the visit share holds at least one prompt of each
    family, so a small share still gives every family its r_0 and D_dec."""
    out = tmp_path / "overlap"
    result = CliRunner().invoke(main, [
        "rank", "--model", str(tiny_model_dirs["qwen3"]), "--out", str(out), "--prompts-per-family", "4",
        "--max-tokens", "12", "--jacobian", "none", "--no-progress", "--top-k", "3", "--overlap", "math,code",
        "--visit-fraction", "0.1", "--kl-fraction", "0.1", "--deep-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    counts = json.loads((out / "summary.json").read_text())["prompts"]
    assert counts["deep_tokens"] < counts["visit_tokens"] < counts["tokens"]  # a share, larger than the deep one
    for row in json.loads((out / "windows.json").read_text()):
        for family in ("math", "code"):
            assert math.isfinite(row[f"r_0@{family}"]) and math.isfinite(row[f"d_dec@{family}"])


def test_visit_fraction_must_hold_the_deep_and_kl_shares(tiny_model_dirs, tmp_path):
    for settings in (RankSettings(visit_fraction=0.4), RankSettings(visit_fraction=0.6, kl_fraction=0.8, deep_fraction=0.5)):
        with pytest.raises(UsageError, match="--visit-fraction .* below the deep or KL share"):
            settings.validate()
    RankSettings(visit_fraction=0.5, kl_fraction=0.25, deep_fraction=0.5).validate()
    RankSettings(visit_fraction=0.5, kl_positions=0).validate()  # no KL: only the deep share counts
    RankSettings(visit_fraction=0.5, probes=["cka", "update"]).validate()  # the KL probe is off: likewise
    with pytest.raises(UsageError, match="below the deep or KL share"):
        RankSettings(visit_fraction=0.5, probes=["cka", "kl"]).validate()
    run = CliRunner().invoke(main, ["rank", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "r"),
                                    "--visit-fraction", "0.3"])
    _one_line_error(run, "--visit-fraction 0.3 is below the deep or KL share (1.0)")
    _one_line_error(CliRunner().invoke(main, ["rank", "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "r"),
                                              "--visit-fraction", "0"]), "--visit-fraction 0.0 is out of range")


def test_stats_dtype_tf32_matches_float64_on_cpu(cache):
    """`--stats-dtype tf32` is float32 arithmetic (TF32 products only on CUDA)."""
    names = ["update", "cka", "residual_force", "decoder"]
    exact = probe_window(cache, 1, 5, names, RankSettings().probe_settings())
    fast_settings = RankSettings(stats_dtype="tf32").probe_settings()
    assert fast_settings.tf32 and fast_settings.stats_dtype == torch.float32
    fast = probe_window(cache, 1, 5, names, fast_settings)
    for key in ("cka_plateau", "delta_0", "r_0", "d_dec", "rho"):
        assert fast[key] == pytest.approx(exact[key], rel=1e-4, abs=1e-6), key


def test_rank_cli_errors(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    run = lambda *args: CliRunner().invoke(main, ["rank", "--model", model, "--out", str(tmp_path / "r"), *args])  # noqa: E731
    _one_line_error(run("--probes", "cka,nope"), "unknown probe 'nope'")
    _one_line_error(run("--max-width", "9"), "--max-width 9 is out of range; allowed 2..6")
    _one_line_error(run("--window", "4:9"), "ends past the model's 6 layers")
    _one_line_error(run("--kl-fraction", "0"), "--kl-fraction 0.0 is out of range")
    _one_line_error(run("--alpha", "0"), "--alpha must be a positive finite number")
    _one_line_error(run("--alpha", "nan"), "--alpha must be a positive finite number")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _one_line_error(run("--prompts", str(empty)), "empty.txt")


def test_rank_cli_runs_and_prints_table(tiny_model_dirs, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["rank", "--model", str(tiny_model_dirs["qwen3"]), "--out", str(out), "--prompts-per-family", "2",
               "--max-tokens", "12", "--jacobian", "none", "--no-progress", "--top-k", "3", "--overlap", "math,code"],
    )
    assert result.exit_code == 0, result.output
    assert "top 3 windows" in result.output and "overlap math vs code" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["windows"] == 15 and len(summary["top_k"]) == 3


def test_rank_cli_alpha_is_recorded_and_resumes_only_at_its_scale(tiny_model_dirs, tmp_path):
    """`rank --alpha 0.5`: summary and run.json carry the scale, the table names it, and a plain run's run.json
    has no alpha (runs from before --alpha still resume); a resume at another scale is refused."""
    common = ["rank", "--model", str(tiny_model_dirs["llama"]), "--prompts-per-family", "1", "--max-tokens", "10",
              "--jacobian", "none", "--no-progress", "--max-width", "3"]
    runner = CliRunner()
    damped = runner.invoke(main, [*common, "--alpha", "0.5", "--out", str(tmp_path / "damped")])
    plain = runner.invoke(main, [*common, "--out", str(tmp_path / "plain")])
    assert damped.exit_code == 0 and plain.exit_code == 0, damped.output + plain.output
    assert "repeated visits at alpha 0.5" in damped.output and "visits at alpha" not in plain.output
    assert json.loads((tmp_path / "damped" / "summary.json").read_text())["settings"]["alpha"] == 0.5
    assert json.loads((tmp_path / "damped" / "run.json").read_text())["settings"]["alpha"] == 0.5
    assert "alpha" not in json.loads((tmp_path / "plain" / "run.json").read_text())["settings"]
    rows = {name: {r["window"]: r for r in json.loads((tmp_path / name / "windows.json").read_text())} for name in ("plain", "damped")}
    assert rows["plain"]["1:3"]["cka_plateau"] == rows["damped"]["1:3"]["cka_plateau"]  # z_0, z_1: no repeated visit
    assert rows["plain"]["1:3"]["d_kl"] != rows["damped"]["1:3"]["d_kl"]
    refused = runner.invoke(main, [*common, "--alpha", "0.5", "--resume", "--out", str(tmp_path / "plain")])
    assert refused.exit_code != 0 and "alpha" in refused.output


def test_deep_fraction_leaves_score_inputs_unchanged(gemma):
    """The deeper iterates use a subset of prompts; every input of the score uses all of them."""
    texts = TEXTS * 2
    full = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3)
    half = cache_activations(gemma.model, gemma.tokenizer, texts, max_tokens=16, batch_size=2, kl_positions=3, deep_fraction=0.5)
    assert sum(b.deep for b in half.batches) < len(half.batches) == len(full.batches)
    names = ["update", "cka", "decoder", "kl", "n2_fit"]
    a = probe_window(full, 2, 5, names, ProbeSettings())
    b = probe_window(half, 2, 5, names, ProbeSettings())
    for key in ("cka_plateau", "delta_0", "delta_1", "r_0", "d_dec", "cka_drift_2"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert b["d_kl"] == pytest.approx(a["d_kl"], rel=1e-4)  # same positions, other batch order
    assert b["delta_3"] != a["delta_3"]  # deeper iterates: the subset


def test_rank_public_api():
    """`rys_forge.rank` exports what callers outside the stage use; every probe `--probes` accepts is described."""
    for name in rys_forge.rank.__all__:
        assert hasattr(rys_forge.rank, name), name
    assert list(rys_forge.rank.probe_descriptions()) == rys_forge.rank.list_probes()
    assert set(rys_forge.rank.PROBES) < set(rys_forge.rank.list_probes())
