"""``QuantConfig.residual_bits``: a QuantAct after every residual add, found in the traced graph."""

import json
import operator
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import LowbitError
from lowbit.models import create_model
from lowbit.quant import (
    Plan,
    QuantAct,
    QuantConfig,
    build_quantized,
    calibrate_,
    plan_of,
    quant_acts,
    quant_layers,
    quantize_,
    quantize_residuals,
    reset_layer_,
)


class Block(nn.Module):
    """Post-activation block, ``F.relu(out + identity)``; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class InplaceBlock(nn.Module):
    """``out += identity`` then ``self.relu(out)``, the same ReLU module that the block used before."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 1, 1)
        self.b1 = Block(4, 4)
        self.b2 = Block(4, 8, stride=2)
        self.b3 = InplaceBlock(8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.b3(self.b2(self.b1(x)))
        y = self.proj(x) + x  # a join with no ReLU after it (owned by the model itself)
        n = y.size(0) + 1  # size arithmetic: no join
        return self.head(F.adaptive_avg_pool2d(y, 1).reshape(n - 1, -1))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bias = nn.Parameter(torch.zeros(4, 1, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x) + self.bias  # a parameter, not an activation
        y = y + torch.zeros_like(y)  # shape-only: not an activation either
        return self.fc(y.mean((2, 3)) + y.size(1))


class Branchy(Net):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return super().forward(x)


class Dropping(Net):
    def forward(self, x):
        return super().forward(F.dropout(x, 0.1, training=self.training))


EXPECTED = {  # QuantAct name -> what it reads, in named_modules() order
    "b1.shortcut_quant": (F.relu,),  # the stem's output, the identity of a join into a conv branch
    "b1.residual_quant": (F.relu,),
    "b2.shortcut_quant": ("b2.down.1",),  # the downsample's batch norm
    "b2.residual_quant": (F.relu,),
    "b3.residual_quant": ("b3.relu",),
    "residual_quant": (operator.add,),
}


def _x(n=8, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized(model=None, bits=8, calibrate=True, **cfg):
    torch.manual_seed(0)
    model = model or Net()
    gm = quantize_(model, Plan.preset("w4a4", model), QuantConfig(residual_bits=bits, **cfg))
    if calibrate:
        calibrate_(gm, [_x(8, 1), _x(8, 2)])
    return gm


def _reads(gm, kinds=("residual_quant",)):
    return {n.target: n.args[0] for n in gm.graph.nodes
            if n.op == "call_module" and any(k in n.target for k in kinds)}


def test_a_quantact_after_each_join_reading_the_relu_that_follows():
    gm = _quantized(calibrate=False)
    assert isinstance(gm, fx.GraphModule)
    assert list(quant_acts(gm)) == list(EXPECTED)  # named_modules order: the model's own one last
    reads = _reads(gm, ("residual_quant", "shortcut_quant"))
    assert set(reads) == set(EXPECTED)  # none for ``y.size(0) + 1``; b3's and proj's shortcuts are codes already
    for name, src in reads.items():
        assert src.target in EXPECTED[name], name
    first_relu = next(n for n in gm.graph.nodes if n.target == "b3.relu")
    assert [u.target for u in first_relu.users] == ["b3.conv2"]  # the block's first use of self.relu gets none
    assert all(isinstance(m, QuantAct) and m.bits == 8 for m in quant_acts(gm).values())


def test_the_model_keeps_its_modules_names_and_plan_and_the_argument_stays_float():
    model = Net()
    gm = _quantized(model, calibrate=False)
    before = set(model.state_dict())  # layers swapped
    assert gm.b3 is not model.b3 and gm.b3.conv1 is model.b3.conv1  # blocks copied, layers shared
    assert isinstance(gm.b2.down, nn.Sequential) and type(gm.b1).__name__ == "Block"
    assert set(gm.state_dict()) - before == {
        f"{n}.input_quantizer.{k}" for n in EXPECTED for k in ("step", "initialized", "is_signed")
    }
    assert plan_of(gm) == plan_of(model)
    assert not quant_acts(model) and set(model.state_dict()) == before


def test_outputs_lie_on_the_code_grid_and_calibration_makes_them_unsigned_after_a_relu():
    gm = _quantized(bits=4)
    acts = quant_acts(gm)
    assert all(bool(a.input_quantizer.initialized) for a in acts.values())
    assert [a.input_quantizer.signed for a in acts.values()] == [False, False, True, False, False, True]
    seen = {}
    for name, a in acts.items():
        a.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (m, o)))
    gm.eval()(_x(4, 3))
    assert set(seen) == set(EXPECTED)
    for m, out in seen.values():
        q = m.input_quantizer
        codes = out / q.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= -q.q_n - 1e-4 and codes.max() <= q.q_p + 1e-4
        assert len(codes.round().unique()) > 2  # not all clipped to one code


def test_gradient_reaches_every_residual_step():
    gm = _quantized().train()
    F.cross_entropy(gm(_x(8, 4)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    for name, a in quant_acts(gm).items():
        g = a.input_quantizer.step.grad
        assert g is not None and g.abs().item() > 0, name


def test_calibration_reports_a_quantact_that_never_ran():
    gm = _quantized(calibrate=False)
    gm.b1.add_module("stray", QuantAct(8))
    with pytest.raises(LowbitError, match=r"never ran.*b1\.stray.*remove QuantAct"):
        calibrate_(gm, [_x()])


def test_state_dict_round_trip_through_build_quantized():
    gm = _quantized(bits=3).eval()
    x = _x(4, 5)
    blob = json.loads(json.dumps(QuantConfig(residual_bits=3).to_dict()))
    rebuilt = build_quantized(Net(), Plan.preset("w4a4", Net()), blob, gm.state_dict()).eval()
    assert list(quant_acts(rebuilt)) == list(quant_acts(gm))
    assert torch.equal(rebuilt(x), gm(x))
    copied = pickle.loads(pickle.dumps(gm))  # spawned workers (ALPS) receive models pickled
    assert torch.equal(copied(x), gm(x)) and list(quant_acts(copied)) == list(quant_acts(gm))
    with pytest.raises(LowbitError, match="state dict does not match"):  # the QuantActs' state is required
        build_quantized(Net(), Plan.preset("w4a4", Net()), blob, _quantized(bits=None).state_dict())


STREAM_READERS = {"b1.conv1": "b1.shortcut_quant", "b2.conv1": "b1.residual_quant",
                  "b2.down.0": "b1.residual_quant", "b3.conv1": "b2.residual_quant", "proj": "b3.residual_quant"}


def test_layers_reading_the_stream_at_its_bits_share_its_quantizer():
    model = Net()
    gm, own = _quantized(model, bits=4), _quantized(bits=4, share_residual_steps=False)
    acts, layers = quant_acts(gm), quant_layers(gm)
    assert {n for n, m in layers.items() if m.shares_input} == set(STREAM_READERS)
    assert all(layers[n].input_quantizer is acts[a].input_quantizer for n, a in STREAM_READERS.items())
    assert not any(m.shares_input for m in [*quant_layers(model).values(), *quant_layers(own).values()])
    steps = [k for k in gm.state_dict() if k.endswith("input_quantizer.step")]
    assert not set(steps) & {f"{n}.input_quantizer.step" for n in STREAM_READERS}  # one step per stream value
    assert len(steps) == len(acts) + len(layers) - len(STREAM_READERS)
    # calibration gives a reader's own step the stream's value, and rounding its codes again changes nothing
    assert all(torch.equal(quant_layers(own)[n].input_quantizer.scale, acts[a].input_quantizer.scale)
               for n, a in STREAM_READERS.items())
    x = _x(8, 7)
    assert torch.equal(gm.eval()(x), own.eval()(x))
    copied = pickle.loads(pickle.dumps(gm))  # spawned ALPS workers: the sharing survives, one quantizer per value
    stream = copied.b1.residual_quant.input_quantizer
    assert copied.b2.down[0].input_quantizer is copied.b2.conv1.input_quantizer is stream
    assert torch.equal(copied(x), gm(x))
    with pytest.raises(LowbitError, match="cannot read 8-bit codes"):
        layers["b1.conv1"].share_input_quantizer_(QuantAct(8))


def test_resetting_a_stream_reader_keeps_the_stream_step_and_the_layout_rebuilds():
    gm = _quantized(bits=4)
    stream = {n: a.input_quantizer.step.detach().clone() for n, a in quant_acts(gm).items()}
    reset_layer_(gm.b2.conv1, 2, 2, [_x(8, 3)], model=gm)  # 2 bits: a quantizer of its own
    reset_layer_(gm.b3.conv1, 4, 4, [_x(8, 3)], model=gm)  # the stream's bits: still the stream's step
    assert not gm.b2.conv1.shares_input and gm.b2.conv1.a_bits == 2 and gm.b3.conv1.shares_input
    assert gm.b3.conv1.input_quantizer is gm.b2.residual_quant.input_quantizer
    assert all(torch.equal(a.input_quantizer.step, stream[n]) for n, a in quant_acts(gm).items())
    rebuilt = build_quantized(Net(), plan_of(gm), QuantConfig(residual_bits=4), gm.state_dict()).eval()
    x = _x(4, 5)
    assert torch.equal(rebuilt(x), gm.eval()(x))


def test_config_round_trip_and_old_dicts():
    assert "residual_bits" not in QuantConfig().to_dict()  # old fingerprints still match
    d = QuantConfig(residual_bits=4).to_dict()
    assert d["residual_bits"] == 4 and QuantConfig.from_dict(d) == QuantConfig(residual_bits=4)
    old = {
        "method": "lsq",
        "per_channel": False,
        "faq_weight_std_multiple": None,
        "faq_percentiles": None,
        "faq_power_of_two": False,
        "minmax_mse": False,
        "signed_inputs": "auto",
    }  # a checkpoint's, from before
    assert QuantConfig().to_dict() == old and QuantConfig.from_dict(old).residual_bits is None
    assert d["share_residual_steps"] is True and "share_residual_steps" not in QuantConfig().to_dict()


def test_a_checkpoint_with_a_readers_own_step_loads_with_that_step():
    """Saved before shared steps existed (or after reset_layer_ gave a reader a step of its own): the config shares by
    default, the state dict has the reader's own step, and the rebuilt reader keeps it."""
    own = _quantized(bits=4, share_residual_steps=False).eval()
    before = {"residual_bits": 4}  # a checkpoint's config from before the option: no key
    rebuilt = build_quantized(Net(), Plan.preset("w4a4", Net()), before, own.state_dict()).eval()
    assert not any(m.shares_input for m in quant_layers(rebuilt).values())
    x = _x(4, 6)
    assert torch.equal(rebuilt(x), own(x))
    mixed = _quantized(bits=4)
    reset_layer_(mixed.b3.conv1, 2, 2, [_x(8, 3)], model=mixed)
    reset_layer_(mixed.b3.conv1, 4, 4, [_x(8, 3)], model=mixed)  # back at the stream's bits: a step of its own
    rebuilt = build_quantized(Net(), plan_of(mixed), {"residual_bits": 4}, mixed.state_dict()).eval()
    assert not rebuilt.b3.conv1.shares_input and rebuilt.b2.conv1.shares_input
    assert torch.equal(rebuilt(x), mixed.eval()(x))


@pytest.mark.parametrize("bad", [5, 16, True, "8", 8.0])
def test_bad_bits_are_one_line_errors(bad):
    with pytest.raises(LowbitError, match=r"residual_bits=.*choose one of 2, 3, 4, 8") as e:
        QuantConfig(residual_bits=bad)
    assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore:.*cannot trace the forward pass")  # the preset's edge layers
@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (Branchy, r"needs a forward that torch\.fx can trace; Branchy's cannot be: .*control flow"),
        (Plain, "Plain has no residual add"),
        (Dropping, r"changes with self\.training"),
    ],
)
def test_models_it_cannot_quantize_are_refused_before_anything_changes(model, needle):
    m = model()
    with pytest.raises(LowbitError, match=needle) as e:
        quantize_(m, Plan.preset("w4a4", m), QuantConfig(residual_bits=8))
    assert "\n" not in str(e.value)
    assert not any(type(x).__name__.startswith("Quant") for x in m.modules())  # layers not swapped


def test_transformers_are_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return x + self.value(x)

    encoder = nn.Sequential(nn.ModuleList([Attention()]))
    with pytest.raises(LowbitError, match="not supported for transformers"):
        quantize_residuals(encoder, 8)


class InplaceAdds(nn.Module):
    def __init__(self, more=False):
        super().__init__()
        self.a, self.b, self.more = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), more

    def forward(self, x):
        out = self.a(x)
        out.add_(self.b(x))  # in place: the later reader of ``out`` reads the sum
        y = F.relu(out)
        if self.more:
            out += x  # ``out`` was read by the ReLU, then changed again: quantized after add_, not after the ReLU
            z = y + x
            z.relu_()
            y = z + out
        return y.sum((2, 3))


