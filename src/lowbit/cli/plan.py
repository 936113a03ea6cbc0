"""``lowbit plan``: which layers a preset (or a plan file, or a run) gives which bits, and why (their role).

Same pattern as :mod:`lowbit.cli.main`: the factory returns ``(add(parser), run(args))``; :data:`COMMANDS` is
merged into the CLI's subcommands.

    lowbit plan --show --model examples/tiny_bert.py:make_model --bits w4a8
    lowbit plan --show --from runs/bert-w4a4            # the plan a quantized run was trained with
    lowbit plan --model resnet8 --bits w4a4 --out plan.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from lowbit.cli.main import add_data
from lowbit.distributed import is_main

_ROLE_NOTES = {
    "embedding": "float: embeddings are lookups, not GEMMs",
    "body": "the preset's bits",
    "head": "--first-last-bits: pooler/classifier",
    "edge": "--first-last-bits: first/last executed layer",
    "matmul": "both inputs at the block's query input bits",
    "residual": "--residual-bits: the sum after each residual add (and its ReLU), and the shortcut into it",
}


def _shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        return f"Conv2d {module.in_channels}->{module.out_channels} k{k}"
    return type(module).__name__


def _bits(b: int | None) -> str:
    return "float" if b is None else str(b)


def describe_plan(model: nn.Module, plan: Any, roles: dict[str, str], matmuls: dict[str, tuple] | None = None,
                  residuals: dict[str, int] | None = None) -> str:
    """A table of every quantizable layer (role, shape, bits), the attention matmuls and the residual-stream
    quantizers, then counts by role."""
    from lowbit.quant import Plan

    plan = Plan.coerce(plan)
    modules = dict(model.named_modules())
    rows = [(n, roles.get(n, "-"), _shape(modules[n]), *plan.layers.get(n, (None, None))) for n in roles]
    for name, (a, b) in (matmuls or {}).items():
        rows.append((name, "matmul", "attention matmul", a, b))
    for name, bits in (residuals or {}).items():
        rows.append((name, "residual", "shortcut" if "shortcut_quant" in name else "residual add", "-", bits))
    width = max([len("layer"), *(len(r[0]) for r in rows)])
    shape_w = max([len("type"), *(len(r[2]) for r in rows)])
    lines = [f"{'layer':<{width}}  {'role':<9}  {'type':<{shape_w}}  w_bits  a_bits   (matmuls: both inputs)"]
    for name, role, shape, w, a in rows:
        w = w if w == "-" else _bits(w)
        lines.append(f"{name:<{width}}  {role:<9}  {shape:<{shape_w}}  {w:>6}  {_bits(a):>6}")
    lines.append("")
    counts: dict[str, dict[str, int]] = {}
    for _, role, _, w, a in rows:
        key = f"w{_bits(w)}a{_bits(a)}" if (w, a) != (None, None) else "float"
        key = f"inputs {_bits(w)}/{_bits(a)}" if role == "matmul" else key
        key = f"a{a}" if role == "residual" else key
        counts.setdefault(role, {}).setdefault(key, 0)
        counts[role][key] += 1
    for role, by_bits in counts.items():
        note = _ROLE_NOTES.get(role, "")
        spread = ", ".join(f"{k} x{v}" for k, v in by_bits.items())
        lines.append(f"{role:<9}  {spread}" + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def matmul_rows(model: nn.Module, plan: Any) -> dict[str, tuple]:
    """The QuantMatmuls ``QuantConfig(quantize_matmuls=True)`` would add: ``{name: (a_bits, b_bits)}``."""
    from lowbit.quant import Plan, quant_matmuls
    from lowbit.quant.plan import is_attention

    existing = quant_matmuls(model)
    if existing:
        return {n: m.bits for n, m in existing.items()}
    plan = Plan.coerce(plan)
    rows = {}
    for name, m in model.named_modules():
        if is_attention(m):
            bits = plan.layers.get(f"{name}.query", (None, None))[1]
            if bits is not None:
                rows[f"{name}.qk_matmul"] = (bits, bits)
                rows[f"{name}.pv_matmul"] = (bits, bits)
    return rows


def residual_rows(model: nn.Module, bits: int | None) -> dict[str, int]:
    """The residual-stream QuantActs of a quantized model, or those ``QuantConfig(residual_bits=bits)`` would add."""
    from lowbit.quant import QuantConfig, quant_acts, quantize_residuals

    existing = quant_acts(model)
    if existing or bits is None:
        return {n: m.bits for n, m in existing.items()}
    return {n: bits for n in quant_acts(quantize_residuals(model, bits, QuantConfig(residual_bits=bits)))}


def _plan():
    def add(p):
        src = p.add_argument_group("model")
        src.add_argument("--model", default=None,
                         help="registry name, tv:/timm: name, or your factory package.module:function "
                              "(or file.py:function)")
        src.add_argument("--model-args", default=None, metavar="YAML",
                         help="keyword arguments of the model factory, inline YAML/JSON or a file")
        src.add_argument("--from", dest="source", default=None,
                         help="a run directory instead of --model: an fp32 run (the preset is applied to it) or a "
                              "quantized run (its own plan is shown)")
        g = p.add_argument_group("plan")
        g.add_argument("--bits", default="w4a4", help="preset: w8a8, w4a8, w4a4, ... (ignored with --plan)")
        g.add_argument("--plan", dest="plan_file", default=None, help="a plan file to show instead of a preset")
        g.add_argument("--first-last-bits", default="8",
                       help="bits of the first/last layers (CNNs) or the head (transformers); 'float' keeps fp32")
        g.add_argument("--roles", default="auto", choices=["auto", "transformer", "order"],
                       help="how layers get their bits: by role in a transformer (embeddings float, head at "
                            "--first-last-bits, blocks at the preset), by execution order (first/last), or auto")
        g.add_argument("--quantize-matmuls", action="store_true",
                       help="also list the attention matmuls QuantConfig(quantize_matmuls=True) quantizes")
        g.add_argument("--residual-bits", type=int, default=None, choices=[8, 4, 3, 2],
                       help="also list the residual stream `lowbit quantize --residual-bits` quantizes: after each "
                            "add and on each shortcut into one, so integer backends keep it as narrow codes (QAT "
                            "recovers the accuracy it costs)")
        g.add_argument("--show", action="store_true", help="print the table (the default when --out is not given)")
        g.add_argument("--out", default=None, help="write the plan to this .yaml/.json file")
        d = p.add_argument_group("data (optional)")
        add_data(d, default_help="none: layers are ordered by torch.fx; give data to run one example")

    def run(a):
        payload = show_plan(a)
        if is_main() and payload["text"] is not None:
            print(payload["text"])
        return 0

    return add, run


def _first_last(v: str) -> int | None:
    from lowbit.errors import LowbitError

    if str(v).lower() in ("float", "none", "fp32"):
        return None
    try:
        return int(v)
    except ValueError:
        raise LowbitError(f"--first-last-bits: expected a bit width or 'float', got {v!r}") from None


def show_plan(a: argparse.Namespace) -> dict[str, Any]:
    """Resolve the model and plan of ``lowbit plan``'s arguments; return the plan and the table text."""
    from lowbit.errors import LowbitError
    from lowbit.models import create_model
    from lowbit.plugins import parse_args_option
    from lowbit.quant import Plan, layer_roles, plan_of, quant_acts, quant_layers

    if (a.model is None) == (a.source is None):
        raise LowbitError("give a model (--model NAME or package.module:factory) or a run (--from runs/x)")
    example = None
    if a.source is not None:
        from lowbit.train import load_run_model

        model, ckpt = load_run_model(a.source)
    else:
        kwargs = parse_args_option(a.model_args, "--model-args")
        model = create_model(a.model, **kwargs)
    if a.data is not None:
        from lowbit.data import get_data

        example = get_data(a.data, a.data_dir, data_args=parse_args_option(a.data_args, "--data-args")).example(1)
    if a.source is not None and quant_layers(model):
        plan = plan_of(model)
    elif a.plan_file:
        plan = Plan.load(a.plan_file)
        plan.validate(model)
    else:
        plan = Plan.preset(a.bits, model, first_last_bits=_first_last(a.first_last_bits), example_input=example,
                           roles=a.roles)
    roles = layer_roles(model, a.roles, example)
    matmuls = matmul_rows(model, plan) if a.quantize_matmuls or quant_layers(model) else None
    residual_bits = getattr(a, "residual_bits", None)
    residuals = residual_rows(model, residual_bits) if residual_bits is not None or quant_acts(model) else None
    text = describe_plan(model, plan, roles, matmuls, residuals) if a.show or not a.out else None
    if a.out and is_main():
        plan.save(a.out)
        text = (text + "\n" if text else "") + f"-> {a.out}"
    return {"plan": plan, "roles": roles, "residuals": residuals, "text": text}


COMMANDS = {
    "plan": (_plan, "show which bits a preset gives each layer (by role), or write it as a plan file",
             "Apply a preset (--bits) or a plan file to a model (--model, or --from a run) and print every "
             "quantizable layer with its role, shape and bits. Transformers get bits by role: embeddings float, "
             "pooler/classifier at --first-last-bits, every Linear of the blocks (Q, K, V, attention output, FFN) "
             "at the preset; CNNs keep their first and last executed layers at --first-last-bits. --out writes "
             "the plan for `lowbit quantize --plan`."),
}

__all__ = ["COMMANDS", "describe_plan", "matmul_rows", "residual_rows", "show_plan"]
