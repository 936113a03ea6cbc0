"""Baseline benchmark: what each registry model reaches on Fashion-MNIST within a training-time budget.

Trains every model with the default recipe (SGD Nesterov, cosine, wd 5e-4, batch 128, flip augmentation)
for the epochs given below, which are chosen so that each run fits in ~10 minutes on the 2-core CPU, and
writes docs/results/baseline.{json,md}. Usage: python bench/baseline.py [--models resnet8,mlp] [--reuse DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_results  # noqa: E402
from lowbit.io import load_json, load_yaml  # noqa: E402
from lowbit.train import FitConfig, TrainConfig, train  # noqa: E402

EPOCHS = {"resnet8": 10, "resnet14": 5, "resnet20": 3, "mlp": 20}
TARGET = 0.925  # the test-accuracy target for the default baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(EPOCHS))
    ap.add_argument("--runs", default="runs/bench-baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", default="", help="overrides, e.g. resnet14=3,resnet20=2 (a busy machine)")
    ap.add_argument("--attempts", default="",
                    help="comma-separated `lowbit train` run dirs of recipe variants tried for the target")
    args = ap.parse_args()
    epochs = {**EPOCHS, **{k: float(v) for k, v in (kv.split("=") for kv in args.epochs.split(",") if kv)}}
    rows = []
    for name in args.models.split(","):
        out = Path(args.runs) / name
        summary_file = out / "summary.json"
        if summary_file.exists() and load_json(summary_file).get("complete"):
            s = load_json(summary_file)  # finished earlier: reuse (resumable benchmark)
        else:
            resume = (out / "checkpoint.pt").exists()
            cfg = TrainConfig(model=name, out=str(out), fit=FitConfig(epochs=epochs[name], seed=args.seed))
            s = train(cfg, resume=resume, overwrite=not resume)
        rows.append({"model": name, "epochs": s["epochs"], "parameters": s["parameters"],
                     "val_acc": s["val_acc"], "test_acc": s["test_acc"], "train_seconds": s["train_seconds"]})
        print(rows[-1])
    m = machine()
    md = ["# Fashion-MNIST fp32 baselines", "",
          "Default recipe (`lowbit train`): SGD with Nesterov momentum 0.9, lr 0.1, cosine decay, weight decay "
          "5e-4 on weights, batch 128, horizontal-flip augmentation, channels-last. Validation = the "
          "fixed 5,000-image split of the training set; test = the 10,000 test images (reporting only). "
          "Epochs are chosen so each run trains in about 10 minutes or less on this machine.", "",
          f"Machine: {machine_line(m)}.", "",
          "| model | parameters | epochs | val acc | test acc | training time (s) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['parameters']:,} | {r['epochs']} | {100 * r['val_acc']:.2f}% | "
           f"{100 * r['test_acc']:.2f}% | {r['train_seconds']:.0f} |" for r in rows]
    md += ["", "Training times are wall-clock seconds of the training loop. The machine is a shared 2-core VM: runs "
           "made while other jobs ran are slower than on an idle machine (on an idle machine resnet8 trains at "
           "about 53 s per epoch with 2 threads, i.e. 10 epochs in about 9 minutes).", "",
           "Reproduce: `python bench/baseline.py` (resumable: finished models are reused).", ""]
    if args.epochs:
        md[-1:-1] = [f"Epochs overridden for this table: `{args.epochs}` (defaults {EPOCHS}): those runs shared "
                     "the 2-core machine with other benchmarks, at 1 thread, so their epochs were cut to fit; "
                     "their accuracy is what that many epochs reach, not the model's best.", ""]
    attempts = [_attempt(Path(d)) for d in args.attempts.split(",") if d and (Path(d) / "summary.json").exists()]
    # The best run is chosen on validation accuracy; its test accuracy is what the target is measured on.
    candidates = [r for r in rows + attempts if (r.get("model") or "resnet8") == "resnet8"]
    best = max(candidates, key=lambda r: r["val_acc"], default=None)
    if best is None:
        verdict = "Best resnet8 run: n/a: target missed."
    else:
        name = best.get("run", f"default recipe, {best['epochs']} epochs")
        verdict = (f"Best resnet8 run, chosen on validation: {name} (val {100 * best['val_acc']:.2f}%), "
                   f"{100 * best['test_acc']:.2f}% test accuracy: target "
                   f"{'met' if best['test_acc'] >= TARGET else 'missed'}. Test accuracy is only reported.")
    md += ["## Target: 92.5% test accuracy within 10 minutes of training", "", verdict, ""]
    if attempts:
        md += ["Recipe variants tried (resnet8, same split and seed; times include other jobs on the machine):", "",
               "| run | epochs | augmentation | label smoothing | val acc | test acc | training time (s) |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {a['run']} | {a['epochs']} | {a['augmentation']} | {a['label_smoothing']} | "
               f"{100 * a['val_acc']:.2f}% | {100 * a['test_acc']:.2f}% | {a['train_seconds']:.0f} |" for a in attempts]
        md += [""]
    write_results("baseline", {"machine": m, "rows": rows, "epochs": epochs, "attempts": attempts, "target": TARGET},
                  "\n".join(md))


def _attempt(run: Path) -> dict:
    s, cfg = load_json(run / "summary.json"), load_yaml(run / "config.yaml")
    fit = cfg.get("fit", {})
    return {"run": run.name, "model": cfg.get("model"), "epochs": s["epochs"],
            "augmentation": fit.get("augmentation", "crop+flip"), "label_smoothing": fit.get("label_smoothing", 0.0),
            "val_acc": s["val_acc"], "test_acc": s["test_acc"], "train_seconds": s["train_seconds"]}


if __name__ == "__main__":
    main()
