"""Per-window probes from the seeds and a registry to pick them by name.

For a window `B=[i,j)` the trajectory is `z_0 = x_i`, `z_{n+1} = T_B(z_n)` (`z_1` is the cached `x_j`,
free). With a residual scale `alpha != 1` (`rank --alpha`), the repeated visits run the damped block map
`T_B^alpha` (each residual branch update times `alpha`): `z_{n+1} = T_B^alpha(z_n)` for `n >= 1`, and the
Jacobian spectrum is that of `T_B^alpha`. Every probe reads a `Trajectory` and returns flat, named numbers; `rys-forge rank --probes`
picks a subset (`list_probes()` names them). A new probe is one function under `@register_probe`.
The numbers come from `rys_forge.rank.metrics`; what the score makes of them is `rys_forge.rank.score`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from rys_forge.errors import UsageError
from rys_forge.rank import metrics
from rys_forge.rank.activations import ActivationCache, CachedBatch

__all__ = [
    "JACOBIAN_DESCRIPTION",
    "PROBES",
    "Numbers",
    "Probe",
    "ProbeSettings",
    "Trajectory",
    "in_order",
    "jacobian_spectrum",
    "list_probes",
    "probe_descriptions",
    "probe_window",
    "register_probe",
    "repeat_curves",
    "score_inputs",
    "select_probes",
    "torch_threads",
    "window_workers",
    # transitional, see above
]

Numbers = dict[str, float]


@dataclass
class ProbeSettings:
    """Knobs of the probes (not of the score)."""

    iterations: int = 4
    debiased_cka: bool = False
    mmd_samples: int = 512
    jacobian_k: int = 3
    jacobian_iters: int = 12
    stats_dtype: torch.dtype = torch.float64
    tf32: bool = False  # float32 CKA products on TF32 tensor cores (CUDA only)
    seed: int = 0
    alpha: float = 1.0  # residual scale of the repeated visits: z_2.. come from the damped block map


#: Token sets of a trajectory, nested: every batch, the second-visit batches (`z_2`), the deep batches (`z_3..`).
ALL, VISIT, DEEP = 0, 1, 2


class Trajectory:
    """`z_0..z_n` of one window on the cached prompts, computed lazily, pooled over selected tokens.

    `z_0, z_1` (the plateau CKA, delta_0, the junction) cover all prompts; `z_2` covers the cache's
    second-visit batches (all of them by default; `rank --visit-fraction`), and the deeper iterates
    `z_3..z_n` (for `delta_{n>=2}`, `r_{n>=1}`, the n^2 fit and the repeat curves) its *deep* batches
    (`rank --deep-fraction`). Statistics that mix iterates use one token set throughout: `visit=True`
    pools `z_0, z_1` over the second-visit batches, `deep=True` pools every `z_n` over the deep batches.
    `restricted(family)` gives a view on one prompt family's tokens that shares the iterates (and the
    per-position KL) with its parent. With `deep_only` every statistic uses the deep batches and no other
    batch is replayed (the repeat curves need nothing else).
    """

    def __init__(self, cache: ActivationCache, start: int, end: int, settings: ProbeSettings, deep_only: bool = False):
        self.cache, self.start, self.end, self.settings, self.deep_only = cache, start, end, settings, deep_only
        batches = cache.batches
        self._states: list[list[torch.Tensor | None]] = [[b.hidden[start] for b in batches], [b.hidden[end] for b in batches]]
        self.all_deep = all(b.deep for b in batches)
        self.all_visit = all(b.visit for b in batches)
        self.selection = [b.valid for b in batches]
        self.kl_keep = [torch.ones(b.kl_index.shape[0], dtype=torch.bool) for b in batches]
        self._pooled: dict[tuple[int, int], torch.Tensor] = {}
        self._cka: dict[Any, torch.Tensor] = {}
        self._kl: dict[tuple[int, bool], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def restricted(self, family: str) -> "Trajectory":
        """A view on the tokens of one prompt family (iterates and KL shared with this trajectory)."""
        view = Trajectory.__new__(Trajectory)
        view.__dict__.update(self.__dict__)
        view._pooled, view._cka = {}, {}
        view.selection, view.kl_keep = [], []
        for batch in self.cache.batches:
            rows = torch.tensor([f == family for f in batch.families], device=batch.valid.device)
            view.selection.append(batch.valid & rows[:, None])
            view.kl_keep.append(rows[batch.kl_index[:, 0]].cpu() if batch.kl_index.numel() else torch.zeros(0, dtype=torch.bool))
        return view

    def _tokens(self, n: int, deep: bool = False, visit: bool = False) -> int:
        """The token set of a statistic of `z_n`: DEEP for n >= 3 (or `deep`), VISIT for n = 2 (or `visit`),
        else ALL; a set that holds every batch is ALL."""
        if deep or n >= 3 or self.deep_only:
            return ALL if self.all_deep else DEEP
        if visit or n == 2:
            return ALL if self.all_visit else VISIT
        return ALL

    @staticmethod
    def _holds(batch: CachedBatch, tokens: int) -> bool:
        return tokens == ALL or (batch.deep if tokens == DEEP else batch.visit)

    def states(self, n: int) -> list[torch.Tensor | None]:
        """Per-batch `z_n` (`[B, T, d]` each; None for batches outside the second-visit share when n = 2 and
        outside the deep share when n >= 3)."""
        while len(self._states) <= n:
            step = len(self._states)
            self._states.append([
                self.cache.block(b, self.start, self.end, z, self.settings.alpha)  # step >= 2: repeated visits
                if z is not None and ((step == 2 and b.visit and not self.deep_only) or b.deep) else None
                for b, z in zip(self.cache.batches, self._states[-1])
            ])
        return self._states[n]

    def z(self, n: int, deep: bool = False, visit: bool = False) -> torch.Tensor:
        """`z_n` pooled over the selected tokens of its token set (`_tokens`): `[N, d]`."""
        key = (n, self._tokens(n, deep, visit))
        if key not in self._pooled:
            use = [self._holds(b, key[1]) for b in self.cache.batches]
            # A device-mapped model leaves each state where its last layer ran: pool on the mask's device.
            self._pooled[key] = torch.cat([s.to(m.device)[m] for s, m, u in zip(self.states(n), self.selection, use) if u])
        return self._pooled[key]

    def cka(self, deep: bool = False) -> torch.Tensor:
        """CKA matrix between `z_0..z_2` (second-visit batches) or, with `deep`, `z_0..z_n` (deep batches)."""
        deep = deep or (self.deep_only and not self.all_deep)
        if deep not in self._cka:
            top = self.settings.iterations if deep else 2
            zs = [self.z(n, deep=deep, visit=True) for n in range(top + 1)]
            self._cka[deep] = metrics.cka_matrix(
                zs, debiased=self.settings.debiased_cka, dtype=self.settings.stats_dtype, tf32=self.settings.tf32
            )
        return self._cka[deep]

    def plateau_cka(self) -> float:
        """CKA(x_i, x_j) over every prompt's tokens (the plateau reads no iterate: no second-visit share)."""
        if self.all_visit:
            return float(self.cka()[0, 1])
        if "plateau" not in self._cka:
            self._cka["plateau"] = metrics.cka_matrix(
                [self.z(0), self.z(1)], debiased=self.settings.debiased_cka, dtype=self.settings.stats_dtype,
                tf32=self.settings.tf32,
            )
        return float(self._cka["plateau"][0, 1])

    def first_steps(self) -> tuple[float, float, float]:
        """`(delta_0, delta_1, r_0)`: delta_0 over every prompt; delta_1 and the ratio r_0 = delta_1 / delta_0
        over the second-visit share (one token set for the ratio)."""
        dtype = self.settings.stats_dtype
        d0 = metrics.relative_step(self.z(0), self.z(1), dtype=dtype)
        d0_visit = d0 if self.all_visit else metrics.relative_step(self.z(0, visit=True), self.z(1, visit=True), dtype=dtype)
        d1 = metrics.relative_step(self.z(1, visit=True), self.z(2), dtype=dtype)
        return d0, d1, _div(d1, d0_visit)

    def kl_per_position(self, visits: int = 2, deep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(p_base || p_RYS) and top-1 agreement at the selected KL positions after `visits` passes
        through the block (2 = RYS). Each tail pass runs once per trajectory; views reuse it."""
        deep = self._tokens(visits, deep) == DEEP
        if (visits, deep) not in self._kl:
            batches, states = self.cache.batches, self.states(visits)
            use = [z is not None and (batch.deep or not deep) and batch.base_logits is not None and batch.kl_index.numel() > 0
                   for batch, z in zip(batches, states)]
            # Every batch's tail, then one LM-head call for all of them (`ActivationCache.kl_from`).
            found = iter(self.cache.kl_from([b for b, u in zip(batches, use) if u], self.end,
                                            [z for z, u in zip(states, use) if u]))
            empty = (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
            pairs = [tuple(x.cpu() for x in next(found)) if u else empty for u in use]
            self._kl[(visits, deep)] = ([k for k, _ in pairs], [a for _, a in pairs])
        kls, agree = self._kl[(visits, deep)]
        keep = [m if k.numel() else k.bool() for k, m in zip(kls, self.kl_keep)]
        return torch.cat([k[m] for k, m in zip(kls, keep)]), torch.cat([a[m] for a, m in zip(agree, keep)])


@dataclass(frozen=True)
class Probe:
    """A named probe: `fn(trajectory) -> {metric: value}`."""

    name: str
    fn: Callable[[Trajectory], Numbers]
    description: str


PROBES: dict[str, Probe] = {}


def register_probe(name: str, description: str) -> Callable[[Callable[[Trajectory], Numbers]], Callable]:
    """Decorator: add a probe to the registry under `name`."""

    def wrap(fn: Callable[[Trajectory], Numbers]) -> Callable[[Trajectory], Numbers]:
        PROBES[name] = Probe(name, fn, description)
        return fn

    return wrap


def list_probes() -> list[str]:
    """Registered probe names (including `jacobian`, which `rank` runs on a shortlist)."""
    return list(PROBES) + ["jacobian"]


#: The `jacobian` probe is not in `PROBES`: `rank` runs it on a shortlist after scoring (`jacobian_spectrum`).
JACOBIAN_DESCRIPTION = "leading singular values of dT_B/dz by JVP/VJP power iteration (on --jacobian windows)"


def probe_descriptions() -> dict[str, str]:
    """Every probe name `--probes` accepts (as `list_probes()`), with its one-line description."""
    return {**{name: probe.description for name, probe in PROBES.items()}, "jacobian": JACOBIAN_DESCRIPTION}


def select_probes(names: list[str] | None) -> list[str]:
    """Validate a probe subset (None = all)."""
    if not names:
        return list_probes()
    unknown = [n for n in names if n not in list_probes()]
    if unknown:
        raise UsageError(f"unknown probe '{unknown[0]}'; available probes: {', '.join(list_probes())}")
    return list(dict.fromkeys(names))


@register_probe("update", "delta_n = ||z_{n+1}-z_n|| / ||z_n|| and r_n = delta_{n+1}/delta_n")
def probe_update(t: Trajectory) -> Numbers:
    n_max, dtype = t.settings.iterations, t.settings.stats_dtype
    delta_0, delta_1, r_0 = t.first_steps()
    deep = [metrics.relative_step(t.z(n, deep=True), t.z(n + 1, deep=True), dtype=dtype) for n in range(n_max)]
    out = {"delta_0": delta_0, "delta_1": delta_1, "r_0": r_0}
    out.update({f"delta_{n}": deep[n] for n in range(2, n_max)})
    out.update({f"r_{n}": _div(deep[n + 1], deep[n]) for n in range(1, n_max - 1)})
    return out


@register_probe("cka", "centred linear CKA: plateau CKA(x_i,x_j), CKA(z_{n+1},z_n), 1-CKA(z_n,z_0)")
def probe_cka(t: Trajectory) -> Numbers:
    m, md = t.cka(), t.cka(deep=True)
    n_max = t.settings.iterations
    out = {"cka_plateau": t.plateau_cka(), "cka_step_0": float(m[0, 1]), "cka_step_1": float(m[1, 2])}
    out.update({f"cka_step_{n}": float(md[n, n + 1]) for n in range(2, n_max)})
    out.update({"cka_drift_1": 1.0 - float(m[1, 0]), "cka_drift_2": 1.0 - float(m[2, 0])})
    out.update({f"cka_drift_{n}": 1.0 - float(md[n, 0]) for n in range(3, n_max + 1)})
    return out


@register_probe("n2_fit", "least-squares fit of 1-CKA(z_n,z_0) = a n^2 + b n + c, and R^2 of pure a n^2")
def probe_n2_fit(t: Trajectory) -> Numbers:
    m = t.cka(deep=True)  # one token set for every n
    drift = [1.0 - float(m[n, 0]) for n in range(1, t.settings.iterations + 1)]
    if not all(math.isfinite(d) for d in drift):  # degenerate tokens (CKA 0/0): no fit, like any other NaN metric
        return dict.fromkeys(("n2_a", "n2_b", "n2_c", "n2_r2", "n2_a_pure", "n2_r2_pure"), math.nan)
    fit = metrics.quadratic_fit(drift)
    return {"n2_a": fit.a, "n2_b": fit.b, "n2_c": fit.c, "n2_r2": fit.r2, "n2_a_pure": fit.a_pure, "n2_r2_pure": fit.r2_pure}


@register_probe("residual_force", "rho = ||S_ij||/||x_i||, cos_phi = <x_i,S_ij>/(||x_i|| ||S_ij||), raw cosine")
def probe_residual_force(t: Trajectory) -> Numbers:
    force = metrics.residual_force(t.z(0), t.z(1), dtype=t.settings.stats_dtype)
    return {"rho": force.rho, "cos_phi": force.cos_phi, "cos_raw": force.raw_cosine}


@register_probe("stationarity", "second pass vs first: ||S1||/||S0|| and cos(S0, S1)")
def probe_stationarity(t: Trajectory) -> Numbers:
    stat = metrics.stationarity(t.z(0, visit=True), t.z(1, visit=True), t.z(2), dtype=t.settings.stats_dtype)
    return {"stat_ratio": stat.norm_ratio, "stat_cos": stat.cosine}


@register_probe("junction", "x_j against layer i's normal input x_i: RBF MMD^2 (median heuristic), Mahalanobis")
def probe_junction(t: Trajectory) -> Numbers:
    s = t.settings
    mmd = metrics.mmd2_rbf(t.z(0), t.z(1), max_samples=s.mmd_samples, seed=s.seed, dtype=s.stats_dtype)
    # One factorisation per start layer, shared by the windows that start there.
    reference = t.cache.shared(
        ("mahalanobis", t.start, s.stats_dtype, s.tf32),
        lambda: metrics.mahalanobis_reference(t.z(0), dtype=s.stats_dtype, tf32=s.tf32),
    )
    maha = metrics.mahalanobis_shift(t.z(0), t.z(1), seed=s.seed, dtype=s.stats_dtype, reference=reference)
    return {
        "mmd2": mmd.mmd2,
        "mahalanobis": maha.mean_distance,
        "mahalanobis_ref": maha.reference_mean_distance,
    }


@register_probe("decoder", "decoder tolerance D_dec = 1 - CKA(z_2, x_j)")
def probe_decoder(t: Trajectory) -> Numbers:
    return {"d_dec": 1.0 - float(t.cka()[2, 1])}


@register_probe("kl", "D_KL = mean KL(p_base || p_RYS) of next-token distributions at sampled positions")
def probe_kl(t: Trajectory) -> Numbers:
    kl, agree = t.kl_per_position(2)
    if not kl.numel():
        return {}
    return {"d_kl": float(kl.mean()), "d_kl_max": float(kl.max()), "top1_agree": float(agree.float().mean())}


def jacobian_spectrum(
    cache: ActivationCache, start: int, end: int, settings: ProbeSettings
) -> Numbers:
    """Leading singular values of `J_B = dT_B/dz` at `z_0 = x_i` on the cache's first batch (`T_B^alpha` with
    `settings.alpha != 1`).

    Uses forward-mode AD (`torch.func.jvp`) and reverse-mode (`vjp`) only; run it with a math /
    eager attention backend (fused attention kernels lack forward-mode AD).
    """
    batch = cache.batches[0]
    z0 = batch.hidden[start]

    def block(z: torch.Tensor) -> torch.Tensor:
        return cache.block(batch, start, end, z, settings.alpha)

    spectrum = _with_math_attention(
        lambda: metrics.top_singular_values(
            block, z0, k=settings.jacobian_k, iters=settings.jacobian_iters, seed=settings.seed, tol=1e-4
        )
    )
    out = {f"jac_sv_{n + 1}": float(v) for n, v in enumerate(spectrum.values)}
    out["jac_iters"] = float(spectrum.iterations)
    return out


def _with_math_attention(fn: Callable[[], Any]) -> Any:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return fn()
    with sdpa_kernel(SDPBackend.MATH):
        return fn()



def probe_window(
    cache: ActivationCache,
    start: int,
    end: int,
    probes: list[str],
    settings: ProbeSettings,
    families: tuple[str, ...] = (),
) -> Numbers:
    """Run the selected per-window probes on `[start, end)`; returns one flat row of metrics.

    For each of `families`, the score's inputs are also computed on that family's tokens alone and
    stored as `<metric>@<family>`.
    """
    trajectory = Trajectory(cache, start, end, settings)
    row: Numbers = {}
    with torch.no_grad():
        for name in probes:
            if name in PROBES:
                row.update(PROBES[name].fn(trajectory))
        for family in families:
            row.update({f"{k}@{family}": v for k, v in score_inputs(trajectory.restricted(family)).items()})
    return row


def repeat_curves(
    cache: ActivationCache, rows: list[dict[str, Any]], settings: ProbeSettings, with_kl: bool, workers: int = 1
) -> dict[str, dict[str, list[float]]]:
    """For the windows of `rows` (the short list; `workers` at once, `in_order`): 1-CKA(z_n, z_0), delta_n
    and KL after 1..n+1 visits, each on one token set, the deep batches (only those are replayed:
    `Trajectory(deep_only=True)`)."""

    @torch.no_grad()
    def curve(row: dict[str, Any]) -> dict[str, list[float]]:
        t = Trajectory(cache, row["i"], row["j"], settings, deep_only=True)
        m = t.cka(deep=True)
        n_max = settings.iterations
        drift = [1.0 - float(m[n, 0]) for n in range(1, n_max + 1)]
        out = {
            "cka_drift": drift,
            "delta": [metrics.relative_step(t.z(n, True), t.z(n + 1, True), dtype=settings.stats_dtype) for n in range(n_max)],
            "n2_a_pure": [metrics.quadratic_fit(drift).a_pure if all(map(math.isfinite, drift)) else math.nan],
        }
        if with_kl:
            out["kl"] = [0.0] + [float(t.kl_per_position(v, deep=True)[0].mean()) for v in range(2, n_max + 1)]
        return out

    return {row["window"]: values for row, values in in_order(curve, rows, workers)}


Item = TypeVar("Item")
Result = TypeVar("Result")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """While active, torch runs each op on `count` threads (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def in_order(fn: Callable[[Item], Result], items: Iterable[Item], workers: int = 1) -> Iterator[tuple[Item, Result]]:
    """`(item, fn(item))` for each of `items`, in their order.

    With `workers > 1`, `fn` runs on that many items at once in threads, torch's threads shared out among
    them (`torch_threads`, one each on a 2-core machine): whole windows side by side keep every core busy
    with no hand-offs inside an op, where one window at a time on all cores waits at every op for the
    slowest core, and far longer when another process takes one (measured on 2 busy cores, gemma-3-270m:
    31 s a window on 2 threads, 5.9 s with 2 workers of 1 thread). Results still come back in order; the
    first exception is raised at its item, after the items before it, and items not started are dropped.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    source = iter(items)
    pending: deque[tuple[Item, Future[Result]]] = deque()
    threads = max(1, torch.get_num_threads() // workers)
    with torch_threads(threads), ThreadPoolExecutor(workers, thread_name_prefix="rys-forge-window") as pool:
        try:
            for item in source:  # two per worker in flight, so no worker waits for the one ahead of it
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()
                following = next(source, _END)
                if following is not _END:
                    pending.append((following, pool.submit(fn, following)))  # type: ignore[arg-type]
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()


_END = object()

#: `workers=0` on CPU: one window per torch thread, at most this many at once (each holds its iterates and a
#: `[K, V]` logits block; more cores then go to each window's ops).
AUTO_WORKERS_MAX = 4


def window_workers(workers: int, model: nn.Module) -> int:
    """Windows probed at once: 1 off the CPU or on a model placed by accelerate (its hooks move weights in
    and out per call, so two threads in one layer would race); `workers` if given; else one per torch
    thread, at most `AUTO_WORKERS_MAX`.

    Raises:
        UsageError: `workers` is negative.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--workers must be an integer >= 0 (0: one window per CPU thread, at most {AUTO_WORKERS_MAX}), got {workers!r}")
    if next(model.parameters()).device.type != "cpu" or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return 1
    return workers if workers > 0 else max(1, min(torch.get_num_threads(), AUTO_WORKERS_MAX))


def score_inputs(t: Trajectory) -> Numbers:
    """Only what `score` reads (all on `z_0..z_2`): plateau CKA, delta_0, r_0, D_dec, D_KL."""
    d0, _, r_0 = t.first_steps()
    out = {"cka_plateau": t.plateau_cka(), "delta_0": d0, "r_0": r_0, "d_dec": 1.0 - float(t.cka()[2, 1])}
    kl, _ = t.kl_per_position(2)
    if kl.numel():
        out["d_kl"] = float(kl.mean())
    return out


def _div(a: float, b: float) -> float:
    return a / b if b not in (0.0,) and not math.isnan(b) else math.nan
