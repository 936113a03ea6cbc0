"""Default candidates follow the preset rule: the first and last *executed* layers stay out."""

from lowbit.quant import quantize_
from lowbit.sensitivity import candidate_layers
from tests.quant.test_plan import HeadFirst


def test_candidates_skip_the_executed_stem_and_head():
    model = quantize_(HeadFirst(), "w4a4")  # registers head, stem, body; runs stem, body, head
    assert candidate_layers(model) == ["body"]
    assert candidate_layers(model, include_first_last=True) == ["head", "stem", "body"]
