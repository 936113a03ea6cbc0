import math

import pytest

from lowbit.errors import LowbitError
from lowbit.sensitivity import SensitivityRow, SensitivityTable


def _table(scores=(0.2, 0.9, 0.5)):
    rows = tuple(SensitivityRow(f"l{i}", s, 100 * (i + 1), 10 * (i + 1), {"trace": s * 2}) for i, s in
                 enumerate(scores))
    return SensitivityTable("hessian", rows, 1.5, {"forward": 3, "backward": 3, "hvp": 3}, {"tol": 0.01})


def test_round_trip_through_a_file(tmp_path):
    t = _table()
    t.save(tmp_path / "sensitivity.json")
    back = SensitivityTable.load(tmp_path)  # a run directory works too
    assert back == t
    assert back.scores == {"l0": 0.2, "l1": 0.9, "l2": 0.5}
    assert back.passes == {"forward": 3, "backward": 3, "hvp": 3, "epochs": 0.0}
    assert back.rows[1].extra == {"trace": 1.8}


def test_render_is_sorted_most_sensitive_first():
    lines = _table().render().splitlines()
    assert lines[0].startswith("hessian: 3 candidate layers")
    order = [line.split()[1] for line in lines[2:]]
    assert order == ["l1", "l2", "l0"]
    assert "33.3%" in lines[2] and "50.0%" in lines[3]  # l1 has 200 of the 600 candidate MACs, l2 has 300


@pytest.mark.parametrize("bad,needle", [
    ({"method": "x"}, "not a sensitivity table"),
    ({"method": "x", "rows": [], "version": 99}, "version"),
    ({"method": "x", "rows": [{"layer": "a", "score": 1.0}], "version": 1}, "every row needs"),
    ({"method": "x", "rows": [{"layer": "a", "score": "hi", "macs": 1, "params": 1}], "version": 1}, "non-numeric"),
])
def test_malformed_tables_are_user_errors(bad, needle):
    with pytest.raises(LowbitError, match=needle):
        SensitivityTable.from_dict(bad)


def test_duplicate_layers_and_non_finite_scores_are_refused():
    row = SensitivityRow("a", 1.0, 1, 1)
    with pytest.raises(LowbitError, match="twice"):
        SensitivityTable("eagl", (row, row), 0.0)
    with pytest.raises(LowbitError, match="non-finite"):
        SensitivityTable("eagl", (SensitivityRow("a", math.nan, 1, 1),), 0.0)
