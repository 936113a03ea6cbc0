"""The ``lowbit`` command: thin subcommands over the public API.

Options come from a YAML file (``--config``) overridden by command-line flags; the resolved configuration is
saved in the run directory. Any user error prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lowbit.distributed import finish, is_main
from lowbit.errors import LowbitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_common(p: argparse.ArgumentParser, out: str | None = None, data: bool = True,
               folder: bool = False) -> None:
    """The flags every command shares; ``folder`` adds the ones only commands that read images honour."""
    g = p.add_argument_group("common")
    g.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags override it")
    if out is not None:
        g.add_argument("--out", default=out, help="run directory to write")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to compute")
    g.add_argument("--seed", type=int, default=0, help="random seed (init, data order, augmentation)")
    g.add_argument("--workers", type=count, default=0,
                   help="CPU threads for torch (0 = torch's default) or worker processes where a command "
                        "runs several jobs; also the DataLoader's worker processes for imagefolder data")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        add_data(g, default_help="fashion-mnist for train; a run's own data for the later stages")
    if data and folder:
        g.add_argument("--val-fraction", type=float, default=None,
                       help="share of the training images held out for validation; None = the data set's "
                            "(5,000 of 60,000 for Fashion-MNIST, 0.02 for ImageFolder)")
        g.add_argument("--image-size", type=int, default=None,
                       help="ImageFolder crop size in pixels; None = 224 for train, the run's for quantize/eval")


def add_data(g, default_help: str) -> None:
    """``--data`` (a lowbit data set or the user's factory), ``--data-args`` and ``--data-dir``."""
    g.add_argument("--data", default=None,
                   help=f"fashion-mnist, synthetic (a tiny generated set for smoke tests), imagefolder (ImageNet "
                        f"layout under --data-dir, needs torchvision), or your own factory package.module:function "
                        f"(or file.py:function) returning (train, val, test) Datasets/DataLoaders (default: "
                        f"{default_help})")
    g.add_argument("--data-args", default=None, metavar="YAML",
                   help="keyword arguments of your data factory, inline YAML/JSON ('{n: 1000}') or a .yaml file")
    g.add_argument("--data-dir", default=None,
                   help="folder with the four Fashion-MNIST IDX .gz files (default: $LOWBIT_DATA_DIR, "
                        "then /usr/share/datasets/fashion-mnist), or the ImageFolder root (train/, val/)")


def add_loss(p: argparse.ArgumentParser, metric: bool = True) -> None:
    g = p.add_argument_group("your loss and metric")
    g.add_argument("--loss", default=None, metavar="PKG.MOD:FN",
                   help="loss function fn(outputs, batch) -> scalar tensor (default: cross-entropy, or the loss "
                        "the --from run recorded)")
    if metric:
        g.add_argument("--metric", default=None, metavar="NAME",
                       help="validation metric to report per epoch (higher is better): top1, a registered name, or "
                            "package.module:function taking (model, data)")


def add_fit(p: argparse.ArgumentParser, *, epochs, lr, wd, schedule="cosine", batch=128) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=nonneg_float, default=epochs, help="epochs (fractions allowed)")
    g.add_argument("--batch-size", type=positive_int, default=batch)
    g.add_argument("--lr", type=float, default=lr, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=wd, help="on weights only (not BN, biases, steps)")
    g.add_argument("--schedule", default=schedule, choices=["cosine", "onecycle", "exp", "constant"],
                   help="learning-rate schedule (per step; exp decays per epoch)")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--lr-decay", type=float, default=0.936 if schedule else None,
                   help="per-epoch factor of the exp schedule")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--augmentation", default=None, choices=["flip", "crop+flip", "none"],
                   help="training augmentation of lowbit's image sets (random crop with 2-pixel padding, "
                        "horizontal flip); default: the set's own (flip for Fashion-MNIST); never applied to "
                        "your own data")
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training steps (--compile: always, --no-compile: never); default auto: "
                        "a quantized model is compiled when the steps left would repay the compile, measured on "
                        "its first eager steps (LOWBIT_COMPILE=0|1 forces it, also for ALPS)")
    g.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for 4-D inputs (faster convs on CPU); default: on for lowbit's and "
                        "torchvision/timm models, off for your own (whose forward may call x.view)")
    r = p.add_argument_group("run directory")
    r.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def fit_config(a: argparse.Namespace, **over):
    from lowbit.train import FitConfig

    kw = dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
              weight_decay=a.weight_decay, schedule=a.schedule, warmup_epochs=a.warmup_epochs,
              lr_decay=a.lr_decay, label_smoothing=a.label_smoothing, seed=a.seed, device=a.device,
              augmentation=a.augmentation,
              channels_last=a.channels_last, compile="auto" if a.compile is None else a.compile, quiet=a.quiet)
    kw.update(_amp(a))
    kw.update(over)
    return FitConfig(**kw)