def test_inplace_adds_keep_the_models_values_and_a_quantized_add_is_left_alone():
    (src,) = _reads(quantize_residuals(InplaceAdds(), 8)).values()
    assert src.target is F.relu
    m = InplaceAdds(more=True)
    gm = quantize_residuals(m, 8)
    assert [src.target for src in _reads(gm).values()] == ["add_", operator.add, operator.add, operator.add]
    for a in quant_acts(gm).values():
        a.input_quantizer.observing = True  # pass-through: the traced forward must compute what the model does
    x = _x(2, 7)
    assert torch.equal(gm(x), m(x))
    again = quantize_residuals(gm, 8)  # adds already followed by a QuantAct are left alone
    assert list(quant_acts(again)) == list(quant_acts(gm))


def test_distilled_features_must_be_modules_the_graph_calls():
    from lowbit.train.loop import _FeatureTaps

    gm, teacher = _quantized(calibrate=False), Net()
    _FeatureTaps(gm, teacher, ("b1.conv2",)).remove()
    with pytest.raises(LowbitError, match="'b1' is traced through"):
        _FeatureTaps(gm, teacher, ("b1",))


def test_registry_resnet8_gets_one_quantact_per_block_after_its_relu():
    gm = _quantized(create_model("resnet8", width=0.25), calibrate=False)
    reads = _reads(gm)
    assert sorted(reads) == [f"layer{i}.0.residual_quant" for i in (1, 2, 3)]
    assert all(src.target == name.replace("residual_quant", "relu2") for name, src in reads.items())
    assert gm.prefers_channels_last  # fit's channels-last choice survives tracing


