import json
import math

import numpy as np
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