def _add_amp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", default=None, choices=["bf16"],
                   help="mixed precision: bfloat16 autocast (FitConfig.amp); None = fp32 throughout")


def _amp(a: argparse.Namespace) -> dict:
    """``{"amp": ...}`` only when asked, so recipe defaults stay in charge otherwise."""
    return {"amp": a.amp} if getattr(a, "amp", None) else {}


def cli_data(a: argparse.Namespace, spec: dict | None = None, default: str = "fashion-mnist"):
    """The data set the flags describe; by default the run's own (``spec``: factory, args, split, image size)."""
    from lowbit.plugins import parse_args_option
    from lowbit.train.checkpoint import run_data

    spec = spec or {"data": default}
    return run_data(spec, a.data, a.data_dir, val_fraction=getattr(a, "val_fraction", None),
                    image_size=getattr(a, "image_size", None), workers=getattr(a, "workers", 0) or None,
                    data_args=parse_args_option(getattr(a, "data_args", None), "--data-args") or None)


def _set_threads(a: argparse.Namespace) -> None:
    if getattr(a, "workers", 0):
        import torch

        torch.set_num_threads(max(1, a.workers))


# --------------------------------------------------------------------------------------------- commands
def _train():
    def add(p):
        p.add_argument("--model", default="resnet8",
                       help="registry name (see `lowbit models`), tv:<torchvision name>, timm:<timm name>, or your "
                            "own factory package.module:function (or file.py:function) returning an nn.Module")
        p.add_argument("--model-args", default=None, metavar="YAML",
                       help="keyword arguments of the model factory, inline YAML/JSON ('{hidden: 64}') or a file")
        p.add_argument("--width", type=float, default=None, help="width multiplier of the ResNets")
        p.add_argument("--weights", default=None, metavar="FILE",
                       help="start from this local .safetensors or torch.save'd state dict instead of random "
                            "init (nothing is downloaded; --epochs 0 just evaluates and saves the run)")
        add_fit(p, epochs=10, lr=0.1, wd=5e-4)
        _add_amp(p)
        add_loss(p)
        add_common(p, out="runs/train", folder=True)

    def run(a):
        from lowbit.plugins import parse_args_option
        from lowbit.train import TrainConfig, train

        _set_threads(a)
        cfg = TrainConfig(model=a.model, width=a.width, data=a.data or "fashion-mnist", data_dir=a.data_dir,
                          out=a.out, fit=fit_config(a), workers=a.workers, weights=a.weights,
                          val_fraction=a.val_fraction, image_size=a.image_size,
                          model_args=parse_args_option(a.model_args, "--model-args") or None,
                          data_args=parse_args_option(a.data_args, "--data-args") or None, loss=a.loss,
                          metric=a.metric)
        s = train(cfg, resume=a.resume, overwrite=a.overwrite)
        if is_main():  # under torchrun one summary line, not one per rank
            print(f"{a.model}: {result_line(s)}  ({s['epochs']} epochs, {s['train_seconds']:.0f} s)  -> {a.out}")
        return 0

    return add, run


def result_line(s: dict) -> str:
    """``val 91.23%  test 90.87%``, or the loss and metric where accuracy does not apply."""
    parts = []
    for split in ("val", "test"):
        if s.get(f"{split}_loss") is None:
            continue
        if s.get(f"{split}_metric") is not None:
            parts.append(f"{split} {s['metric']} {s[f'{split}_metric']:.4f}")
        elif s.get(f"{split}_acc") is not None:
            parts.append(f"{split} {100 * s[f'{split}_acc']:.2f}%")
        else:
            parts.append(f"{split} loss {s[f'{split}_loss']:.4f}")
    return "  ".join(parts)


