"""The typed IR: round trip through the file, producer/reader lookups, validation against the op table, and
kernel registries: every backend covers the table (or says what it falls back to), and a newly registered op
runs in every backend that claims it."""

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export.onnx_export import export_onnx
from lowbit.ir import OPS, Graph, Node, OpSpec, kernel, missing_kernels, read_model, register_op, write_model
from lowbit.ir.kernels import kernels, unregister_kernel
from lowbit.ir.ops import IMAGE_OPS, TOKEN_OPS, unregister_op
from lowbit.runtime import FastModel, GpuModel, IntegerModel
from lowbit.runtime.fastpath import available
from tests.export.test_user_models import ResidualNet, _export, _pixels, _quantized, _randomise_bn


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _quantized(_randomise_bn(ResidualNet()))
    return _export(model, tmp_path_factory.mktemp("ir")).path


def test_round_trip_and_lookups(exported, tmp_path):
    manifest, tensors = read_model(exported)
    graph = Graph.load(exported)
    assert all(isinstance(n, Node) for n in graph.nodes)
    assert graph.to_manifest()["graph"] == manifest["graph"]
    again = Graph.load(write_model(tmp_path / "again.lowbit", graph.to_manifest(), tensors))
    assert [n.to_json() for n in again.nodes] == manifest["graph"]
    conv = graph.node("stem")
    assert graph.producer(conv.output) is conv and graph.producer(graph.inputs[0]) is None
    assert graph.producer(conv.inputs[0]).op == "quantize_input"
    assert all(conv.output in r.inputs for r in graph.readers(conv.output)) and graph.readers(conv.output)
    assert graph.readers("logits") == [] and graph.shapes[conv.output] == [8, 16, 16]
    assert graph.params["stem"]["weight"].dtype == torch.int32  # unpacked codes
    with pytest.raises(LowbitError, match="no node named"):
        graph.node("nope")


@pytest.mark.parametrize("edit,match", [
    (lambda n: n["attrs"].update(stride="x"), "'stride' must be an integer or two integers >= 1"),
    (lambda n: n["attrs"].update(lo=5, hi=1), "empty output range"),
    (lambda n: n["attrs"].pop("groups"), "conv2d needs attrs"),
    (lambda n: n.update(op="fft2"), "unknown op 'fft2'"),
])
def test_validation_names_node_and_problem(exported, tmp_path, edit, match):
    manifest, tensors = read_model(exported)
    edit(next(n for n in manifest["graph"] if n["name"] == "stem"))
    with pytest.raises(LowbitError, match=match):
        Graph.load(write_model(tmp_path / "bad.lowbit", manifest, tensors))


def test_every_op_has_a_schema_and_shape_rule():
    assert {"conv2d", "linear", "add", "concat", "dequantize_output"} <= set(OPS)
    assert all(spec.shape is not None for spec in OPS.values())


@pytest.mark.parametrize("backend, ops", [("reference", None), ("onnx", None), ("cpu_fast", IMAGE_OPS),
                                          ("cpu_fast_encoder", TOKEN_OPS)])
def test_backends_that_claim_every_op_have_a_kernel_for_each(backend, ops):
    import lowbit.export.onnx_export  # noqa: F401  (registers the onnx kernels)
    import lowbit.runtime  # noqa: F401  (registers reference, cpu_fast, cpu_fast_encoder and gpu kernels)

    assert missing_kernels(backend, ops) == []


def test_gpu_runs_layers_and_falls_back_to_reference_for_the_rest():
    assert set(kernels("gpu")) == {"quantize_input", "conv2d", "conv2d_add", "linear", "dequantize_output"}
    assert missing_kernels("reference", missing_kernels("gpu")) == []


def test_kernels_are_registered_once_for_known_ops():
    with pytest.raises(LowbitError, match="already has a kernel for op 'conv2d'"):
        kernel("conv2d", backend="reference")(lambda node, p, xs: xs[0])
    with pytest.raises(LowbitError, match="unknown op 'fft2'"):
        kernel("fft2", backend="reference")
    with pytest.raises(LowbitError, match="already registered"):
        register_op("relu", OpSpec(1))


@pytest.fixture
def negate_op():
    """A new op, ``negate`` (x -> -x), registered in the op table with a reference kernel only."""
    register_op("negate", OpSpec(1, shape=lambda node, p, xs: torch.empty_like(xs[0])))
    kernel("negate", backend="reference")(lambda node, p, xs: -xs[0])
    try:
        yield "negate"
    finally:
        for backend in ("reference", "gpu"):
            unregister_kernel("negate", backend)
        unregister_op("negate")


def _with_negate(path):
    """The exported graph with the value the global pool reads negated first."""
    manifest, tensors = read_model(path)
    graph = manifest["graph"]
    i = next(i for i, n in enumerate(graph) if n["op"] == "adaptive_avgpool")
    src = graph[i]["inputs"][0]
    graph.insert(i, {"op": "negate", "name": "neg", "inputs": [src], "outputs": ["neg"], "attrs": {}})
    graph[i + 1]["inputs"] = ["neg"]
    return manifest, tensors


def test_a_new_op_runs_in_every_backend_that_claims_it(exported, negate_op, tmp_path):
    manifest, tensors = _with_negate(exported)
    ref = IntegerModel(copy.deepcopy(manifest), tensors)
    base = IntegerModel.load(exported)
    x = _pixels(4, seed=5)
    trace, base_trace = ref.run_trace(x), base.run_trace(x)
    assert torch.equal(trace["neg"], -base_trace[ref.graph.node("neg").inputs[0]])
    # a backend without a kernel for it: the GPU path and the fast path fall back to the reference kernel ...
    gpu = GpuModel(ref, emulate=True)
    assert torch.equal(gpu.run_int(x).cpu(), ref.run_int(x))
    if available():
        fast = FastModel(ref)
        assert fast.fallbacks == ["neg"]
        assert (fast.run_int(x) - ref.run_int(x)).abs().max() <= 1
    # ... and ONNX, which cannot, refuses the model naming the op
    with pytest.raises(LowbitError, match="onnx backend has no kernel for op.s. negate"):
        export_onnx(ref, tmp_path / "m.onnx")
    # registering a gpu kernel makes the GPU path run its own
    calls = []
    kernel("negate", backend="gpu")(lambda gm, node, xs: calls.append(node.name) or -xs[0])
    assert torch.equal(GpuModel(ref, emulate=True).run_int(x).cpu(), ref.run_int(x)) and calls == ["neg"]


def test_an_op_without_a_reference_kernel_is_refused_at_load(exported):
    manifest, tensors = _with_negate(exported)
    register_op("negate", OpSpec(1, shape=lambda node, p, xs: torch.empty_like(xs[0])))
    try:
        with pytest.raises(LowbitError, match="reference backend has no kernel for op.s. negate"):
            IntegerModel(manifest, tensors)
    finally:
        unregister_op("negate")
