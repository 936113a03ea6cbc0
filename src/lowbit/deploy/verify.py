"""What exactly agrees with what, measured on a data set.

* **runtime vs simulation**: integer logits must be identical on every image (``bit_exact``).
* **runtime vs fake-quant model** (the model as trained): top-1 agreement and accuracy difference.
* **fast path vs runtime**: fraction of integer logits that differ (0 for the bit-exact fast backend) and the
  largest difference (in logit units and relative to the largest logit), top-1 agreement and accuracy; per
  layer, the fraction of differing output codes on the first batch; the fast path's layer paths.
* **ONNX vs runtime**: top-1 agreement and accuracy.
* **lowering vs fake-quant model** (:func:`~lowbit.deploy.lowering.check_lowering`, independent of the
  export's constants): every layer's input codes and every requantization's fold, on the first
  ``lowering_images`` images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.deploy.lowering import check_lowering, format_lowering
from lowbit.export.simulate import Simulation, normalize_pixels
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import compare


class _Count:
    def __init__(self):
        self.correct = self.agree = self.n = 0

    def add(self, pred: torch.Tensor, ref_pred: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.n += len(pred)
        self.agree += int((pred == ref_pred).sum())
        if labels is not None:
            self.correct += int((pred == labels).sum())

    def result(self, labelled: bool) -> dict[str, Any]:
        out = {"top1_agreement_with_runtime": self.agree / max(1, self.n)}
        if labelled:
            out["accuracy"] = self.correct / max(1, self.n)
        return out


def verify(runtime: IntegerModel, images: torch.Tensor, labels: torch.Tensor | None = None, *,
           simulation: Simulation | None = None, fake_quant: nn.Module | None = None,
           fast: Callable | None = None, onnx: Callable | None = None, batch_size: int = 256,
           progress: Callable[[int, int], None] | None = None, lowering_images: int = 512) -> dict[str, Any]:
    """Run the runtime and each given implementation over ``images`` (what the runtime takes); with
    ``fake_quant``, also the independent lowering check on the first ``lowering_images`` images."""
    labelled = labels is not None
    counts = {k: _Count() for k, v in (("runtime", 1), ("fake_quant", fake_quant), ("fast_path", fast),
                                       ("onnx", onnx)) if v is not None}
    sim_diff_images, sim_max = 0, 0
    fast_diff, fast_max, fast_total, fast_rel = 0, 0, 0, 0.0
    layers = None
    spec = runtime.input_spec
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        y = labels[i:i + batch_size] if labelled else None
        ref = runtime.run_int(x).to(torch.int64)
        ref_pred = ref.argmax(1)
        counts["runtime"].add(ref_pred, ref_pred, y)
        if simulation is not None:
            d = (simulation.run_int(x).to(torch.int64) - ref).abs()
            sim_diff_images += int((d.amax(1) > 0).sum())
            sim_max = max(sim_max, int(d.max()))
        if fake_quant is not None:
            xf = normalize_pixels(x, spec["mean"], spec["std"]) if runtime.pixel_input else x
            with torch.no_grad():
                counts["fake_quant"].add(fake_quant(xf).argmax(1), ref_pred, y)
        if fast is not None:
            got = fast.run_int(x)
            d = (got - ref).abs()
            fast_diff += int((d > 0).sum())
            fast_total += d.numel()
            fast_max = max(fast_max, int(d.max()))
            fast_rel = max(fast_rel, float(d.max()) / max(1.0, float(ref.abs().max())))
            counts["fast_path"].add(got.argmax(1), ref_pred, y)
            if layers is None:
                layers = compare(fast, runtime, x)
        if onnx is not None:
            counts["onnx"].add(onnx(x).argmax(1), ref_pred, y)
        if progress:
            progress(min(i + batch_size, len(images)), len(images))
    out: dict[str, Any] = {"images": len(images), "runtime": counts["runtime"].result(labelled)}
    out["runtime"].pop("top1_agreement_with_runtime")
    if simulation is not None:
        out["simulation"] = {"bit_exact": sim_diff_images == 0, "images_with_differing_logits": sim_diff_images,
                             "max_logit_diff": sim_max}
    for name in ("fake_quant", "fast_path", "onnx"):
        if name in counts:
            out[name] = counts[name].result(labelled)
            if labelled:
                out[name]["accuracy_delta_pt"] = 100 * (out[name]["accuracy"] - out["runtime"]["accuracy"])
    if fake_quant is not None and lowering_images > 0:
        out["lowering"] = check_lowering(runtime, fake_quant, images[:lowering_images], batch_size=batch_size).to_dict()
    if fast is not None:
        narrow = {k: v for k, v in (layers or {}).items() if v["narrow"]}
        out["fast_path"].update(
            logits_differing=fast_diff / max(1, fast_total), max_logit_diff=fast_max,
            max_logit_diff_relative=fast_rel,
            paths=getattr(fast, "paths", {}),
            codes_differing_first_batch={k: v["frac_diff"] for k, v in narrow.items()},
            max_code_diff_first_batch=max((v["max_diff"] for v in narrow.values()), default=0))
    return out


def format_report(r: dict[str, Any]) -> str:
    """A few lines: accuracy of each implementation and the exactness numbers."""
    lines = [f"{r['images']} images"]
    acc = r["runtime"].get("accuracy")
    lines.append("runtime (integer reference)" + (f": accuracy {100 * acc:.2f}%" if acc is not None else ""))
    if "simulation" in r:
        s = r["simulation"]
        lines.append(f"simulation vs runtime: {'bit-exact on every image' if s['bit_exact'] else 'DIFFERENT'} "
                     f"({s['images_with_differing_logits']} images differ, max logit diff {s['max_logit_diff']})")
    for name, label in (("fake_quant", "fake-quant model"), ("fast_path", "fast path"), ("onnx", "onnxruntime")):
        if name in r:
            v = r[name]
            text = f"{label}: top-1 agreement {100 * v['top1_agreement_with_runtime']:.2f}%"
            if "accuracy" in v:
                text += f", accuracy {100 * v['accuracy']:.2f}% ({v['accuracy_delta_pt']:+.2f} pt)"
            if name == "fast_path" and v["logits_differing"] == 0:
                text += ", integer logits bit-exact (0 differ)"
            elif name == "fast_path":
                text += (f", integer logits differing {100 * v['logits_differing']:.2f}% (by at most "
                         f"{v['max_logit_diff_relative']:.1e} of the largest logit), layer codes differing <= "
                         f"{100 * max(v['codes_differing_first_batch'].values(), default=0):.3f}% "
                         f"(max {v['max_code_diff_first_batch']})")
            lines.append(text)
            if name == "fast_path" and v.get("paths"):
                paths = v["paths"]
                fused = sum(p == "int8 fused" for p in paths.values())
                other = {n: p for n, p in paths.items() if p not in ("int8", "int8 fused")}
                lines.append(f"fast path layers: {len(paths) - len(other)}/{len(paths)} conv/linear on oneDNN int8 "
                             f"({fused} requantizing in the kernel, the rest exact int32 accumulators)"
                             + (f"; exact float path for {', '.join(f'{n} [{p}]' for n, p in other.items())}"
                                if other else ""))
    if "lowering" in r:
        lines.append(format_lowering(r["lowering"]))
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------- encoders
def _rows(inputs: dict[str, torch.Tensor], i: int, j: int) -> dict[str, torch.Tensor]:
    return {k: v[i:j] for k, v in inputs.items()}


def verify_encoder(runtime: IntegerModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None, *,
                   simulation: Any = None, lowered: Any = None, fast: Callable | None = None,
                   onnx: Callable | None = None, batch_size: int = 64,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """An exported encoder against its simulation (every integer node, bit for bit), the fake-quant model (top-1
    and the codes each quantized layer receives: :func:`encoder_code_agreement`), the fast path and ONNX."""
    n = len(next(iter(inputs.values())))
    counts = {k: _Count() for k, v in (("runtime", 1), ("fake_quant", lowered), ("fast_path", fast), ("onnx", onnx))
              if v is not None}
    sim_nodes: dict[str, list[int]] = {}
    fast_diff = fast_total = 0
    onnx_rel = 0.0
    codes: dict[str, list[int]] = {}
    for i in range(0, n, batch_size):
        x = _rows(inputs, i, i + batch_size)
        y = labels[i:i + batch_size] if labels is not None else None
        trace = runtime.run_trace(x)
        ref = trace["logits"].to(torch.int64)
        ref_pred = ref.argmax(1)
        counts["runtime"].add(ref_pred, ref_pred, y)
        if simulation is not None:
            for k, v in simulation.run_trace(x).items():
                d = v.to(torch.int64) != trace[k].to(torch.int64)
                acc = sim_nodes.setdefault(k, [0, 0])
                acc[0] += int(d.sum())
                acc[1] += d.numel()
        if lowered is not None:
            agreement, logits = encoder_code_agreement(trace, lowered, x)
            counts["fake_quant"].add(logits.argmax(1), ref_pred, y)
            for k, (diff, total) in agreement.items():
                acc = codes.setdefault(k, [0, 0])
                acc[0] += diff
                acc[1] += total
        if fast is not None:
            got = fast.run_int(x).to(torch.int64)
            fast_diff += int((got != ref).sum())
            fast_total += ref.numel()
            counts["fast_path"].add(got.argmax(1), ref_pred, y)
        if onnx is not None:
            out = onnx(x)
            scale = runtime.output_scale
            onnx_rel = max(onnx_rel, float((out.double() - ref.double() * scale).abs().max())
                           / max(1e-30, float(ref.abs().max()) * scale))
            counts["onnx"].add(out.argmax(1), ref_pred, y)
        if progress:
            progress(min(i + batch_size, n), n)
    labelled = labels is not None
    out: dict[str, Any] = {"images": n, "runtime": counts["runtime"].result(labelled)}
    out["runtime"].pop("top1_agreement_with_runtime")
    if simulation is not None:
        differing = {k: v[0] for k, v in sim_nodes.items() if v[0]}
        out["simulation"] = {"bit_exact": not differing, "integer_nodes": len(sim_nodes),
                             "integer_values": sum(v[1] for v in sim_nodes.values()), "differing_nodes": differing,
                             "images_with_differing_logits": int(sim_nodes.get("logits", [0])[0] > 0),
                             "max_logit_diff": 0 if not differing else None}
    for name in ("fake_quant", "fast_path", "onnx"):
        if name in counts:
            out[name] = counts[name].result(labelled)
            if labelled:
                out[name]["accuracy_delta_pt"] = 100 * (out[name]["accuracy"] - out["runtime"]["accuracy"])
    if fast is not None:
        out["fast_path"].update(logits_differing=fast_diff / max(1, fast_total), paths=getattr(fast, "paths", {}),
                                codes_differing_first_batch={}, max_code_diff_first_batch=0,
                                max_logit_diff_relative=0.0 if fast_diff == 0 else None)
    if onnx is not None:
        out["onnx"]["max_logit_diff_relative"] = onnx_rel
    if lowered is not None:
        out["codes_vs_fake_quant"] = {k: v[0] / max(1, v[1]) for k, v in codes.items()}
    return out


def encoder_code_agreement(trace: dict[str, torch.Tensor], lowered: Any, x: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, tuple[int, int]], torch.Tensor]:
    """The fake-quant model's logits for ``x`` and, per quantized operand (``layer``, or ``matmul.a`` / ``.b``),
    how many of the codes the runtime feeds it differ from those the model's own quantizer makes from its float
    input (eval mode), and how many there are. They differ only where float rounding (the fake-quant model's
    float32 layers against exact integer products) moves a value across a rounding tie."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    names = {}
    for name, step in lowered.program.steps.items():
        qs = [step.module.input_quantizer] if step.kind == "linear" else [step.module.a_quantizer,
                                                                          step.module.b_quantizer]
        for i, q in enumerate(qs):
            key = name if step.kind == "linear" else f"{name}.{'ab'[i]}"
            names[key] = step.inputs[i]
            hooks.append(q.register_forward_hook(
                lambda mod, args, out, key=key: seen.__setitem__(key, mod.codes(args[0]).to(torch.int64))))
    try:
        with torch.no_grad():
            logits = lowered.model(**x)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, codes in seen.items():
        got = trace[names[key]].to(torch.int64)
        out[key] = (int((got != codes).sum()), codes.numel())
    logits = getattr(logits, "logits", logits)
    return out, logits[0] if isinstance(logits, (tuple, list)) else logits


