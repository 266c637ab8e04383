"""LayerPlan: the explicit execution order of base layer indices.

Windows use Python slice notation, the seeds' `B=[i,j)`: `24:35` is base layers 24..34, 0-based,
half-open. RYS `i:j` with `repeats=2` on `L` layers is `[0..j-1] + [i..L-1]`; `repeats=n` visits the
block `n` times. Several windows form one plan; each is expanded in place, left to right, in base
coordinates, so they must not overlap. Every exporter, the in-memory repeat and every card consumes
the explicit order (`LayerPlan.order`), never a range string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rys_forge.errors import WindowError

WINDOW_CONVENTION = "windows are i:j, 0-based and half-open (layers i..j-1), with 0 <= i < j <= L"
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
    """

    num_layers: int
    order: tuple[int, ...]
    windows: tuple[Window, ...] = ()
    repeats: int = 2

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

    @classmethod
    def identity(cls, num_layers: int) -> "LayerPlan":
        """The base model's own order."""
        return cls(num_layers, tuple(range(num_layers)), (), 1)

    @classmethod
    def from_windows(
        cls, windows: Iterable[Window | str], num_layers: int, repeats: int = 2
    ) -> "LayerPlan":
        """Build the plan that visits each window's block `repeats` times.

        Raises:
            WindowError: a window is malformed, out of range, or overlaps another; repeats < 1.
        """
        if repeats < 1:
            raise WindowError(f"repeats must be >= 1 (visits of the block), got {repeats}")
        parsed = sorted(w if isinstance(w, Window) else Window.parse(w) for w in windows)
        if not parsed:
            raise WindowError("give at least one window i:j")
        for window in parsed:
            window.validate(num_layers)
        for left, right in zip(parsed, parsed[1:]):
            if right.start < left.end:
                raise WindowError(f"windows {left} and {right} overlap; windows of one plan must be disjoint")
        order: list[int] = []
        cursor = 0
        for window in parsed:
            order.extend(range(cursor, window.start))
            order.extend(list(range(window.start, window.end)) * repeats)
            cursor = window.end
        order.extend(range(cursor, num_layers))
        return cls(num_layers, tuple(order), tuple(parsed), repeats)

    @classmethod
    def from_order(cls, order: Sequence[int], num_layers: int) -> "LayerPlan":
        """A plan from an explicit order (e.g. read back from an exported config)."""
        return cls(num_layers, tuple(int(k) for k in order), (), 1)

    @property
    def is_identity(self) -> bool:
        return self.order == tuple(range(self.num_layers))

    @property
    def extra_layers(self) -> int:
        """Visits beyond the base model's layer count."""
        return len(self.order) - self.num_layers

    def describe(self) -> str:
        """Short human form, e.g. `6:10 x2 on 18 layers -> 22 visits`."""
        head = ", ".join(str(w) for w in self.windows) or "explicit order"
        return f"{head} x{self.repeats} on {self.num_layers} layers -> {len(self.order)} visits"

    def to_dict(self) -> dict:
        """JSON-ready form stored in every output (the explicit order is the source of truth)."""
        return {
            "layer_order": list(self.order),
            "base_num_layers": self.num_layers,
            "windows": [str(w) for w in self.windows],
            "repeats": self.repeats,
            "convention": "windows i:j are 0-based, half-open: layers i..j-1",
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        """Inverse of `to_dict`; checks that the stored windows reproduce the stored order."""
        try:
            order = data["layer_order"]
            num_layers = int(data["base_num_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WindowError(f"stored plan lacks a valid field: {exc}") from None
        windows = data.get("windows") or []
        repeats = int(data.get("repeats", 2))
        if windows:
            plan = cls.from_windows(windows, num_layers, repeats)
            if list(plan.order) != [int(k) for k in order]:
                raise WindowError(
                    f"stored plan is inconsistent: windows {windows} x{repeats} give {list(plan.order)},"
                    f" but layer_order is {list(order)}"
                )
            return plan
        return cls.from_order(order, num_layers)


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
