"""A quantized residual stream (``QuantConfig.residual_bits``): a :class:`QuantAct` after every residual add.

LSQ quantizes each layer's *inputs*; the sum ``branch + shortcut`` of a residual block is an input too, but only
the next conv rounds it, so an integer backend must carry the stream between blocks as wide int32 values (PyTorch's
own int8 models keep it as 8-bit codes). :func:`quantize_residuals` traces the model with ``torch.fx`` and
fake-quantizes the output of every residual join, so QAT trains with it and the exporter finds narrow codes.

What counts as a residual join is decided from the graph alone (no example input: calibration batches come
later). An add (``a + b``, ``a += b``, ``torch.add``, ``.add``/``.add_``) is a join when both operands are
*activations*: values computed from the model's input by tensor operations. The criterion is static and exact
for what it must exclude: sizes (``x.size(0) + 1``, ``x.shape[2] * 2``: ``size``/``shape``/``dim``/``numel``
give Python numbers, and arithmetic on numbers stays numbers), constants (not graph values at all) and
parameters or buffers (``x + self.pos_embedding``: no dependence on the input). Tensors that take only the
*shape* of an activation (``zeros_like``, ``new_zeros``, ``expand_as`` of a parameter) are not activations either.

The QuantAct reads the add's result, or, when the only reader of the sum is a ReLU/ReLU6/hardtanh/clamp, that
op's result, so a post-activation block (``relu(out + identity)``) gets unsigned codes. In-place ops are
followed: ``out.add_(identity); return self.relu(out)`` quantizes after the ReLU too.

The stream *into* a join is codes too: where an operand is a *branch* (a conv/linear, or a batch norm after one,
read by nothing but the add; of several, the one with the most weights), every other operand that is not a
QuantAct's codes already gets a QuantAct of its own (``shortcut_quant``: the first block's input after the stem,
a downsample conv's output), read by all of that value's readers. The sum is then ``branch + codes``, which an
integer backend computes in the branch's kernel with one rounding (oneDNN's sum post-op), as PyTorch's own int8
models do; the branch itself is never rounded before the add.

A conv/linear that reads nothing but a QuantAct's codes, at the QuantAct's bits, takes the QuantAct's quantizer
(``QuantConfig.share_residual_steps``, the default): it reads the codes as they are instead of rounding them again
with a step of its own, so an integer backend feeds the stream to the next int8 kernel without a requantization,
as PyTorch's int8 models do. Calibration gives both steps the same value anyway (the layer sees the QuantAct's
input); QAT then learns one.
"""

from __future__ import annotations

import operator
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import LowbitError, first_line
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QuantAct, QuantConv2d, QuantLinear, QuantMatmul
from lowbit.quant.plan import is_transformer
from lowbit.quant.quantizers import check_bits

RESIDUAL_NAME = "residual_quant"  # the inserted module's name under the module whose forward does the add
SHORTCUT_NAME = "shortcut_quant"  # the QuantAct on a join's non-branch operand
_LEAVES = (QuantConv2d, QuantLinear, QuantMatmul, QuantAct)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# Methods and attributes that give Python numbers or shape-only tensors, never activation values.
_SIZE_METHODS = frozenset(
    "size dim ndimension numel nelement item tolist stride element_size is_contiguous get_device data_ptr".split()
    + ["__len__"]
)
_TENSOR_ATTRS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
# Ops after an add whose output the QuantAct reads instead (their first argument is the sum).
_CLAMP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_CLAMP_FUNCTIONS = (
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    torch.clamp,
    torch.clamp_,
    torch.clamp_min,
    torch.clamp_min_,
    torch.clip,
)
_CLAMP_METHODS = frozenset({"relu", "relu_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"})


