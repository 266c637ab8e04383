"""LayerPlan parsing and validation."""

from __future__ import annotations

import pytest

from rys_forge.errors import WindowError
from rys_forge.plan import LayerPlan, Window, all_windows


def test_rys_order_matches_definition():
    # RYS i:j, repeats=2 on L layers is [0..j-1] + [i..L-1].
    plan = LayerPlan.from_windows(["6:10"], 18)
    assert list(plan.order) == list(range(10)) + list(range(6, 18))
    assert plan.extra_layers == 4


def test_repeats_and_multiple_windows():
    assert list(LayerPlan.from_windows(["1:3"], 5, repeats=3).order) == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    assert list(LayerPlan.from_windows(["3:4", "0:2"], 5).order) == [0, 1, 0, 1, 2, 3, 3, 4]
    assert list(LayerPlan.from_windows(["0:2", "2:4"], 4).order) == [0, 1, 0, 1, 2, 3, 2, 3]
    assert LayerPlan.from_windows(["2:4"], 6, repeats=1).is_identity


@pytest.mark.parametrize(
    "window, fragment",
    [("20:35", "ends past the model's 18 layers; use i:j with 0 <= i < j <= 18"), ("5:5", "half-open"),
     ("7:3", "half-open"), ("a:b", "bad window"), ("-1:3", "bad window"), ("3", "bad window")],
)
def test_bad_windows(window, fragment):
    with pytest.raises(WindowError, match=fragment.replace("(", r"\(")):
        LayerPlan.from_windows([window], 18)


def test_overlap_and_repeats_rejected():
    with pytest.raises(WindowError, match="overlap"):
        LayerPlan.from_windows(["2:6", "4:8"], 18)
    with pytest.raises(WindowError, match="repeats must be >= 1"):
        LayerPlan.from_windows(["2:6"], 18, repeats=0)


def test_roundtrip_and_tampered_dict():
    plan = LayerPlan.from_windows(["2:6"], 10, repeats=3)
    assert LayerPlan.from_dict(plan.to_dict()) == plan
    data = plan.to_dict()
    data["layer_order"] = data["layer_order"][:-1]
    with pytest.raises(WindowError, match="inconsistent"):
        LayerPlan.from_dict(data)
    with pytest.raises(WindowError, match="outside the base model's layers"):
        LayerPlan.from_order([0, 1, 12], 10)


@pytest.mark.parametrize("field,value", [("layer_order", "x"), ("layer_order", [0, "1"]), ("layer_order", [True]),
                                         ("windows", 5), ("windows", [[2, 6]]), ("repeats", "two")])
def test_stored_plan_with_a_value_of_the_wrong_type_is_a_window_error(field, value):
    """A hand-edited `rys.plan` gives WindowError (one line in the CLI), not a ValueError from int()."""
    data = {**LayerPlan.from_windows(["2:6"], 10).to_dict(), field: value}
    with pytest.raises(WindowError, match="stored plan"):
        LayerPlan.from_dict(data)


def test_all_windows_counts():
    assert len(all_windows(18)) == 153
    assert len(all_windows(30)) == 435
    assert len(all_windows(32)) == 496
    assert all(2 <= w.width <= 4 for w in all_windows(10, 2, 4))
    assert Window(3, 7) in all_windows(10, 4, 4)
    with pytest.raises(WindowError, match="--max-width 20"):
        all_windows(18, 2, 20)