@pytest.mark.parametrize("bits", [8, 4])  # 4: five layers read the stream's codes unrounded
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_forward_and_backward_match_eager(backend, bits):
    gm = _quantized(bits=bits).train()
    x, y = _x(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    F.cross_entropy(gm(x), y).backward()
    eager = {n: p.grad.clone() for n, p in gm.named_parameters() if "residual_quant" in n}
    gm.zero_grad()
    torch._dynamo.reset()
    F.cross_entropy(torch.compile(gm, backend=backend)(x), y).backward()
    for n, g in eager.items():
        assert torch.allclose(dict(gm.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6), n
    assert len(eager) == 4


USER_CODE = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))) + x)
        return self.head(x.mean((2, 3)))


def make_images(n=96, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return {"train": torch.utils.data.TensorDataset(x, y)}
"""


def test_cli_quantize_with_residual_bits_records_it_and_the_checkpoint_loads_back(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.io import load_checkpoint, load_yaml
    from lowbit.train import load_quantized_run

    (tmp_path / "residual_user_code.py").write_text(USER_CODE)  # a module name of its own: imports are cached
    code, fp32, q = tmp_path / "residual_user_code.py", tmp_path / "fp32", tmp_path / "q"
    common = ["--batch-size", "32", "--no-compile", "--quiet"]
    train = ["train", "--model", f"{code}:Net", "--data", f"{code}:make_images", "--epochs", "0", "--out", str(fp32)]
    assert main([*train, *common]) == 0  # no epoch: an fp32 checkpoint to quantize
    quantize = ["quantize", "--from", str(fp32), "--bits", "w4a4", "--residual-bits", "4", "--out", str(q), *common]
    assert main([*quantize, "--epochs", "1"]) == 0
    assert main([*quantize, "--epochs", "2", "--resume"]) == 0  # rebuilt with the same names, optimizer included
    cfg = load_yaml(q / "config.yaml")
    assert cfg["residual_bits"] == 4 and cfg["quant_config"]["residual_bits"] == 4
    assert load_checkpoint(q / "checkpoint.pt")["epoch"] == 2
    model, ckpt = load_quantized_run(q)
    acts = quant_acts(model)
    assert list(acts) == ["shortcut_quant", "residual_quant"] and all(a.bits == 4 for a in acts.values())
    assert bool(acts["residual_quant"].input_quantizer.initialized) and ckpt["quant_config"]["residual_bits"] == 4
    capsys.readouterr()
    assert main(["plan", "--from", str(q), "--show"]) == 0
    assert "residual_quant  residual" in capsys.readouterr().out
    assert main(["plan", "--model", f"{code}:Net", "--residual-bits", "8", "--show"]) == 0
    assert "residual   a8 x2" in capsys.readouterr().out
    assert main(["export", "--from", str(q), "--out", str(tmp_path / "m.lowbit"), "--epilogue-error", "0.125"]) == 0
    from lowbit.runtime.engine import IntegerModel

    ref = IntegerModel.load(tmp_path / "m.lowbit")
    assert ref.manifest["epilogue_error"] == 0.125 and [n.op for n in ref.nodes].count("conv2d_add") == 1
    assert model.a.shares_input and "requantize" not in [n.op for n in ref.nodes]  # `a` reads the stream's codes
    own = tmp_path / "own"
    assert main([*quantize, "--epochs", "1", "--no-share-residual-steps", "--out", str(own)]) == 0
    assert load_yaml(own / "config.yaml")["quant_config"]["share_residual_steps"] is False
    assert not load_quantized_run(own)[0].a.shares_input


class ShortcutFirst(nn.Module):
    """``identity + out``: the 1x1 downsample's branch comes first, the 3x3 branch second."""

    def __init__(self):
        super().__init__()
        self.block = Block(2, 4, stride=2)

    def forward(self, x):
        b = self.block
        out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        return F.relu(b.down(x) + out)


def test_the_largest_conv_branch_stays_unrounded_whatever_the_operand_order():
    gm = _quantized(ShortcutFirst(), calibrate=False)
    reads = _reads(gm, ("shortcut_quant",))
    assert [src.target for src in reads.values()] == ["block.down.1"]  # the 1x1's output is rounded, not bn2's
