"""LayerPlan: the explicit execution order of base layer indices.

Windows use Python slice notation, the seeds' `B=[i,j)`: `24:35` is base layers 24..34, 0-based,
half-open. RYS `i:j` with `repeats=2` on `L` layers is `[0..j-1] + [i..L-1]`; `repeats=n` visits the
block `n` times. Several windows form one plan; each is expanded in place, left to right, in base
coordinates, so they must not overlap. Every exporter, the in-memory repeat and every card consumes
the explicit order (`LayerPlan.order`), never a range string.

Seam scaling (damped visits): every visit carries a residual scale (`LayerPlan.scales`, 1 = plain RYS). On a
visit with scale `a`, the attention and MLP branch outputs are multiplied by `a` before they are added to the
residual stream (`x + a * attn(...)`, then `x + a * mlp(...)`). A window's `alpha` scales its repeated visits
(the second and later passes over the block); the first pass keeps scale 1. `substeps=K` replaces the
second pass by `K` damped sub-steps: `K` passes at `1/K` each (`repeats = K + 1, alpha = 1/K`,
`resolve_damping`), so the block still moves the stream by two full steps in all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rys_forge.errors import WindowError

WINDOW_CONVENTION = "windows are i:j, 0-based and half-open (layers i..j-1), with 0 <= i < j <= L"
SCALE_CONVENTION = "each visit's attention and MLP outputs are multiplied by its scale before the residual add"
_WINDOW_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True, order=True)
class Window:
    """A half-open block of base layers `[start, end)`."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> "Window":
        """Parse `i:j` (no range checks against a model; see `validate`)."""
        match = _WINDOW_RE.match(str(text))
        if not match:
            raise WindowError(f"bad window '{text}': {WINDOW_CONVENTION}")
        window = cls(int(match.group(1)), int(match.group(2)))
        if window.start < 0 or window.end <= window.start:
            raise WindowError(f"bad window '{text}': {WINDOW_CONVENTION}")
        return window

    @property
    def width(self) -> int:
        return self.end - self.start

    def validate(self, num_layers: int) -> None:
        """Check the window against a model's layer count."""
        if self.end > num_layers:
            raise WindowError(
                f"window {self} ends past the model's {num_layers} layers; use i:j with 0 <= i < j <= {num_layers}"
            )

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


