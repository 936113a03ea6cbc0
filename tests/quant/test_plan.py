import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit.cost import as_plan, profile_layers, w4a4_reference_plan
from lowbit.errors import LowbitError
from lowbit.models import create_model, list_models
from lowbit.quant import SUPPORTED_BITS, Plan, edge_layers, execution_order, parse_bits, quantizable_layers


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )


def test_quantizable_layers_in_named_modules_order():
    assert quantizable_layers(small_cnn()) == ["0", "3.0", "3.2", "6"]


def test_quantizable_layers_skip_attention_out_proj():
    block = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "mlp": nn.Linear(8, 8)})
    assert quantizable_layers(block) == ["mlp"]
    with pytest.raises(LowbitError, match="not a Conv2d or Linear"):
        Plan({"attn.out_proj": (4, 4)}).validate(block)


@pytest.mark.parametrize("name,expected", [
    ("w4a4", (4, 4)), ("W8A8", (8, 8)), ("w2a4", (2, 4)), ("w4a32", (4, None)),
])
def test_parse_bits(name, expected):
    assert parse_bits(name) == expected


@pytest.mark.parametrize("name", ["w5a4", "w4a1", "4/4", "w4", "int8"])
def test_parse_bits_errors(name):
    with pytest.raises(LowbitError, match=repr(name)):
        parse_bits(name)


def test_preset_first_and_last_layers():
    model = small_cnn()
    plan = Plan.preset("w4a4", model)
    assert plan.layers == {"0": (8, 8), "3.0": (4, 4), "3.2": (4, 4), "6": (8, 8)}
    assert Plan.preset("w2a4", model, first_last_bits=None).layers == {
        "0": (None, None), "3.0": (2, 4), "3.2": (2, 4), "6": (None, None)}
    assert Plan.preset("w3a3", model, first_last_bits=4).layers["6"] == (4, 4)
    assert set(Plan.preset("fp32", model).layers.values()) == {(None, None)}
    assert Plan.preset("float", model) == Plan.preset("fp32", model)
    with pytest.raises(LowbitError, match="first_last_bits"):
        Plan.preset("w4a4", model, first_last_bits=16)
    with pytest.raises(LowbitError, match="no Conv2d or Linear"):
        Plan.preset("w4a4", nn.ReLU())


