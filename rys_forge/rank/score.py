"""The RYS score of a window and its class, from the window's probe metrics.

    Score(B) = P * A * S * D
    P = exp(-alpha * (1 - CKA(x_i, x_j)))                  plateau
    A = delta_0 / (delta_0 + c)                           activity
    S = exp(-beta * max(0, r_0 - 1))                      stability
    D = exp(-gamma * D_dec - eta * D_KL)                  decoder tolerance

with constants in `ScoreConfig` (JSON-overridable). The defaults are priors chosen from the seeds'
Goldilocks conditions and the scale of these quantities on the built-in models, not fitted to any
benchmark; `rys-forge calibrate` (sweep + validate) is the way to fit them. The classes (`inert`,
`refinement`, `fragile`, `off-plateau`) use the thresholds of the same config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.errors import RysForgeError, UsageError


#: Allowed values of every constant: `(low, high, low excluded)`. The weights may be 0 (the term then drops out
#: of the score, whatever its input: `eta = 0` is a score without D_KL); `c` must be positive; the CKA
#: thresholds compare `1 - CKA`, which lies in [0, 1].
CONSTANT_RANGES: dict[str, tuple[float, float, bool]] = {
    "alpha": (0.0, math.inf, False), "c": (0.0, math.inf, True), "beta": (0.0, math.inf, False),
    "gamma": (0.0, math.inf, False), "eta": (0.0, math.inf, False), "plateau_max": (0.0, 1.0, False),
    "inert_cka": (0.0, 1.0, False), "inert_delta": (0.0, math.inf, False), "epsilon": (0.0, math.inf, False),
    "kl_max": (0.0, math.inf, False),
}


@dataclass
class ScoreConfig:
    """Constants of `Score(B)` and of the window classes. Override any subset from a JSON file.

    Attributes:
        alpha: plateau sharpness on `1 - CKA(x_i, x_j)`.
        c: activity half-saturation on `delta_0` (A = 1/2 at delta_0 = c).
        beta: stability penalty per unit of `r_0` above 1.
        gamma: decoder-tolerance weight on `D_dec = 1 - CKA(z_2, x_j)`.
        eta: weight on `D_KL` (nats per token).
        plateau_max: windows with `1 - CKA(x_i, x_j)` above this are off the plateau (class `off-plateau`).
        inert_cka: inert if `1 - CKA(x_i, x_j)` is below this ...
        inert_delta: ... and `delta_0` is below this.
        epsilon: refinement requires `r_0 <= 1 + epsilon`.
        kl_max: fragile when `D_KL` exceeds this.
    """

    alpha: float = 5.0
    c: float = 0.1
    beta: float = 3.0
    gamma: float = 5.0
    eta: float = 0.5
    plateau_max: float = 0.25
    inert_cka: float = 0.01
    inert_delta: float = 0.02
    epsilon: float = 0.1
    kl_max: float = 1.5
    fitted_on: dict[str, Any] | None = None  # set by `rys-forge calibrate`: the model the constants were fitted on

    def __post_init__(self) -> None:
        for name, (low, high, open_low) in CONSTANT_RANGES.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and (low < value if open_low else low <= value) and value <= high and math.isfinite(value)):
                allowed = f"[{low:g}, {high:g}]" if math.isfinite(high) else f"a finite number {'>' if open_low else '>='} {low:g}"
                raise UsageError(f"score constant '{name}' = {value!r} is out of range; allowed: {allowed}")
            setattr(self, name, float(value))
        if self.fitted_on is not None and not isinstance(self.fitted_on, dict):
            self.fitted_on = {"source": str(self.fitted_on)}

    @classmethod
    def from_json(cls, path: str | Path) -> "ScoreConfig":
        """Defaults overridden by the keys of a JSON object (or of its `score` object: `calibrate`'s output).

        Raises:
            UsageError: the file cannot be read, is not a JSON object, has an unknown key, or a constant is not a
                finite number in its range (`CONSTANT_RANGES`); the message names the file, the key and the value.
        """
        file = Path(path)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"score config not found: {path}") from None
        except IsADirectoryError:
            raise UsageError(f"score config {path} is a folder; pass a JSON file") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"score config {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read score config {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if isinstance(data, dict) and "score" in data:
            data = data["score"]  # accept the calibrate output as well
        if not isinstance(data, dict):
            raise UsageError(f"score config {path} must be a JSON object of constants (or one under 'score'),"
                             f" got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"_comment"})
        if unknown:
            raise UsageError(f"score config {path}: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(known))}")
        values = {k: v for k, v in data.items() if k in known and not (k == "fitted_on" and v is None)}
        try:
            return cls(**values)
        except UsageError as exc:
            raise UsageError(f"score config {path}: {exc}") from None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: The rank-row columns `Score(B)` is computed from.
SCORE_INPUTS = ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")


def score_terms(
    cka_plateau: Any, delta_0: Any, r_0: Any, d_dec: Any, d_kl: Any, alpha: float, c: float, beta: float, gamma: float,
    eta: float,
) -> dict[str, np.ndarray]:
    """`P = exp(-alpha (1 - CKA(x_i, x_j)))`, `A = delta_0 / (delta_0 + c)`, `S = exp(-beta max(0, r_0 - 1))`,
    `D = exp(-gamma D_dec - eta D_KL)` and `score = P A S D`, elementwise on scalars or arrays (NaN in, NaN out,
    except that a term whose weight is 0 is 0 whatever its input: a switched-off term needs no probe)."""
    plateau, delta_0, r_0, d_dec, d_kl = (np.asarray(v, dtype=np.float64) for v in (cka_plateau, delta_0, r_0, d_dec, d_kl))

    def weighted(weight: float, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x) if weight == 0 else weight * x

    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(-weighted(alpha, 1.0 - plateau))
        a = delta_0 / (delta_0 + c)
        s = np.exp(-weighted(beta, np.maximum(0.0, r_0 - 1.0)))  # NaN r_0 stays NaN
        d = np.exp(-weighted(gamma, d_dec) - weighted(eta, d_kl))
    return {"P": p, "A": a, "S": s, "D": d, "score": p * a * s * d}


def score(row: dict[str, Any], config: ScoreConfig) -> dict[str, float]:
    """`P, A, S, D` and `score` from a window's metrics (NaN where an input probe was not run)."""
    terms = score_terms(
        *(row.get(k, math.nan) for k in SCORE_INPUTS),
        alpha=config.alpha, c=config.c, beta=config.beta, gamma=config.gamma, eta=config.eta,
    )
    return {k: float(v) for k, v in terms.items()}


def classify(row: dict[str, Any], config: ScoreConfig) -> str:
    """The seeds' classes: `inert`, `refinement`, `fragile` (for high-CKA windows), else `off-plateau`."""
    drift = 1.0 - row.get("cka_plateau", math.nan)
    delta_0, r_0 = row.get("delta_0", math.nan), row.get("r_0", math.nan)
    d_kl = row.get("d_kl", 0.0)
    if math.isnan(drift) or math.isnan(delta_0):
        return "unknown"
    if drift < config.inert_cka and delta_0 < config.inert_delta:
        return "inert"
    if drift > config.plateau_max:
        return "off-plateau"
    if (not math.isnan(r_0) and r_0 > 1.0 + config.epsilon) or d_kl > config.kl_max:
        return "fragile"
    return "refinement"


#: The probe (`rys_forge.rank.probes`) that measures each score input, and the constant weighting its term
#: (None: always in the score).
INPUT_SOURCES: dict[str, tuple[str, str | None]] = {
    "cka_plateau": ("cka", "alpha"), "delta_0": ("update", None), "r_0": ("update", "beta"),
    "d_dec": ("decoder", "gamma"), "d_kl": ("kl", "eta"),
}


def needed_inputs(config: ScoreConfig) -> list[str]:
    """The score inputs `config` uses (a term with weight 0 needs none)."""
    return [k for k, (_, weight) in INPUT_SOURCES.items() if weight is None or getattr(config, weight) != 0]


def check_score_inputs(probes: Sequence[str], kl_positions: int, config: ScoreConfig) -> None:
    """Refuse, before any work, a run whose score would be NaN for every window: a probe the score needs is
    not selected, or the KL term has no positions to measure (`--kl-positions 0`).

    Raises:
        UsageError: naming the missing probe, or the KL setting, and how to drop the term instead.
    """
    for name in needed_inputs(config):
        probe, weight = INPUT_SOURCES[name]
        drop = f", or drop the term with {weight}: 0 in --score-config" if weight else ""
        if probe not in probes:
            raise UsageError(f"--probes leaves out '{probe}', which the score needs ({name}); add it{drop}")
        if name == "d_kl" and kl_positions < 1:
            raise UsageError(f"--kl-positions {kl_positions} leaves the score's D_KL term without positions (every score"
                             f" would be NaN); use >= 1{drop}")


def check_scored(rows: Sequence[dict[str, Any]], config: ScoreConfig) -> None:
    """A run in which no window got a finite score is a failure, not a result.

    Raises:
        RysForgeError: naming the score inputs that are NaN in every window.
    """
    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not rows or any(finite(r.get("score")) for r in rows):
        return
    dead = [k for k in needed_inputs(config) if not any(finite(r.get(k)) for r in rows)]
    why = (f"{', '.join(dead)} {'is' if len(dead) == 1 else 'are'} NaN in every window" if dead else
           "the score constants give NaN for every window")
    raise RysForgeError(f"every window's score is NaN: {why} (too few or too alike prompt tokens: raise --max-tokens"
                        " or use other prompts; the probe records are kept)")