@dataclass(frozen=True)
class LayerPlan:
    """An explicit execution order over a base model's layers.

    Attributes:
        num_layers: the base model's decoder layer count `L`.
        order: base layer index of every visit, in execution order.
        windows: the windows the plan was built from (empty for an identity or hand-written order).
        repeats: visits of each window's block.
        alpha: residual scale of each window's repeated visits (the second and later passes); 1 = plain RYS.
        scales: residual scale of every visit, beside `order` (left empty: all 1).
    """

    num_layers: int
    order: tuple[int, ...]
    windows: tuple[Window, ...] = ()
    repeats: int = 2
    alpha: float = 1.0
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise WindowError(f"a plan needs a base model with at least one layer, got {self.num_layers}")
        bad = [k for k in self.order if not 0 <= k < self.num_layers]
        if bad:
            raise WindowError(
                f"plan visits layer {bad[0]}, outside the base model's layers 0..{self.num_layers - 1}"
            )
        if not self.order:
            raise WindowError("a plan must visit at least one layer")
        check_scale(self.alpha, "alpha")
        scales = tuple(float(a) for a in self.scales) or (1.0,) * len(self.order)
        if len(scales) != len(self.order):
            raise WindowError(f"a plan needs one residual scale per visit: {len(scales)} scales for {len(self.order)} visits")
        for scale in scales:
            check_scale(scale, "residual scale")
        object.__setattr__(self, "scales", scales)

    @classmethod
    def identity(cls, num_layers: int) -> "LayerPlan":
        """The base model's own order."""
        return cls(num_layers, tuple(range(num_layers)), (), 1)

    @classmethod
    def from_windows(
        cls, windows: Iterable[Window | str], num_layers: int, repeats: int = 2, alpha: float = 1.0
    ) -> "LayerPlan":
        """Build the plan that visits each window's block `repeats` times, the repeated visits at scale `alpha`.

        Raises:
            WindowError: a window is malformed, out of range, or overlaps another; repeats < 1; alpha not a
                positive finite number, or != 1 with repeats 1 (no repeated visit to scale).
        """
        if repeats < 1:
            raise WindowError(f"repeats must be >= 1 (visits of the block), got {repeats}")
        check_scale(alpha, "alpha")
        if repeats == 1 and alpha != 1:
            raise WindowError(f"alpha {alpha:g} scales the repeated visits of a window; with repeats 1 there are none")
        parsed = sorted(w if isinstance(w, Window) else Window.parse(w) for w in windows)
        if not parsed:
            raise WindowError("give at least one window i:j")
        for window in parsed:
            window.validate(num_layers)
        for left, right in zip(parsed, parsed[1:]):
            if right.start < left.end:
                raise WindowError(f"windows {left} and {right} overlap; windows of one plan must be disjoint")
        order: list[int] = []
        scales: list[float] = []
        cursor = 0
        for window in parsed:
            order.extend(range(cursor, window.start))
            order.extend(list(range(window.start, window.end)) * repeats)
            scales.extend([1.0] * (window.end - cursor) + [float(alpha)] * (window.width * (repeats - 1)))
            cursor = window.end
        order.extend(range(cursor, num_layers))
        scales.extend([1.0] * (num_layers - cursor))
        return cls(num_layers, tuple(order), tuple(parsed), repeats, float(alpha), tuple(scales))

    @classmethod
    def from_order(cls, order: Sequence[int], num_layers: int, scales: Sequence[float] | None = None) -> "LayerPlan":
        """A plan from an explicit order (e.g. read back from an exported config), with optional per-visit scales."""
        return cls(num_layers, tuple(int(k) for k in order), (), 1, 1.0, tuple(scales or ()))

    @property
    def is_identity(self) -> bool:
        return self.order == tuple(range(self.num_layers)) and not self.scaled

    @property
    def scaled(self) -> bool:
        """Whether any visit has a residual scale other than 1 (a damped plan)."""
        return any(scale != 1.0 for scale in self.scales)

    @property
    def substeps(self) -> int | None:
        """`K` when the plan replaces each window's second pass by `K` damped sub-steps of `1/K` (else None)."""
        k = self.repeats - 1
        return k if self.windows and k >= 2 and self.alpha == 1.0 / k else None

    @property
    def extra_layers(self) -> int:
        """Visits beyond the base model's layer count."""
        return len(self.order) - self.num_layers

    def describe(self) -> str:
        """Short human form, e.g. `6:10 x2 on 18 layers -> 22 visits`."""
        head = ", ".join(str(w) for w in self.windows) or "explicit order"
        if self.substeps:
            head += f" x{self.repeats} (second pass as {self.substeps} damped sub-steps of 1/{self.substeps})"
        elif self.windows and self.alpha != 1.0:
            head += f" x{self.repeats}, repeated visits at residual scale {self.alpha:g}"
        elif self.scaled:
            head += f" x{self.repeats}, per-visit residual scales"
        else:
            head += f" x{self.repeats}"
        return f"{head} on {self.num_layers} layers -> {len(self.order)} visits"

    def to_dict(self) -> dict:
        """JSON-ready form stored in every output (the explicit order is the source of truth)."""
        return {
            "layer_order": list(self.order),
            "base_num_layers": self.num_layers,
            "windows": [str(w) for w in self.windows],
            "repeats": self.repeats,
            "convention": "windows i:j are 0-based, half-open: layers i..j-1",
            # Only damped plans carry scales, so a plain plan's record is what it always was.
            **({"alpha": self.alpha} if self.windows and self.alpha != 1.0 else {}),
            **({"residual_scales": list(self.scales), "scale_convention": SCALE_CONVENTION} if self.scaled else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        """Inverse of `to_dict`; checks that the stored windows reproduce the stored order."""
        try:
            order = data["layer_order"]
            num_layers = int(data["base_num_layers"])
            repeats = int(data.get("repeats", 2))
        except (KeyError, TypeError, ValueError) as exc:
            raise WindowError(f"stored plan lacks a valid field: {exc}") from None
        if not (isinstance(order, list) and all(isinstance(k, int) and not isinstance(k, bool) for k in order)):
            raise WindowError(f"stored plan's layer_order must be a list of layer indices, got {order!r}")
        windows = data.get("windows") or []
        if not (isinstance(windows, list) and all(isinstance(w, str) for w in windows)):
            raise WindowError(f"stored plan's windows must be a list of 'i:j' strings, got {windows!r}")
        scales = data.get("residual_scales")
        if scales is not None and not (isinstance(scales, list) and all(_is_number(a) for a in scales)):
            raise WindowError(f"stored plan's residual_scales must be a list of numbers, got {scales!r}")
        if not windows:
            return cls.from_order(order, num_layers, scales)
        alpha = data.get("alpha", 1.0)
        if not _is_number(alpha):
            raise WindowError(f"stored plan's alpha must be a number, got {alpha!r}")
        plan = cls.from_windows(windows, num_layers, repeats, float(alpha))
        if list(plan.order) != [int(k) for k in order]:
            raise WindowError(
                f"stored plan is inconsistent: windows {windows} x{repeats} give {list(plan.order)},"
                f" but layer_order is {list(order)}"
            )
        if list(plan.scales) != [float(a) for a in (scales if scales is not None else plan.scales)]:
            raise WindowError(
                f"stored plan is inconsistent: windows {windows} x{repeats} at alpha {float(alpha):g} give residual"
                f" scales {list(plan.scales)}, but residual_scales is {scales}"
            )
        return plan


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scale(value: float, what: str) -> None:
    """A residual scale must be a positive finite number.

    Raises:
        WindowError: naming `what`, the value and what is allowed.
    """
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise WindowError(f"{what} must be a positive finite number (1 = plain repeat, 0.5 = half step), got {value!r}")


def resolve_damping(repeats: int = 2, alpha: float | None = None, substeps: int | None = None) -> tuple[int, float]:
    """The `(repeats, alpha)` of a window's visits from the user's options.

    `alpha` scales the repeated visits (the second and later passes; the first stays at 1). `substeps=K` replaces
    the second pass by `K` damped sub-steps: `(K + 1, 1 / K)`; it takes the place of `repeats` and `alpha`.

    Raises:
        WindowError: alpha not positive and finite, or given with repeats 1; substeps < 1 or combined with alpha or
            with repeats other than 2.
    """
    if substeps is not None:
        if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
            raise WindowError(f"substeps must be an integer >= 1 (damped sub-steps replacing the second pass), got {substeps!r}")
        if alpha is not None:
            raise WindowError("give either alpha (scale of the repeated visits) or substeps (K sub-steps at 1/K), not both")
        if repeats != 2:
            raise WindowError(f"substeps {substeps} replaces the second pass (repeats 2) by {substeps} visits at"
                              f" 1/{substeps}; it cannot be combined with repeats {repeats}")
        return substeps + 1, 1.0 / substeps
    if alpha is None:
        return repeats, 1.0
    check_scale(alpha, "alpha")
    if repeats < 2:
        raise WindowError(f"alpha {alpha:g} scales the repeated visits of a window; with repeats {repeats} there are none")
    return repeats, float(alpha)


def all_windows(num_layers: int, min_width: int = 2, max_width: int | None = None) -> list[Window]:
    """Every window `i:j` with `min_width <= j-i <= max_width`, ordered by (i, j).

    Raises:
        WindowError: the width filters are out of range for this model.
    """
    max_width = num_layers if max_width is None else max_width
    if not 1 <= min_width <= num_layers:
        raise WindowError(f"--min-width {min_width} is out of range; allowed 1..{num_layers}")
    if not min_width <= max_width <= num_layers:
        raise WindowError(f"--max-width {max_width} is out of range; allowed {min_width}..{num_layers}")
    return [
        Window(i, j)
        for i in range(num_layers)
        for j in range(i + min_width, min(i + max_width, num_layers) + 1)
    ]


def select_windows(
    num_layers: int, windows: Sequence[str | Window] | None, min_width: int = 2, max_width: int | None = None
) -> list[Window]:
    """The windows a rank or sweep covers: an explicit list (checked against the layer count), or every
    window within the width filters."""
    if windows:
        chosen = sorted({Window.parse(w) for w in windows})
        for window in chosen:
            window.validate(num_layers)
        return chosen
    windows = all_windows(num_layers, min_width, max_width)
    if not windows:
        raise WindowError(f"no window matches the width filters ({WINDOW_CONVENTION})")
    return windows
