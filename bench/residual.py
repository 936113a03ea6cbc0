"""What a quantized residual stream costs in accuracy: the same fine-tune with the stream float (today's default,
exported as wide int32 values) and with ``--residual-bits`` (8-bit or narrower codes after every residual add and
on every shortcut into one, as PyTorch's own int8 models carry it, which lets the CPU backend keep it as uint8).

Every run starts from one fp32 checkpoint and is a normal `lowbit quantize` run directory under ``--runs``
(finished runs are reused: the benchmark resumes). Seeds vary the fine-tuning. Rows are compared on the
validation split; test accuracy is reported only. Writes docs/results/residual.{json,md}; the speed of the
exported models is in docs/results/deploy.md.

Usage: python bench/residual.py --fp32-weights src/lowbit/assets/resnet8-fashion-mnist.safetensors \
           --model resnet8 --bits w4a4 --residual-bits none,8 --seeds 0,1 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, write_results  # noqa: E402
from lowbit.data import get_data  # noqa: E402
from lowbit.io import load_json  # noqa: E402
from lowbit.train import FitConfig, QuantizeConfig, TrainConfig, quantize_run, train  # noqa: E402
from mirror import mirror  # noqa: E402


def run_one(fp32: str, out: Path, bits: str, residual: int | None, share: bool, seed: int, epochs: float, data,
            device: str) -> dict:
    if (out / "summary.json").exists() and load_json(out / "summary.json").get("complete"):
        return load_json(out / "summary.json")
    resume = (out / "checkpoint.pt").exists()
    cfg = QuantizeConfig(source=fp32, out=str(out), bits=bits, recipe="lsq", distill=True, residual_bits=residual,
                         share_residual_steps=share)
    return quantize_run(cfg, data=data, resume=resume, overwrite=not resume,
                        fit_overrides={"epochs": epochs, "seed": seed, "device": device})


def compiled_steps(out: Path) -> int:
    """Training steps that ran compiled (``--compile auto`` compiles only when it pays, cache included)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("compiled_steps", 0) for line in lines if line.strip())


def fp32_run(args, data) -> dict:
    """The fp32 run directory (built from ``--fp32-weights`` without training when given)."""
    if args.fp32_weights:
        args.fp32 = str(Path(args.runs) / "fp32")
        if not (Path(args.fp32) / "summary.json").exists():
            w = Path(args.fp32_weights)
            w = w / "weights.safetensors" if w.is_dir() else w
            train(TrainConfig(model=args.model, data=data.name, out=args.fp32, weights=str(w),
                              fit=FitConfig(epochs=0, quiet=True, device=args.device)), data=data, overwrite=True)
    return load_json(Path(args.fp32) / "summary.json")


def _sd(x: list[float]) -> float:
    return statistics.stdev(x) if len(x) > 1 else 0.0


def markdown(args, fp: dict, rows: list[dict]) -> str:
    fp_test, fp_val = 100 * fp["test_acc"], 100 * fp["val_acc"]
    md = [f"# Quantized residual stream: accuracy cost ({fp.get('model', args.model)}, Fashion-MNIST)", "",
          f"From one fp32 checkpoint (val {fp_val:.2f}%, test {fp_test:.2f}%), {args.bits.upper()} with LSQ and "
          f"distillation from the fp32 teacher, {args.epochs:g} epoch(s), first and last layers at 8 bits; the "
          "residual stream either float in the fake-quant model (exported as exact int32 values) or fake-quantized "
          "after every residual add and on every shortcut into one (`--residual-bits`, exported as narrow codes, "
          "each add fused into its branch conv). Mean ± std over the seeds "
          "(fine-tuning data order); Δ is against the float-stream row of the same seeds. Compare on validation; "
          "test is reported only.", "",
          f"Machine: {machine_line(machine())}; wall-clock seconds on a shared 2-core machine.", "",
          "| residual stream | seeds | val acc (%) | Δ val (pt) | test acc (%) | Δ test (pt) | train s / run | "
          "compiled steps / run |",
          "|---|---|---|---|---|---|---|---|"]
    base = rows[0]
    for r in rows:
        val, test = ([100 * a for a in r[k]] for k in ("val_acc", "test_acc"))
        dv = statistics.mean(v - b for v, b in zip(val, (100 * a for a in base["val_acc"])))
        dt = statistics.mean(t - b for t, b in zip(test, (100 * a for a in base["test_acc"])))
        r.update(val_mean=statistics.mean(val), test_mean=statistics.mean(test), delta_val=dv, delta_test=dt)
        md.append(f"| {r['stream']} | {len(val)} | {r['val_mean']:.2f} ± {_sd(val):.2f} | {dv:+.2f} | "
                  f"{r['test_mean']:.2f} ± {_sd(test):.2f} | {dt:+.2f} | {statistics.mean(r['seconds']):.0f} | "
                  f"{statistics.mean(r['compiled']):.0f} |")
    md += ["", "Training time is not a like-for-like comparison: `--compile auto` compiles a structure only when the "
           "steps left repay the compile, and a structure already in the Inductor cache compiles at once, so "
           "the rows differ in how many steps ran compiled (last column), and the machine is shared.", "",
           f"Reproduce: `python bench/residual.py {' '.join(sys.argv[1:])}` (resumable).", ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", default="runs/bench-baseline/resnet8", help="an fp32 run directory")
    ap.add_argument("--fp32-weights", default=None, help="build the fp32 run from these weights instead")
    ap.add_argument("--model", default="resnet8", help="registry model of --fp32-weights")
    ap.add_argument("--runs", default="runs/bench-residual")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--residual-bits", default="none,8", help="comma-separated: none (float stream), bits (layers "
                    "reading the stream at its bits share its step) or bits+'own' (every layer a step of its own)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--state", default=None, help="committed mirror of the resumable state (bench/mirror.py)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args()
    streams = [(None, False) if s == "none" else (int(s.removesuffix("own")), not s.endswith("own"))
               for s in args.residual_bits.split(",")]
    if streams[0][0] is not None:
        streams.insert(0, (None, False))  # the float stream is the reference row
    data = get_data("fashion-mnist")
    if args.state:
        mirror(Path(args.runs), Path(args.state))
    fp = fp32_run(args, data)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for residual, share in streams:
        tag = "float" if residual is None else f"r{residual}" + ("s" if share else "")  # r<bits>: own steps
        res = [run_one(args.fp32, Path(args.runs) / f"{args.bits}-{tag}-s{seed}", args.bits, residual, share, seed,
                       args.epochs, data, args.device) for seed in seeds]
        label = "float (int32 in the export)" if residual is None else \
            f"{residual}-bit codes, " + ("readers at its bits share its step" if share else "every layer its own step")
        rows.append({"stream": label, "residual_bits": residual, "share_residual_steps": share,
                     "val_acc": [r["val_acc"] for r in res],
                     "test_acc": [r["test_acc"] for r in res], "seconds": [r["train_seconds"] for r in res],
                     "compiled": [compiled_steps(Path(args.runs) / f"{args.bits}-{tag}-s{seed}") for seed in seeds]})
        print(rows[-1], flush=True)
    md = markdown(args, fp, rows)
    write_results("residual", {"machine": machine(), "args": vars(args), "fp32": fp, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