def format_encoder_report(r: dict[str, Any]) -> str:
    """A few lines for :func:`verify_encoder`'s result."""
    lines = [f"{r['images']} sequences"]
    acc = r["runtime"].get("accuracy")
    lines.append("runtime (integer reference)" + (f": accuracy {100 * acc:.2f}%" if acc is not None else ""))
    if "simulation" in r:
        s = r["simulation"]
        lines.append(f"simulation vs runtime: {'bit-exact' if s['bit_exact'] else 'DIFFERENT'} on "
                     f"{s['integer_nodes']} integer nodes ({s['integer_values']} values"
                     + (f"; differing: {s['differing_nodes']}" if s["differing_nodes"] else "") + ")")
    for name, label in (("fake_quant", "fake-quant model"), ("fast_path", "fast path"), ("onnx", "onnxruntime")):
        if name in r:
            v = r[name]
            text = f"{label}: top-1 agreement {100 * v['top1_agreement_with_runtime']:.2f}%"
            if "accuracy" in v:
                text += f", accuracy {100 * v['accuracy']:.2f}% ({v['accuracy_delta_pt']:+.2f} pt)"
            if name == "fast_path":
                text += (", integer logits bit-exact (0 differ)" if v["logits_differing"] == 0 else
                         f", integer logits differing {100 * v['logits_differing']:.2f}%")
            if name == "onnx":
                text += f", max logit difference {v['max_logit_diff_relative']:.1e} of the largest"
            lines.append(text)
    if "codes_vs_fake_quant" in r:
        c = r["codes_vs_fake_quant"]
        worst = max(c.items(), key=lambda kv: kv[1], default=("-", 0.0))
        lines.append(f"codes fed to the {len(c)} quantized operands vs the fake-quant model's quantizers: "
                     f"{100 * sum(c.values()) / max(1, len(c)):.3f}% differ on average, at most "
                     f"{100 * worst[1]:.3f}% ({worst[0]})")
    return "\n".join(lines)
