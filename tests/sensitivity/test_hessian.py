import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import Plan, calibrate_, quant_layers, quantize_
from lowbit.sensitivity import hessian_scores, hutchinson_traces
from lowbit.sensitivity.hessian import low_bit_error


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    quantize_(model, Plan.preset("w4a4", model))
    calibrate_(model, [torch.randn(16, 6)])
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    return model, batches


def _exact_hessian(model, batches, weight):
    """The weight's Hessian block of the batch-size-weighted mean loss, from the full autograd Hessian."""
    name = next(n for n, p in model.named_parameters() if p is weight)
    total = sum(len(y) for _, y in batches)

    def loss(w):
        return sum(len(y) / total * F.cross_entropy(torch.func.functional_call(model, {name: w}, (x,)), y)
                   for x, y in batches)

    h = torch.autograd.functional.hessian(loss, weight.detach().clone())
    return h.reshape(weight.numel(), weight.numel())


def test_each_iteration_is_v_h_v_per_layer():
    """One iteration = per layer, sum over batches (weighted by size) of v_l · (Hv)_l with one Rademacher v
    over all candidate weights, so the cross-layer blocks enter with zero mean (PyHessian's per-block trace)."""
    model, batches = _tiny()
    named = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    est, info = hutchinson_traces(model, list(named.values()), batches, max_iter=1,
                                  generator=torch.Generator().manual_seed(5))
    assert info["iterations"] == 1 and info["hvp"] == len(batches) == info["forward"] == info["backward"]
    g = torch.Generator().manual_seed(5)  # the same vectors: drawn per batch, in parameter order
    expected = torch.zeros(len(named))
    assert model.training  # the train/eval flags are restored
    model.eval()
    for x, y in batches:
        vs = tuple(torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1 for p in named.values())

        def loss(*ws, x=x, y=y):
            return F.cross_entropy(torch.func.functional_call(model, dict(zip(named, ws)), (x,)), y)

        _, hv = torch.autograd.functional.hvp(loss, tuple(p.detach() for p in named.values()), vs)
        expected += torch.tensor([float((v * h).sum()) for v, h in zip(vs, hv)]) * len(y) / 32
    assert est == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-7)


def test_the_running_mean_approaches_the_exact_trace():
    model, batches = _tiny()
    params = [layer.weight for layer in quant_layers(model).values()]
    exact = [float(torch.trace(_exact_hessian(model, batches[:1], p))) for p in params]
    est, _ = hutchinson_traces(model, params, batches[:1], tol=1e-12, max_iter=300,
                               generator=torch.Generator().manual_seed(0))
    assert est == pytest.approx(exact, rel=0.15, abs=0.02)


def test_stops_on_the_relative_tolerance():
    model, batches = _tiny()
    t = hessian_scores(model, batches, include_first_last=True, tol=0.5, max_iter=100, random_state=1)
    history = t.config["trace_history"]
    assert t.config["converged"] and t.config["iterations"] == len(history) < 100
    assert abs(history[-1] - history[-2]) / abs(history[-2]) < 0.5
    assert all(abs(b - a) / abs(a) >= 0.5 for a, b in zip(history[:-2], history[1:-1]))
    assert t.passes == {"forward": 2 * len(history), "backward": 2 * len(history), "hvp": 2 * len(history),
                        "epochs": 0.0}
    one = hessian_scores(model, batches, max_iter=1, random_state=1)
    assert one.config["iterations"] == 1 and not one.config["converged"]


def test_score_is_trace_per_weight_times_2bit_error():
    model, batches = _tiny()
    t = hessian_scores(model, batches, include_first_last=True, max_iter=5, random_state=3)
    layers = quant_layers(model)
    for r in t.rows:
        n = layers[r.layer].weight.numel()
        assert r.extra["quant_error"] == pytest.approx(low_bit_error(layers[r.layer]))
        assert r.extra["quant_error"] > 0 and r.params == n
        assert r.score == pytest.approx(r.extra["trace"] / n * r.extra["quant_error"])
    again = hessian_scores(model, batches, include_first_last=True, max_iter=5, random_state=3)
    assert again.scores == t.scores  # seeded
    assert hessian_scores(model, batches, include_first_last=True, max_iter=5, random_state=4).scores != t.scores


def test_needs_batches():
    model, _ = _tiny()
    with pytest.raises(LowbitError, match="at least one batch"):
        hessian_scores(model, [], include_first_last=True)
