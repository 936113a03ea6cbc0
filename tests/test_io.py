import json
import math

import numpy as np
import pytest
import torch

from lowbit.io import load_json, save_json


def test_save_json_writes_strict_json_for_non_finite_values(tmp_path):
    obj = {"loss": float("nan"), "acc": 0.5, "rows": [float("inf"), 1.0], "t": torch.tensor([float("nan"), 2.0]),
           "np": np.float64("-inf"), "arr": np.array([1.0, np.nan])}
    p = save_json(tmp_path / "s.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)  # also parses with a strict parser
    assert back == {"loss": None, "acc": 0.5, "rows": [None, 1.0], "t": [None, 2.0], "np": None, "arr": [1.0, None]}
    assert load_json(p)["acc"] == 0.5 and not any(isinstance(v, float) and math.isnan(v) for v in back.values())


def test_folders_and_unreadable_paths_are_user_errors(tmp_path):
    from lowbit.errors import LowbitError
    from lowbit.io import atomic_write_text, load_json, load_yaml

    for load in (load_json, load_yaml):
        with pytest.raises(LowbitError, match="is a folder, expected a file"):
            load(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(LowbitError, match="it is a folder"):
        atomic_write_text(tmp_path / "out", "x")
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left


def test_a_pickled_checkpoint_is_named_as_such(tmp_path):
    import pickle

    from lowbit.errors import LowbitError
    from lowbit.io import load_checkpoint

    (tmp_path / "x.pt").write_bytes(pickle.dumps({"a": object()}))
    with pytest.raises(LowbitError, match="pickled Python objects") as e:
        load_checkpoint(tmp_path / "x.pt")
    assert "\x1b" not in str(e.value)