def _eval():
    def add(p):
        p.add_argument("--from", dest="source", required=True, help="run directory (or checkpoint file)")
        p.add_argument("--batch-size", type=positive_int, default=512)
        add_loss(p)
        add_common(p, folder=True)

    def run(a):
        from lowbit.data import num_examples
        from lowbit.train import evaluate, load_run_model
        from lowbit.train.checkpoint import resolve_loss
        from lowbit.train.loop import check_batch

        _set_threads(a)
        model, ckpt = load_run_model(a.source)
        data = cli_data(a, ckpt.get("spec"))
        _check_shape(ckpt, data)
        loss_fn = resolve_loss(a.loss or ckpt.get("spec", {}).get("loss"))
        model.to(a.device)
        check_batch(model, data, loss_fn, device=a.device, what=f"the model of {a.source}")
        for split in ("val", "test"):
            ds = getattr(data, split)
            if ds is None:
                continue
            loss, acc = evaluate(model, ds, a.batch_size, a.device, quiet=a.quiet, desc=split, loss_fn=loss_fn)
            shown = "" if acc != acc else f"accuracy {100 * acc:.2f}%  "
            line = f"{split:5s} {shown}loss {loss:.4f}"
            if a.metric:
                from lowbit.metrics import measure

                line += f"  {a.metric} {measure(a.metric, model, ds, batch_size=a.batch_size, device=a.device):.4f}"
            print(f"{line}  ({num_examples(ds)} examples)")
        return 0

    return add, run


def _check_shape(ckpt, data) -> None:
    spec = ckpt.get("spec", {})
    shape = spec.get("input_shape")
    if shape and data.input_shape is not None and list(shape) != list(data.input_shape):
        hint = f"; pass the run's data set (--data {spec['data']})" if spec.get("data", data.name) != data.name else ""
        raise LowbitError(f"the model expects inputs {tuple(shape)} but data set {data.name} gives "
                          f"{tuple(data.input_shape)}{hint}")


def _models():
    def add(p):
        pass

    def run(a):
        from lowbit.models import list_models, model_help

        for name in list_models():
            doc = model_help(name) if ":" not in name else "any model of that library, random init"
            print(f"{name:40s} {doc}")
        return 0

    return add, run


def _demo():
    def add(p):
        p.add_argument("--fast", action="store_true", help="a few-minute smoke version (fewer epochs)")
        p.add_argument("--overwrite", action="store_true", help="redo stages that already finished")
        p.add_argument("--train-fp32", action="store_true",
                       help="train the fp32 resnet8 here (10 epochs) instead of starting from the one lowbit ships")
        add_common(p, out="runs/demo")

    def run(a):
        from lowbit.demo import demo

        _set_threads(a)
        demo(a.out, data=a.data or "fashion-mnist", data_dir=a.data_dir, device=a.device, seed=a.seed, fast=a.fast,
             quiet=a.quiet, overwrite=a.overwrite, train_fp32=a.train_fp32)
        return 0

    return add, run


