"""``lowbit demo``: the main job on the embedded default, stage by stage.

Each stage writes its own run directory under ``<out>/``; a stage whose ``summary.json`` says it is complete
is kept and skipped on a rerun, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.data import get_data
from lowbit.frontier import FrontierConfig, frontier
from lowbit.io import load_json, save_json
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, train


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
         seed: int = 0, fast: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    out = Path(out)
    splits = get_data(data, data_dir)
    rows: list[dict[str, Any]] = []

    fp_dir = out / "fp32"
    fp_cfg = TrainConfig(model="resnet8", data=data, data_dir=data_dir, out=str(fp_dir),
                         fit=FitConfig(epochs=2 if fast else 10, seed=seed, device=device, quiet=quiet))
    s = _stage(fp_dir, lambda **kw: train(fp_cfg, data=splits, **kw), overwrite)
    rows.append({"stage": "fp32", "bits": "fp32", "epochs": s["epochs"], "val_acc": s["val_acc"],
                 "test_acc": s["test_acc"], "seconds": s["train_seconds"]})

    for name, bits, epochs in (("w8a8", "w8a8", 1), ("w4a4", "w4a4", 1 if fast else 3)):
        q_dir = out / name
        q_cfg = QuantizeConfig(source=str(fp_dir), out=str(q_dir), bits=bits, recipe="lsq", data=data,
                               data_dir=data_dir)
        over = {"epochs": epochs, "seed": seed, "device": device, "quiet": quiet}
        s = _stage(q_dir, lambda q_cfg=q_cfg, over=over, **kw: quantize_run(q_cfg, data=splits,
                                                                            fit_overrides=over, **kw), overwrite)
        rows.append({"stage": name, "bits": bits, "epochs": s["epochs"], "val_acc": s["val_acc"],
                     "test_acc": s["test_acc"], "seconds": s["train_seconds"]})

    summary = {"stages": rows}
    fr_dir = out / "frontier"
    fr_cfg = FrontierConfig(methods=("eagl", "alps", "random"), budgets=(0.25, 0.5, 1.0),
                            epochs=0.1 if fast else 0.5, seed=seed, device=device, quiet=quiet,
                            options={"alps": {"epochs": 0.05 if fast else 0.25}})
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

    summary["deploy"] = deploy_best(out, fp_dir, fr, splits, seed=seed, device=device, fast=fast, quiet=quiet,
                                    overwrite=overwrite)
    save_json(out / "summary.json", summary)
    return summary


def deploy_best(out: Path, fp_dir: Path, fr: dict[str, Any], splits, *, seed: int, device: str, fast: bool,
                quiet: bool, overwrite: bool) -> dict[str, Any]:
    """Fine-tune the best mixed plan of the frontier (by validation accuracy), export it, check it, time it."""
    from lowbit.export.exporter import export_run
    from lowbit.export.simulate import Simulation
    from lowbit.export.verify import format_report, verify
    from lowbit.quant import Plan
    from lowbit.runtime.bench import benchmark, format_table
    from lowbit.runtime.engine import IntegerModel
    from lowbit.runtime.fastpath import FastModel, available

    mixed = [p for p in fr["points"] if p["relative_throughput"] > 1.0 + 1e-9]
    best = max(mixed, key=lambda p: (p["val_acc"], p["relative_throughput"]))
    plan_file = out / "best-plan.yaml"
    Plan.from_dict({"layers": best["plan"]}).save(plan_file)
    run = out / "best"
    cfg = QuantizeConfig(source=str(fp_dir), out=str(run), bits=None, plan_file=str(plan_file), recipe="lsq",
                         data=splits.name)
    over = {"epochs": 0.2 if fast else 1, "seed": seed, "device": device, "quiet": quiet}
    s = _stage(run, lambda **kw: quantize_run(cfg, data=splits, fit_overrides=over, **kw), overwrite)
    result = export_run(run, out / "best.lowbit")
    runtime = IntegerModel.load(result.path)
    n = 1000 if fast else len(splits.test)
    report = verify(runtime, splits.test.images[:n], splits.test.labels[:n], simulation=Simulation(result.lowered),
                    fake_quant=result.lowered.model, fast=FastModel(runtime) if available() else None)
    speed = benchmark(result.path, [64], runs=10 if fast else 30, budget_s=30 if fast else 90, onnx=False)
    print(f"[demo] best mixed plan: {best['method']} at budget {best['budget']} "
          f"(relative throughput {best['relative_throughput']:.2f}), fine-tuned: test {100 * s['test_acc']:.2f}%")
    print(result.summary())
    print(format_report(report))
    print(format_table(speed))
    return {"plan": str(plan_file), "run": str(run), "file": str(result.path), "file_bytes": result.file_bytes,
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