class HeadFirst(nn.Module):
    """Registers its head first and its stem between head and body: registration order is not call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 10)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


class Untraceable(HeadFirst):
    def forward(self, x):  # data-dependent control flow: torch.fx cannot trace it
        y = self.stem(x)
        y = self.body(y) if y.sum() > float("-inf") else y
        return self.head(y.mean((2, 3)))


def test_preset_keeps_the_first_and_last_executed_layers():
    model, x = HeadFirst(), torch.randn(1, 3, 6, 6)
    assert quantizable_layers(model) == ["head", "stem", "body"]  # registration order would pick head, body
    assert execution_order(model) == ["stem", "body", "head"]
    assert edge_layers(model) == ("stem", "head") == edge_layers(model, example_input=x)
    plan = Plan.preset("w4a4", model)
    assert plan.layers == {"head": (8, 8), "stem": (8, 8), "body": (4, 4)}
    assert list(plan.layers) == ["head", "stem", "body"]  # rows stay in module order
    assert Plan.preset("w4a4", model, example_input=x) == plan
    assert w4a4_reference_plan(profile_layers(model, x)) == plan  # the cost model's reference: same rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Plan.preset("w4a4", nn.Linear(2, 2)).layers == {"": (8, 8)}  # a lone layer is its own stem


def test_preset_on_an_untraceable_model():
    model, x = Untraceable(), torch.randn(1, 3, 6, 6)
    assert execution_order(model) is None
    assert Plan.preset("w4a4", model, example_input=x).layers == {"head": (8, 8), "stem": (8, 8), "body": (4, 4)}
    with pytest.warns(UserWarning, match="example_input"):
        fallback = Plan.preset("w4a4", model)
    assert fallback.layers == {"head": (8, 8), "stem": (4, 4), "body": (8, 8)}  # registration order


@pytest.mark.parametrize("name", list_models(include_external=False))
def test_preset_unchanged_for_registry_models(name):
    model = create_model(name)
    names = quantizable_layers(model)
    registration_rule = {n: (8, 8) if n in (names[0], names[-1]) else (4, 4) for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced, no fallback
        assert Plan.preset("w4a4", model).layers == registration_rule


def test_coerce_is_the_one_conversion():
    plan = Plan({"a": (4, 4), "b": (8, None)})

    class HasLayers:
        layers = {"a": [4, 4], "b": [8, None]}

    assert Plan.coerce(plan) is plan
    assert Plan.coerce(plan.layers) == Plan.coerce(plan.to_dict()) == Plan.coerce(HasLayers()) == plan
    with pytest.raises(LowbitError, match="must map layer names"):
        Plan.coerce([("a", (4, 4))])


BITS = st.sampled_from([*SUPPORTED_BITS, None])
PLANS = st.dictionaries(st.text(min_size=1, max_size=12), st.tuples(BITS, BITS), max_size=8).map(Plan)


@given(PLANS)
def test_plan_dict_round_trip(plan):
    d = plan.to_dict()
    for back in (Plan.from_dict(d), Plan.from_dict(json.loads(json.dumps(d))), Plan.coerce(d), as_plan(d)):
        assert back == plan and list(back.layers) == list(plan.layers) and hash(back) == hash(plan)
    assert as_plan(plan.layers) == plan


def test_bad_bits_and_entries():
    with pytest.raises(LowbitError, match="'conv' w_bits: unsupported bits 5"):
        Plan({"conv": (5, 4)})
    with pytest.raises(LowbitError, match="a_bits"):
        Plan({"conv": (4, "4")})
    with pytest.raises(LowbitError, match="expected name"):
        Plan({"conv": 4})
    assert Plan({"conv": {"w_bits": 4, "a_bits": None}}).layers == {"conv": (4, None)}


def test_validate_names_unknown_and_unquantizable_layers():
    model = small_cnn()
    Plan.preset("w4a4", model).validate(model)
    with pytest.raises(LowbitError) as e:
        Plan({"3.O": (4, 4), "1": (4, 4), "nope": (2, 2)}).validate(model)
    msg = str(e.value)
    assert "unknown layer '3.O' (did you mean" in msg and "3.0" in msg
    assert "'1' is a BatchNorm2d" in msg and "unknown layer 'nope'" in msg


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    plan = Plan({"0": (8, 8), "3.0": (2, None), "6": (None, 4)})
    path = plan.save(tmp_path / f"plan{suffix}")
    loaded = Plan.load(path)
    assert loaded == plan and list(loaded.layers) == list(plan.layers)
    assert hash(loaded) == hash(plan)


def test_load_errors(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        Plan.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("layers: {conv: [5, 4]}\n")
    with pytest.raises(LowbitError, match=r"bad.yaml: layer 'conv' w_bits: unsupported bits 5"):
        Plan.load(tmp_path / "bad.yaml")
    (tmp_path / "flat.json").write_text('{"conv": [4, 4]}')
    with pytest.raises(LowbitError, match="exactly one key 'layers'"):
        Plan.load(tmp_path / "flat.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LowbitError, match="not valid JSON"):
        Plan.load(tmp_path / "broken.json")
    with pytest.raises(LowbitError, match=r"\.yaml, \.yml or \.json"):
        Plan({}).save(tmp_path / "plan.txt")


def test_describe_and_with_bits():
    plan = Plan.preset("w4a4", small_cnn()).with_bits("3.0", 2, 2)
    text = str(plan)
    assert text.splitlines()[0].split() == ["layer", "w_bits", "a_bits"]
    assert text.splitlines()[2].split() == ["3.0", "2", "2"]
    assert "float" in Plan({"x": (4, None)}).describe()