def _quantize():
    def add(p):
        p.add_argument("--from", dest="source", required=True, help="fp32 run directory (from `lowbit train`)")
        p.add_argument("--bits", default="w4a4",
                       help="preset: w8a8, w4a4, w3a3, w2a2, w4a8 … (first/last layers at --first-last-bits)")
        p.add_argument("--plan", dest="plan_file", default=None,
                       help="per-layer plan file (YAML/JSON: layers: {name: [w_bits, a_bits]}) instead of --bits")
        p.add_argument("--recipe", default="lsq", choices=["lsq", "faq"],
                       help="fine-tuning recipe (lr, weight decay, schedule by precision; see README)")
        p.add_argument("--method", default=None, choices=["lsq", "faq", "minmax"],
                       help="quantizer (default: the recipe's; minmax = plain post-training calibrator)")
        p.add_argument("--distill", action="store_true", help="distil from the frozen fp32 teacher (LSQ+KD)")
        p.add_argument("--distill-loss", default=None, choices=["kl", "mse", "cosine"],
                       help="distillation loss: kl on logits (classification, default), mse or cosine on the "
                            "outputs (embeddings, regression)")
        p.add_argument("--per-channel", action="store_true", help="one weight step per output channel")
        p.add_argument("--quantize-matmuls", action="store_true",
                       help="also quantize the two attention matmuls (Q·Kᵀ, softmax·V) of Hugging Face encoders")
        p.add_argument("--activation-init", default=None, choices=["mean", "mse", "percentile"],
                       help="LSQ input steps: the paper's 2·mean|x|/sqrt(Q_P), or outlier-robust MSE / percentile "
                            "(default: the recipe's, MSE when every layer is at 8 bits, else the paper's)")
        p.add_argument("--residual-bits", type=int, default=None, choices=[8, 4, 3, 2],
                       help="also quantize the residual stream: after each add (after its ReLU) and on the shortcut "
                            "into an add of a conv branch, so that integer backends keep it as narrow codes and run "
                            "each add inside its conv's kernel (faster; 4 bits with `export --epilogue-error` the "
                            "fastest); QAT recovers the accuracy. Needs a forward torch.fx can trace")
        p.add_argument("--share-residual-steps", action=argparse.BooleanOptionalAction, default=True,
                       help="with --residual-bits, a layer reading the stream at the stream's bits takes the stream's "
                            "step instead of rounding its codes again, so they feed the next int8 kernel as they are; "
                            "--no-share-residual-steps gives every layer a step of its own")
        p.add_argument("--first-last-bits", type=_bits_or_float, default=8,
                       help="bits of the first and last layers in presets ('float' keeps them fp32)")
        add_fit(p, epochs=None, lr=None, wd=None, schedule=None)
        _add_amp(p)
        add_loss(p)
        add_common(p, out="runs/quantize", folder=True)

    def run(a):
        from lowbit.io import load_checkpoint
        from lowbit.train import QuantizeConfig, checkpoint_path, quantize_run

        _set_threads(a)
        over = dict(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, schedule=a.schedule,
                    batch_size=a.batch_size, momentum=a.momentum, warmup_epochs=a.warmup_epochs,
                    label_smoothing=a.label_smoothing, seed=a.seed, device=a.device,
                    augmentation=a.augmentation, channels_last=a.channels_last, compile=a.compile, quiet=a.quiet,
                    distill_loss=a.distill_loss)
        if a.lr_decay is not None:
            over["lr_decay"] = a.lr_decay
        over.update(_amp(a))
        data = None  # quantize_run reads the run's own data itself; other flags are resolved here
        if a.data or a.data_args or a.val_fraction is not None or a.image_size is not None:
            data = cli_data(a, load_checkpoint(checkpoint_path(a.source)).get("spec"))
        cfg = QuantizeConfig(source=a.source, out=a.out, bits=None if a.plan_file else a.bits,
                             plan_file=a.plan_file, recipe=a.recipe, method=a.method, per_channel=a.per_channel,
                             quantize_matmuls=a.quantize_matmuls, activation_init=a.activation_init,
                             residual_bits=a.residual_bits, share_residual_steps=a.share_residual_steps,
                             first_last_bits=a.first_last_bits, distill=a.distill, data=a.data,
                             data_dir=a.data_dir, loss=a.loss, metric=a.metric)
        s = quantize_run(cfg, resume=a.resume, overwrite=a.overwrite, fit_overrides=over, data=data)
        if is_main():
            method = "" if s.get("method") in (None, s["recipe"].split("+")[0]) else f", {s['method']} quantizers"
            print(f"{s['model']} {s['bits']} ({s['recipe']}{method}): {result_line(s)}  ({s['epochs']} epochs, "
                  f"{s['train_seconds']:.0f} s)  -> {a.out}")
        return 0

    return add, run


def _number(kind: type, low: float, strict: bool):
    """An argparse type for numbers ``> low`` (``strict``) or ``>= low``: a bad size is the usage line and exit
    code 2 before any work, not a ZeroDivisionError or a silently empty result later."""
    word = f"> {kind(low)}" if strict else f">= {kind(low)}"

    def parse(v: str):
        x = kind(v)  # a ValueError reads "invalid int value: 'abc'"
        if x < low or (strict and x == low) or x != x:
            raise argparse.ArgumentTypeError(f"must be {word}, got {v}")
        return x

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True)
count = _number(int, 0, False)
positive_float = _number(float, 0.0, True)
nonneg_float = _number(float, 0.0, False)