class ResidualTracer(fx.Tracer):
    """Keeps lowbit's quantized modules and torch.nn's own modules as single calls (module level, so a
    GraphModule that records it pickles)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


def _shared(m: nn.Module) -> bool:
    """Modules the traced graph calls as a whole (ResidualTracer's leaves): the new model holds these very objects."""
    torch_nn = m.__module__.startswith(("torch.nn", "torch.ao.nn"))
    return isinstance(m, _LEAVES) or (torch_nn and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


def _clone_tree(model: nn.Module, training: bool | None = None) -> nn.Module:
    """``model`` with every module the tracer walks through (containers, blocks) shallow-copied and the called
    modules (layers, norms, ReLUs) shared: QuantActs registered in the copy leave ``model`` as it was, while the
    names, module types and parameters stay the same. ``training`` overrides the copies' mode (tracing only)."""
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in memo:  # a block reachable by two paths stays one object
            return memo[id(m)]
        c = memo[id(m)] = _shallow_copy(m)
        if training is not None:
            c.training = training
        for name, child in m._modules.items():
            c._modules[name] = child if child is None or _shared(child) else clone(child)
        return c

    return clone(model)


def _shallow_copy(m: nn.Module) -> nn.Module:
    """A new module object of ``m``'s class holding ``m``'s parameters, buffers and children in dicts of its own.
    Not copy.copy, nor a GraphModule's __new__: those would share the dicts, or make a new class."""
    c = object.__new__(type(m))
    c.__dict__.update(m.__dict__)
    c._parameters = type(m._parameters)(m._parameters)
    c._buffers = type(m._buffers)(m._buffers)
    c._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    c._modules = type(m._modules)(m._modules)
    return c


def _trace(model: nn.Module) -> tuple[nn.Module, fx.Graph]:
    """The copy of ``model`` to build the GraphModule from and its graph; refuses forwards fx cannot follow or
    that branch on ``self.training`` (the graph would keep one branch for training and evaluation alike)."""
    graphs = []
    for training in (None, not model.training):
        root = _clone_tree(model, training)
        try:
            graphs.append((root, ResidualTracer().trace(root)))
        except Exception as e:  # fx raises many types (TraceError, TypeError, ...) on data-dependent control flow
            raise LowbitError(
                f"residual_bits needs a forward that torch.fx can trace; {type(model).__name__}'s "
                f"cannot be: {first_line(e)}"
            ) from None
    (root, graph), (_, other) = graphs
    for n in [*graph.nodes, *other.nodes]:
        n.type = None  # annotations kept as strings (``from __future__ import annotations``) break pickling
    if graph.python_code("self").src != other.python_code("self").src:
        raise LowbitError(
            f"residual_bits: the forward of {type(model).__name__} changes with self.training "
            "(e.g. F.dropout(x, training=self.training)) and a traced graph keeps only one mode; "
            "use modules such as nn.Dropout instead"
        )
    return root, graph


def _is_activation(n: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``n`` holds a tensor computed from the model's input (see the module docstring)."""
    if n in memo:
        return memo[n]
    if n.op == "placeholder":
        out = True
    elif n.op in ("get_attr", "output"):
        out = False
    elif n.op == "call_method" and (n.target in _SIZE_METHODS or n.target.startswith("new_")):
        out = False
    elif n.op == "call_method" and n.target.endswith("_as"):  # expand_as, view_as, type_as: the receiver's values
        out = isinstance(n.args[0], fx.Node) and _is_activation(n.args[0], memo)
    elif n.op == "call_function" and n.target is getattr:
        out = n.args[1] in _TENSOR_ATTRS and isinstance(n.args[0], fx.Node) and _is_activation(n.args[0], memo)
    elif n.op == "call_function" and (n.target is len or getattr(n.target, "__name__", "").endswith("_like")):
        out = False
    else:
        out = any(_is_activation(a, memo) for a in n.all_input_nodes)
    memo[n] = out
    return out


def _add_operands(n: fx.Node) -> tuple | None:
    if n.op == "call_function" and n.target in _ADD_FUNCTIONS:
        return (n.args[0] if n.args else n.kwargs.get("input"), n.args[1] if len(n.args) > 1 else n.kwargs.get("other"))
    if n.op == "call_method" and n.target in _ADD_METHODS:
        return n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    return None


def _written(n: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The node whose tensor ``n`` overwrites in place (its later readers read ``n``'s result), or None."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.op == "call_method":
        inplace = n.target.endswith("_") and not n.target.startswith("__")
    elif n.op == "call_function":
        inplace = (
            n.kwargs.get("inplace") is True
            or n.target is operator.iadd
            or getattr(n.target, "__name__", "").endswith("_")
        )
    elif n.op == "call_module":
        inplace = getattr(modules.get(n.target), "inplace", False) is True
    else:
        inplace = False
    return n.args[0] if inplace else None


def _aliases(n: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """``n`` and the nodes whose tensor it wrote in place: later readers of any of them read ``n``'s value."""
    out = set()
    while n is not None and n not in out:
        out.add(n)
        n = _written(n, modules)
    return out


def _readers(n: fx.Node, aliases: set[fx.Node]) -> list[fx.Node]:
    order = {m: i for i, m in enumerate(n.graph.nodes)}
    return sorted({u for a in aliases for u in a.users if order[u] > order[n]}, key=order.__getitem__)


def _is_clamp(n: fx.Node, value: set[fx.Node], modules: dict[str, nn.Module]) -> bool:
    """A ReLU/ReLU6/hardtanh/clamp whose input is ``value``."""
    if not n.args or n.args[0] not in value:
        return False
    if n.op == "call_module":
        return isinstance(modules.get(n.target), _CLAMP_MODULES)
    if n.op == "call_function":
        return n.target in _CLAMP_FUNCTIONS
    return n.op == "call_method" and n.target in _CLAMP_METHODS


def _owner(n: fx.Node, modules: dict[str, nn.Module], recorded: bool) -> str:
    """The qualified name of the module whose forward made ``n`` ("" for the model's own forward).

    fx records the stack of modules being traced through (``nn_module_stack``; none at the model's own level). A
    torch that ``recorded`` none at all gets the deepest module holding the layers that made the operands."""
    stack = n.meta.get("nn_module_stack")
    if stack:
        key, value = list(stack.items())[-1]
        path = value[0] if isinstance(value, tuple) and isinstance(value[0], str) else re.sub(r"@\d+$", "", key)
        return path if path in modules else ""
    if recorded:
        return ""
    parents = []
    for a in n.all_input_nodes:
        while a.op != "call_module" and a.all_input_nodes:
            a = a.all_input_nodes[0]
        if a.op == "call_module":
            parents.append(a.target.split(".")[:-1])
    common = []
    for parts in zip(*parents) if parents else ():
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _layer_behind(a: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """``a``, or the node a batch norm ``a`` reads."""
    if a.op == "call_module" and isinstance(modules.get(a.target), nn.modules.batchnorm._BatchNorm):
        return a.args[0] if a.args and isinstance(a.args[0], fx.Node) else a
    return a


def _is_branch(a: fx.Node, value: set[fx.Node], modules: dict[str, nn.Module]) -> bool:
    """A conv/linear's output (or a batch norm's after one) that only the add reads (``value``: the add's aliases).
    QuantConv2d/QuantLinear are Conv2d/Linear, and a float model (``lowbit plan``) finds the same joins."""
    node = _layer_behind(a, modules)
    if not (node.op == "call_module" and isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear))):
        return False
    return all(u in value for u in a.users) and (node is a or list(node.users) == [a])


def _branch_size(a: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Weights of the conv/linear behind a branch."""
    return modules[_layer_behind(a, modules).target].weight.numel()


def _is_codes(a: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return a.op == "call_module" and isinstance(modules.get(a.target), QuantAct)


def _graph_module(model: nn.Module, root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule with ``root``'s module tree as it is (fx would keep only the called modules, under plain
    ``nn.Module`` parents), so names, types, the state dict and unused layers stay those of ``model``."""
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    for name in list(gm._modules):
        del gm._modules[name]
    for name, child in root._modules.items():
        gm._modules[name] = child
    for name, p in root._parameters.items():
        gm.register_parameter(name, p)
    for name, b in list(gm._buffers.items()):  # plain tensor attributes (traced constants) are not state
        if name not in root._buffers:
            gm.register_buffer(name, b, persistent=False)
    for name, b in root._buffers.items():
        gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
    for key, value in vars(model).items():  # plain settings such as num_classes
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
    if getattr(model, "prefers_channels_last", False):  # a class attribute of lowbit's ResNets (fit reads it)
        gm.prefers_channels_last = True
    return gm


def quantize_residuals(model: nn.Module, bits: int, config: QuantConfig | None = None) -> fx.GraphModule:
    """The traced ``model`` with a ``QuantAct(bits, config)`` after every residual add and on the shortcut operand
    of every add into a conv branch (module docstring).

    Each QuantAct is named ``residual_quant`` (``shortcut_quant``) under the module whose forward does the add
    (``layer1.0.residual_quant``; ``residual_quant_1``, ``_2`` for further adds of that module), so that
    :func:`lowbit.quant.build_quantized` rebuilds the same names from a fresh model. The result keeps
    ``model``'s modules, names and state dict (plus the QuantActs); ``model`` itself is not changed, only its
    forward is replaced, so use the returned model. Its quantizers are uninitialised:
    :func:`lowbit.quant.calibrate_` initialises them. Adds already followed by a QuantAct are left alone.

    Raises one-line :class:`LowbitError` for a transformer, a forward that fx cannot trace (data-dependent
    control flow) or that depends on ``self.training``, and a model without any residual add.
    """
    bits = check_bits(bits)
    config = config or QuantConfig()
    name = type(model).__name__
    if is_transformer(model):
        raise LowbitError(
            f"residual_bits is not supported for transformers ({name} has attention blocks) yet; "
            "leave residual_bits unset"
        )
    root, graph = _trace(model)
    gm = _graph_module(model, root, graph)
    modules = dict(gm.named_modules())
    memo: dict[fx.Node, bool] = {}
    joins = [
        n
        for n in graph.nodes
        if (ops := _add_operands(n)) is not None
        and all(isinstance(a, fx.Node) and _is_activation(a, memo) for a in ops)
    ]
    if not joins:
        raise LowbitError(
            f"residual_bits: {name} has no residual add (tensor + tensor) to quantize; leave residual_bits unset"
        )
    recorded = any("nn_module_stack" in n.meta for n in graph.nodes)
    owners = {add: _owner(add, modules, recorded) for add in joins}  # before any operand is rewritten
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    counts: dict[str, int] = {}

    def insert(after: fx.Node, owner: str, base: str, readers: list[fx.Node], value: set[fx.Node], like: fx.Node):
        """A QuantAct named ``<owner>.<base>[_k]`` reading ``after``, read by ``readers`` instead of ``value``."""
        parent = gm.get_submodule(owner)
        k = counts.get((owner, base), 0)
        while hasattr(parent, child := base if k == 0 else f"{base}_{k}"):
            k += 1
        counts[(owner, base)] = k + 1
        target = f"{owner}.{child}" if owner else child
        qa = QuantAct(bits, config).train(gm.training)
        if param is not None:
            qa.to(device=param.device, dtype=param.dtype)
        gm.add_submodule(target, qa)
        modules[target] = qa
        with graph.inserting_after(after):
            q = graph.call_module(target, (after,))
        if "nn_module_stack" in like.meta:
            q.meta["nn_module_stack"] = like.meta["nn_module_stack"]
        for r in readers:
            for v in value:
                r.replace_input_with(v, q)

    for add in joins:
        ops, value = _add_operands(add), _aliases(add, modules)
        branches = [a for a in ops if _is_branch(a, value, modules)]
        if branches:  # the largest conv stays unrounded and takes the add into its kernel (a 3x3, not a 1x1)
            kept = max(branches, key=lambda a: _branch_size(a, modules))
            for a in dict.fromkeys(ops):
                if a is not kept and not _is_codes(a, modules):
                    a_value = _aliases(a, modules)
                    insert(a, owners[add], SHORTCUT_NAME, _readers(a, a_value), a_value, add)
        point, value = add, _aliases(add, modules)
        readers = _readers(point, value)
        if len(readers) == 1 and _is_clamp(readers[0], value, modules):
            point = readers[0]
            value = value | _aliases(point, modules)
            readers = _readers(point, value)
        if (
            len(readers) == 1
            and readers[0].op == "call_module"
            and isinstance(modules.get(readers[0].target), QuantAct)
        ):
            continue  # quantized already
        insert(point, owners[add], RESIDUAL_NAME, readers, value, add)
    if config.share_residual_steps:
        _share_steps(gm, graph, modules)
    graph.lint()
    gm.recompile()
    return gm


def _share_steps(gm: fx.GraphModule, graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """A conv/linear called once, on nothing but a QuantAct's output, at the QuantAct's bits and with a quantizer
    of the same kind, reads its codes unrounded (``QuantConfig.share_residual_steps``). The layer is replaced by a
    shallow copy first, so the caller's model keeps a layer that rounds its own input."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for n in graph.nodes:
        act = modules.get(n.target) if n.op == "call_module" else None
        if not isinstance(act, QuantAct):
            continue
        for u in n.users:
            layer = modules.get(u.target) if u.op == "call_module" else None
            if not (isinstance(layer, (QuantConv2d, QuantLinear)) and calls[u.target] == 1 and u.args == (n,)
                    and not u.kwargs and layer.a_bits == act.bits and not layer.shares_input
                    and type(layer.input_quantizer) is type(act.input_quantizer)
                    and layer.input_quantizer.signed == act.input_quantizer.signed):
                continue
            copy = modules[u.target] = _shallow_copy(layer)
            for parent in gm.modules():  # every name of the layer (a module may be registered twice)
                for child, m in parent._modules.items():
                    if m is layer:
                        parent._modules[child] = copy
            copy.share_input_quantizer_(act)


__all__ = ["RESIDUAL_NAME", "SHORTCUT_NAME", "ResidualTracer", "quantize_residuals"]
