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
from pathlib import Path
from typing import Any

import numpy as np

from rys_forge.errors import UsageError


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

    @classmethod
    def from_json(cls, path: str | Path) -> "ScoreConfig":
        """Defaults overridden by the keys of a JSON object; unknown keys are an error."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"score config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"score config {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise UsageError(f"score config {path} must be a JSON object")
        data = data.get("score", data)  # accept the calibrate output as well
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"_comment"})
        if unknown:
            raise UsageError(f"score config {path}: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        fitted = data.get("fitted_on")
        if fitted is not None:
            values["fitted_on"] = fitted if isinstance(fitted, dict) else {"source": str(fitted)}
        for key in (known - {"fitted_on"}) & set(data):
            try:
                values[key] = float(data[key])
            except (TypeError, ValueError):
                raise UsageError(f"score config {path}: '{key}' must be a number, got {data[key]!r}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: The rank-row columns `Score(B)` is computed from.
SCORE_INPUTS = ("cka_plateau", "delta_0", "r_0", "d_dec", "d_kl")


def score_terms(
    cka_plateau: Any, delta_0: Any, r_0: Any, d_dec: Any, d_kl: Any, alpha: float, c: float, beta: float, gamma: float,
    eta: float,
) -> dict[str, np.ndarray]:
    """`P = exp(-alpha (1 - CKA(x_i, x_j)))`, `A = delta_0 / (delta_0 + c)`, `S = exp(-beta max(0, r_0 - 1))`,
    `D = exp(-gamma D_dec - eta D_KL)` and `score = P A S D`, elementwise on scalars or arrays (NaN in, NaN out)."""
    plateau, delta_0, r_0, d_dec, d_kl = (np.asarray(v, dtype=np.float64) for v in (cka_plateau, delta_0, r_0, d_dec, d_kl))
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(-alpha * (1.0 - plateau))
        a = delta_0 / (delta_0 + c)
        s = np.exp(-beta * np.maximum(0.0, r_0 - 1.0))  # NaN r_0 stays NaN
        d = np.exp(-gamma * d_dec - eta * d_kl)
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