def _bits_or_float(v: str):
    if v.lower() in ("float", "none", "fp32"):
        return None
    try:
        return int(v)
    except ValueError:
        from lowbit.quant.bits import SUPPORTED_BITS

        bits = ", ".join(map(str, SUPPORTED_BITS))
        raise argparse.ArgumentTypeError(f"expected {bits} or float, got {v!r}") from None


SUBCOMMANDS = {
    "train": (_train, "train an fp32 model into runs/<name>/",
              "Train a model from scratch with SGD (Nesterov) and a cosine/one-cycle schedule; writes "
              "config.yaml, metrics.jsonl, summary.json, checkpoint.pt, curves.png and report.md."),
    "eval": (_eval, "evaluate a run's model on the validation and test splits", None),
    "quantize": (_quantize, "quantize an fp32 run by a plan and fine-tune it (LSQ / FAQ recipes)",
                 "Quantize weights and input activations of every conv/linear layer by a preset (--bits) or a "
                 "per-layer plan (--plan), calibrate, and fine-tune from the fp32 weights with the LSQ or FAQ "
                 "recipe (optionally distilling from the fp32 teacher). Unset optimisation flags come from the "
                 "recipe. --epochs 0 gives the post-training accuracy."),
    "models": (_models, "list the model registry", None),
    "demo": (_demo, "run the main job on the embedded default (Fashion-MNIST)",
             "fp32 baseline, then the later stages; finished stages are kept and skipped on a rerun."),
}


def register(name: str, factory, help: str, description: str | None = None) -> None:
    SUBCOMMANDS[name] = (factory, help, description)


def _stage_commands() -> dict:
    """Commands of the later stages live beside their stage; imported here, lazily (they import this module)."""
    from lowbit.cli import deploy, mixed, plan, walk

    return {**SUBCOMMANDS, **plan.COMMANDS, **mixed.COMMANDS, **deploy.COMMANDS, **walk.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description=__doc__, formatter_class=_Formatter)
    from lowbit import __version__

    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (factory, help, desc) in _stage_commands().items():
        add, run = factory()
        p = sub.add_parser(name, help=help, description=desc or help, formatter_class=_Formatter)
        add(p)
        p.set_defaults(_run=run)
    return parser


def _apply_yaml_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``--config file.yaml`` sets the defaults of the chosen subcommand; flags on the line still win."""
    if "--config" not in argv and not any(s.startswith("--config=") for s in argv):
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config or not known.command:
        return
    from lowbit.io import load_yaml

    cfg = load_yaml(known.config)
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise LowbitError(f"{known.config}: expected a mapping of option: value")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sp = subparsers.choices.get(known.command)
    if sp is None:
        return
    actions = {a.dest: a for a in sp._actions}
    cfg = {str(k).replace("-", "_"): v for k, v in cfg.items() if k not in ("command",)}
    unknown = sorted(set(cfg) - set(actions))
    if unknown:
        raise LowbitError(f"{known.config}: unknown option(s) for `lowbit {known.command}`: {', '.join(unknown)}")
    sp.set_defaults(**{k: _config_value(actions[k], v, known.config) for k, v in cfg.items()})


def _config_value(action: argparse.Action, value, where: str):
    """A value from a YAML config checked as its flag would be: argparse checks neither the type of a
    non-string default nor the choices of any default."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if value is not None and action.type is not None and not isinstance(value, (list, dict, bool)):
        try:
            value = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise LowbitError(f"{where}: {flag}: {e}") from None
    if value is not None and action.choices is not None and value not in action.choices:
        raise LowbitError(f"{where}: {flag} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _check_device(args: argparse.Namespace) -> None:
    """Before any command writes its folder: CUDA asked for on a machine without it is one line, not a
    traceback from deep inside the first tensor move."""
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LowbitError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        _apply_yaml_config(parser, argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        _check_device(args)
        code = int(args._run(args) or 0)
        finish()
        return code
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


def run_cli() -> None:
    for stream in (sys.stdout, sys.stderr):  # a log file shows each line as it is printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    sys.exit(main())


if __name__ == "__main__":
    run_cli()
