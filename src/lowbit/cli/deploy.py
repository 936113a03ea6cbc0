"""``lowbit export``, ``lowbit infer`` and ``lowbit bench``: the integer-deployment commands.

Merged into the main parser by ``SUBCOMMANDS.update(deploy.COMMANDS)``; each entry is
``name: (factory, help, description)`` with ``factory() -> (add(parser), run(args))`` as in
:mod:`lowbit.cli.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowbit.cli.main import _set_threads, add_common, count, nonneg_float, positive_int
from lowbit.errors import LowbitError


def _export():
    def add(p):
        p.add_argument("--from", dest="source", required=True,
                       help="quantized run directory (from `lowbit quantize`), a frontier run with --point/--best, "
                            "or a .lowbit file with --format onnx")
        p.add_argument("--point", default=None, metavar="METHOD@BUDGET",
                       help="with a frontier run: export this point's fine-tuned model (e.g. eagl@0.5, uniform-w4a4)")
        p.add_argument("--best", action="store_true",
                       help="with a frontier run: export the point with the best validation accuracy (or metric)")
        p.add_argument("--min-throughput", type=float, default=None,
                       help="with --best: only points at least this fast (relative throughput, W4A4 = 1.0)")
        p.add_argument("--out", default=None, help="file to write (default model.lowbit / model.onnx)")
        p.add_argument("--format", default="lowbit", choices=["lowbit", "onnx"],
                       help="lowbit: integer model (safetensors + manifest); onnx: QDQ ONNX for onnxruntime")
        p.add_argument("--no-int4", dest="int4", action="store_false",
                       help="ONNX: store <=4-bit weights as INT8 instead of the ONNX INT4 type")
        p.add_argument("--epilogue-error", type=float, default=None, metavar="STEPS",
                       help="output steps a requantization narrowed for the int8 kernel's own epilogue may move a "
                            "value (default 2^-10 ~ 0.001): larger (e.g. 0.03) puts more layers, fused residual adds "
                            "above all, inside the oneDNN kernel on the CPU fast path, while values within that "
                            "distance of a rounding tie may round the other way than in the fake-quant model")
        p.add_argument("--verify", action="store_true",
                       help="check the export on the run's test set: runtime vs simulation (bit-exact), vs the "
                            "fake-quant model, fast path (and ONNX with --format onnx)")
        p.add_argument("--limit", type=positive_int, default=None, help="verify on the first N test images only")
        p.add_argument("--report", default=None, help="save the verification numbers as JSON here")
        p.add_argument("--batch-size", type=positive_int, default=256)
        add_common(p)

    def run(a):
        from lowbit.export.exporter import export_run
        from lowbit.ir.format import read_model
        from lowbit.runtime.engine import IntegerModel

        _set_threads(a)
        for flag, path in (("--out", a.out), ("--report", a.report)):  # before the model file is written
            if path and Path(path).is_dir():
                raise LowbitError(f"{flag} {path}: it is a folder; give a file name")
        src = Path(a.source)
        if a.point or a.best or (src / "frontier.json").exists() or (src / "points").is_dir():
            from lowbit.frontier import point_checkpoint

            src, point = point_checkpoint(src, a.point, best=a.best, min_throughput=a.min_throughput)
            measured = (f"val {_pct(point.get('val_acc'))}, test {_pct(point.get('test_acc'))}"
                        if point.get("val_metric") is None else
                        f"val {point['val_metric']:.4g}, test {point.get('test_metric', float('nan')):.4g}")
            print(f"frontier point {point['label']}: relative throughput {point['relative_throughput']:.3f}, "
                  f"{point['n_low']} layer(s) at 2 bits, measured {measured}")
        elif a.min_throughput is not None:
            raise LowbitError("--min-throughput goes with --best on a frontier run")
        if src.is_file() and src.suffix == ".lowbit":
            if a.format != "onnx" or a.verify:
                raise LowbitError(f"{src} is already a .lowbit file: use it with --format onnx (without --verify)")
            out = _onnx(IntegerModel.load(src), a.out or src.with_suffix(".onnx"), a.int4)
            print(f"{out}: {_size(out.stat().st_size)} (QDQ ONNX of {src})")
            return 0
        if a.format == "lowbit":
            result = export_run(src, a.out or "model.lowbit", a.epilogue_error)
            print(result.summary() + _ckpt_note(result.info))
            path, runtime = result.path, IntegerModel.load(result.path)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                result = export_run(src, Path(tmp) / "model.lowbit", a.epilogue_error)
                runtime = IntegerModel(*read_model(result.path), source=str(src))
            path = _onnx(runtime, a.out or "model.onnx", a.int4)
            size = path.stat().st_size
            print(f"{path}: {_size(size)} vs fp32 weights {_size(result.fp32_bytes)} "
                  f"({result.fp32_bytes / size:.1f}x smaller)")
        if a.verify:
            from lowbit.export.onnx_export import OnnxModel
            from lowbit.export.simulate import EncoderSimulation, Simulation

            lowered = result.lowered
            images, labels = _test_set(a, runtime.manifest, a.limit, tokens=runtime.token_input)
            onnx = OnnxModel(path) if a.format == "onnx" else None
            if runtime.token_input:
                _verify(a, runtime, images, labels, simulation=EncoderSimulation(lowered), lowered=lowered, onnx=onnx)
            else:
                _verify(a, runtime, images, labels, simulation=Simulation(lowered), fake_quant=lowered.model,
                        onnx=onnx)
        return 0

    return add, run


def _infer():
    def add(p):
        p.add_argument("model", help=".lowbit file (from `lowbit export`)")
        p.add_argument("--backend", default="reference", choices=["reference", "fast", "onnx"],
                       help="reference: the integer runtime (the definition); fast: oneDNN int8 kernels and a "
                            "compiled graph, bit-exact against the reference; onnx: the QDQ ONNX export in onnxruntime")
        p.add_argument("--images", default=None,
                       help="predict these images instead of the test set: .npy or IDX (.gz) of uint8 images, "
                            "N x 28 x 28 (or N x C x H x W)")
        p.add_argument("--labels", default=None, help="labels of --images (.npy or IDX) to report accuracy")
        p.add_argument("--limit", type=positive_int, default=None, help="first N images only")
        p.add_argument("--batch-size", type=positive_int, default=256)
        p.add_argument("--out", default=None, help="save predictions (and accuracy) as JSON here")
        add_common(p)

    def run(a):
        import torch

        from lowbit.io import save_json
        from lowbit.runtime.engine import IntegerModel

        _set_threads(a)
        if a.labels and not a.images:
            raise LowbitError("--labels goes with --images; the test set brings its own labels")
        model = IntegerModel.load(a.model)
        backend = _backend(model, a.backend)
        if a.images:
            if model.token_input:
                raise LowbitError(f"{a.model} is an encoder (token inputs): it runs on its run's test set, not on "
                                  f"--images")
            images = _read_images(a.images, model)
            labels = _read_labels(a.labels, len(images)) if a.labels else None
        else:
            images, labels = _test_set(a, model.manifest, None, tokens=model.token_input)
        if a.limit is not None:
            images, labels = _head(images, a.limit), None if labels is None else labels[:a.limit]
        n = _count(images)
        if n == 0:
            raise LowbitError(f"{a.images or 'the test set'}: no examples to predict")
        preds = torch.cat([backend(_head(images, i + a.batch_size, i)).argmax(1) for i in range(0, n, a.batch_size)])
        result = {"model": a.model, "backend": a.backend, "images": n}
        if a.images and not a.quiet:
            for i, c in enumerate(preds.tolist()):
                print(f"{i}\t{c}")
        if labels is not None:
            acc = float((preds == labels).double().mean())
            result["accuracy"] = acc
            print(f"{a.backend}: accuracy {100 * acc:.2f}% on {n} {'sequences' if model.token_input else 'images'}")
        if a.out:
            save_json(a.out, {**result, "predictions": preds.tolist()})
        return 0

    return add, run


def _bench():
    def add(p):
        p.add_argument("file", metavar="model", help=".lowbit file (from `lowbit export`)")
        p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
        p.add_argument("--runs", type=positive_int, default=30, help="timed runs per variant (median reported)")
        p.add_argument("--warmup", type=count, default=3)
        p.add_argument("--budget", type=nonneg_float, default=120.0,
                       help="seconds one variant may take per batch size; slower ones get fewer runs (recorded)")
        p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime variant")
        p.add_argument("--out", default=None, help="save the results as JSON here")
        p.add_argument("--latency-table", default=None,
                       help="also measure each layer at every bit width and save the table (JSON for "
                            "--cost measured) here")
        p.add_argument("--table-batch", type=positive_int, default=8, help="batch size of the per-layer measurements")
        p.add_argument("--model", default=None,
                       help="float architecture of the fp32/bf16 rows: a registry name or package.module:factory "
                            "(default: the one the export recorded)")
        p.add_argument("--model-args", default=None, metavar="YAML", help="keyword arguments of --model")
        add_common(p, data=False)

    def run(a):
        from lowbit.deploy.bench import benchmark, check_runs, format_table, latency_table
        from lowbit.io import save_json

        _set_threads(a)
        try:
            batches = [int(b) for b in str(a.batch).split(",") if b.strip()]
        except ValueError:
            raise LowbitError(f"--batch takes comma-separated integers, got {a.batch!r}") from None
        if not batches or min(batches) < 1:
            raise LowbitError(f"--batch needs positive batch sizes, got {a.batch!r}")
        from lowbit.plugins import parse_args_option

        kwargs = parse_args_option(a.model_args, "--model-args") if a.model_args else None
        res = benchmark(a.file, batches, runs=check_runs(a.runs), warmup=a.warmup, budget_s=a.budget, onnx=a.onnx,
                        seed=a.seed, progress=None if a.quiet else lambda s: print(s, file=sys.stderr),
                        model_name=a.model, model_kwargs=kwargs)
        print(format_table(res))
        if a.out:
            save_json(a.out, res)
            print(f"saved {a.out}")
        if a.latency_table:
            table = latency_table(a.file, batch=a.table_batch, runs=max(5, min(a.runs, 20)))
            save_json(a.latency_table, table)
            print(f"per-layer latency table ({len(table['layers'])} layers) saved to {a.latency_table}")
        return 0

    return add, run


# ----------------------------------------------------------------------------------------------- helpers
def _onnx(model, out, int4: bool) -> Path:
    from lowbit.export.onnx_export import export_onnx

    return export_onnx(model, out, int4=int4)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _size(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**16 else f"{n / 1024:.1f} KiB"


def _ckpt_note(info: dict) -> str:
    n = info.get("fp32_checkpoint_bytes")
    return f"; fp32 checkpoint file {_size(n)}" if n else ""


def _backend(model, name: str):
    if name == "reference":
        return model
    if name == "fast":
        return _fast(model) or model
    import tempfile

    from lowbit.export.onnx_export import OnnxModel

    with tempfile.TemporaryDirectory(prefix="lowbit-onnx-") as tmp:  # the session keeps the loaded graph
        return OnnxModel(_onnx(model, Path(tmp) / "model.onnx", True))


def _head(x, stop: int, start: int = 0):
    """Rows ``start:stop`` of a tensor or of every tensor of a dict (token inputs)."""
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def _count(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _fast(model):
    """The exact fast backend, or None (one warning line) when it cannot take the model; a node it has no kernel
    for runs on the reference kernel (one warning line)."""
    import warnings

    from lowbit.runtime.fast_encoder import fast_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fast = fast_model(model)
        except LowbitError as e:
            print(f"warning: {e}; running the reference runtime", file=sys.stderr)
            return None
    for w in caught:  # lowbit's own (a node on the reference kernel), not torch's deprecation notices
        if not issubclass(w.category, DeprecationWarning) and "lowbit" in Path(w.filename).parts:
            print(f"warning: {w.message}", file=sys.stderr)
    return fast


def _test_set(a, manifest: dict, limit: int | None, tokens: bool = False):
    """The test split of the run's data as the exported model takes it: uint8 pixels (N, C, H, W) for lowbit's
    image sets, the float input tensors of a user's data (its recorded factory), a dict of token tensors for an
    encoder (``tokens``), and the labels (or None)."""
    import torch

    from lowbit.data import iterate, split_batch
    from lowbit.data.datasets import TensorDataset
    from lowbit.train.checkpoint import run_data

    data_spec = manifest.get("data_spec") or {"data": manifest.get("data") or getattr(a, "data", None)
                                              or "fashion-mnist"}
    if data_spec["data"] == "imagefolder":
        raise LowbitError("lowbit infer/export --verify read in-memory test sets; give --images for ImageFolder data")
    ds = run_data(data_spec, getattr(a, "data", None), a.data_dir).test
    if ds is None:
        raise LowbitError(f"data {data_spec['data']} has no test split; give --images (and --labels)")
    if isinstance(ds, TensorDataset):
        n = len(ds) if limit is None else min(limit, len(ds))
        return ds.images[:n], ds.labels[:n]
    xs, ys = [], []
    for batch in iterate(ds, 256, limit=limit, device=None):
        x, y = split_batch(batch)
        if tokens:
            if not isinstance(x, dict):
                raise LowbitError("the encoder takes a dict of token tensors; this data gives one tensor per batch")
            x = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
        elif not isinstance(x, torch.Tensor):
            raise LowbitError("the exported model takes one input tensor; this data gives several inputs per batch")
        xs.append(x if tokens else x.float())
        ys.append(y if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.ndim == 1 else None)
    x = {k: torch.cat([b[k] for b in xs])[:limit] for k in xs[0]} if tokens else torch.cat(xs)[:limit]
    labels = None if any(y is None for y in ys) else torch.cat(ys)[:limit]
    return x, labels


def _read_array(path: str):
    import numpy as np

    from lowbit.data.idx import read_idx

    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: file not found")
    if p.suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise LowbitError(f"{p}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    return read_idx(p, fix="give a .npy array or an IDX file (.gz or not) of uint8 values")


def _read_images(path: str, model):
    import torch

    arr = _read_array(path)
    if not model.pixel_input:  # a model of a user's data takes float tensors
        if arr.dtype.kind not in "fiu":
            raise LowbitError(f"{path}: expected numbers, got {arr.dtype}")
        x = torch.from_numpy(arr.astype("float32"))
        if list(x.shape[1:]) != list(model.input_spec.get("shape", [])):
            raise LowbitError(f"{path}: inputs of shape {tuple(x.shape[1:])} do not fit the model's input "
                              f"{tuple(model.input_spec.get('shape', []))}")
        return x
    if arr.dtype.name != "uint8":
        raise LowbitError(f"{path}: images must be uint8 pixels, got {arr.dtype}")
    shape = list(model.input_spec.get("shape", []))
    x = torch.from_numpy(arr.copy())
    if x.dim() == 3 and shape[:1] == [1]:
        x = x.unsqueeze(1)
    if list(x.shape[1:]) != shape:
        raise LowbitError(f"{path}: images of shape {tuple(arr.shape[1:])} do not fit the model's input {tuple(shape)}")
    if not model.pixel_input:
        raise LowbitError(f"{model.source} takes float input, not uint8 images")
    return x


def _read_labels(path: str, n: int):
    import torch

    arr = _read_array(path)
    if arr.ndim != 1 or len(arr) != n or arr.dtype.kind not in "iu":
        raise LowbitError(f"{path}: labels must be {n} integers (one per image), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype("int64"))


def _verify(a, runtime, images, labels, **impls) -> None:
    from lowbit.deploy.verify import format_encoder_report, format_report, verify, verify_encoder
    from lowbit.io import save_json

    fast = _fast(runtime)
    if runtime.token_input:
        report = verify_encoder(runtime, images, labels, fast=fast, batch_size=min(a.batch_size, 64), **impls)
        print(format_encoder_report(report))
    else:
        report = verify(runtime, images, labels, fast=fast, batch_size=a.batch_size, **impls)
        print(format_report(report))
    if a.report:
        save_json(a.report, report)
        print(f"saved {a.report}")


COMMANDS = {
    "export": (_export, "export a quantized run as an integer .lowbit model (or QDQ ONNX)",
               "Capture the quantized model with torch.fx, fold batch norm into per-channel dyadic "
               "requantization, pack weight codes at their bit width and write a .lowbit file (safetensors + "
               "JSON manifest) or, with --format onnx, a QDQ ONNX model. Prints the size against the fp32 "
               "weights; --verify checks runtime, simulation, fake-quant model and fast path on the test set."),
    "infer": (_infer, "run a .lowbit model: test-set accuracy, or predictions for given images",
              "Run an exported model with the integer reference runtime (default), the bit-exact oneDNN int8 fast "
              "path or onnxruntime, on the run's test set or on uint8 images from a .npy/IDX file."),
    "bench": (_bench, "time a .lowbit model against fp32, bf16 and PyTorch's own int8 (and onnxruntime)",
              "Median latency of fp32 eager, fp32 channels-last, fp32 torch.compile, bf16 autocast, PyTorch's own "
              "int8 for the same architecture (PT2E x86 inductor with torchao, else eager torch.ao x86), the "
              "lowbit fast path (bit-exact, compiled) and onnxruntime, in one process, at each --batch, with "
              "speed-ups, peak memory, compile times, file sizes and CPU flags; --latency-table also writes the "
              "per-layer table for --cost measured."),
}
