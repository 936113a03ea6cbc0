"""``lowbit demo``: the main job on the embedded default, stage by stage.

The user's job starts from a trained network, so on Fashion-MNIST the demo starts from the fp32 resnet8 that
``lowbit train`` produced and lowbit ships (``lowbit/assets/resnet8-fashion-mnist.*``: weights, the command and
the metrics that reproduce it); ``train_fp32=True`` (``--train-fp32``) trains it here instead (10 epochs).
Each stage writes its own run directory under ``<out>/``; a stage whose ``summary.json`` says it is complete
is kept and skipped on a rerun, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.data import get_data
from lowbit.frontier import FrontierConfig, frontier
from lowbit.io import load_json, save_json
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, recipe_fit_config, train

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_FP32 = ASSETS / "resnet8-fashion-mnist.safetensors"


def _done(run: Path) -> dict[str, Any] | None:
    p = run / "summary.json"
    if p.exists():
        s = load_json(p)
        if s.get("complete"):
            return s
    return None


def _stage(run: Path, fn, overwrite: bool) -> dict[str, Any]:
    if not overwrite and (s := _done(run)):
        print(f"[demo] {run.name}: done already (val {100 * s['val_acc']:.2f}%), kept")
        return s
    resume = (run / "checkpoint.pt").exists() and not overwrite
    return fn(resume=resume, overwrite=overwrite or not resume)


def demo(out: str | Path = "runs/demo", *, data: str = "fashion-mnist", data_dir=None, device: str = "cpu",
         seed: int = 0, fast: bool = False, quiet: bool = False, overwrite: bool = False,
         train_fp32: bool = False) -> dict[str, Any]:
    out = Path(out)
    splits = get_data(data, data_dir)
    rows: list[dict[str, Any]] = []

    fp_dir = out / "fp32"
    shipped = data in ("fashion-mnist", "fmnist") and not train_fp32 and SHIPPED_FP32.exists()
    fp_fit = FitConfig(epochs=0 if shipped else 2 if fast else 10, seed=seed, device=device, quiet=quiet)
    fp_cfg = TrainConfig(model="resnet8", data=data, data_dir=data_dir, out=str(fp_dir), fit=fp_fit,
                         weights=str(SHIPPED_FP32) if shipped else None)
    s = _stage(fp_dir, lambda **kw: train(fp_cfg, data=splits, **kw), overwrite)
    rows.append({"stage": "fp32" + (" (shipped)" if shipped else ""), "bits": "fp32",
                 "epochs": 10 if shipped else s["epochs"], "val_acc": s["val_acc"], "test_acc": s["test_acc"],
                 "seconds": s["train_seconds"]})

    # W8A8 needs no fine-tuning to stay at fp32 accuracy (min/max calibration); W4A4 is LSQ+KD from fp32
    stages = (("w8a8", "w8a8", 0, "minmax", False), ("w4a4", "w4a4", 0.25 if fast else 2, None, True))
    for name, bits, epochs, method, distill in stages:
        q_dir = out / name
        q_cfg = QuantizeConfig(source=str(fp_dir), out=str(q_dir), bits=bits, recipe="lsq", method=method,
                               distill=distill, data=data, data_dir=data_dir)
        over = {"epochs": epochs, "seed": seed, "device": device, "quiet": quiet}
        s = _stage(q_dir, lambda q_cfg=q_cfg, over=over, **kw: quantize_run(q_cfg, data=splits,
                                                                            fit_overrides=over, **kw), overwrite)
        rows.append({"stage": name + (" post-training" if epochs == 0 else " LSQ+KD" if distill else ""),
                     "bits": bits, "epochs": s["epochs"], "val_acc": s["val_acc"], "test_acc": s["test_acc"],
                     "seconds": s["train_seconds"]})

    summary = {"stages": rows}
    fr_dir = out / "frontier"
    # short fine-tunes at a low lr with distillation: enough to recover from the drop, too little to move W4A4
    points = recipe_fit_config("lsq", 2, epochs=0.1 if fast else 0.5, lr=0.005, distill=True, seed=seed,
                               device=device, quiet=True)
    fr_cfg = FrontierConfig(methods=("eagl", "alps", "random"), budgets=(0.25, 0.5), fit=points, seed=seed,
                            device=device, quiet=quiet, options={"alps": {"epochs": 0.05 if fast else 0.25}})
    fr_file = fr_dir / "frontier.json"
    if fr_file.exists() and not overwrite and load_json(fr_file).get("complete", True):
        fr = load_json(fr_file)
        print(f"[demo] frontier: done already, kept ({fr_dir}/report.md)")
    else:
        resume = fr_dir.exists() and not overwrite
        fr = frontier(out / "w4a4", fr_dir, fr_cfg, data=splits, resume=resume, overwrite=not resume)
    summary["frontier"] = str(fr_dir / "report.md")
    print(render_table(rows))
    print(render_frontier(fr))
    print(f"[demo] frontier report: {fr_dir / 'report.html'}")

    summary["deploy"] = deploy_best(out, fr_dir, splits, fast=fast)
    save_json(out / "summary.json", summary)
    return summary


def deploy_best(out: Path, fr_dir: Path, splits, *, fast: bool) -> dict[str, Any]:
    """Export the best mixed frontier point (by validation accuracy) as it was measured, check it, time it."""
    from lowbit.deploy.bench import benchmark, format_table
    from lowbit.deploy.verify import format_report, verify
    from lowbit.export.exporter import export_run
    from lowbit.export.simulate import Simulation
    from lowbit.frontier import point_checkpoint
    from lowbit.runtime.engine import IntegerModel
    from lowbit.runtime.fastpath import FastModel, available

    ckpt, best = point_checkpoint(fr_dir, best=True, min_throughput=1.0 + 1e-6)  # a mixed point, not W4A4
    result = export_run(ckpt, out / "best.lowbit")
    runtime = IntegerModel.load(result.path)
    n = 1000 if fast else len(splits.test)
    report = verify(runtime, splits.test.images[:n], splits.test.labels[:n], simulation=Simulation(result.lowered),
                    fake_quant=result.lowered.model, fast=FastModel(runtime) if available() else None)
    speed = benchmark(result.path, [64], runs=10 if fast else 30, budget_s=30 if fast else 90, onnx=False)
    print(f"[demo] best mixed point: {best['label']} (relative throughput {best['relative_throughput']:.2f}), "
          f"as measured on the frontier: val {100 * best['val_acc']:.2f}%, test {100 * best['test_acc']:.2f}%")
    print(result.summary())
    print(format_report(report))
    print(format_table(speed))
    return {"point": best["label"], "checkpoint": str(ckpt), "plan": best["plan"], "val_acc": best["val_acc"],
            "test_acc": best["test_acc"], "file": str(result.path), "file_bytes": result.file_bytes,
            "fp32_bytes": result.fp32_bytes, "verify": report, "bench": speed}


def render_frontier(fr: dict[str, Any]) -> str:
    """The fine-tuned frontier points, best first within each method."""
    lines = ["| method | budget (MAC share at 2 bits) | rel. throughput | val acc | test acc |",
             "|---|---|---|---|---|"]
    for p in sorted(fr.get("points", []), key=lambda p: (p["method"], p.get("budget") or 0)):
        budget = "-" if p.get("budget") is None else f"{p['budget']:g}"
        lines.append(f"| {p['method']} | {budget} | {p['relative_throughput']:.2f} | {100 * p['val_acc']:.2f}% | "
                     f"{100 * p['test_acc']:.2f}% |")
    return "\n".join(lines)


def render_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | bits | epochs | val acc | test acc | train s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['bits']} | {r['epochs']} | {100 * r['val_acc']:.2f}% | "
              f"{100 * r['test_acc']:.2f}% | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)
