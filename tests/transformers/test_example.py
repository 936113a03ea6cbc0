"""examples/tiny_bert.py runs end to end at a small size."""

import pytest

pytest.importorskip("transformers")


def test_walk_through_small(capsys):
    import tiny_bert

    result = tiny_bert.walk_through(epochs=1, qat_epochs=1, n_train=256)
    out = capsys.readouterr().out
    assert 0 <= result["fp32"] <= 1 and 0 <= result["w4a8"] <= 1
    assert "bert.pooler.dense" in out and "eagl (h4): 12 candidate layers" in out
