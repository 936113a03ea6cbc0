import subprocess
import sys

import pytest

from lowbit.cli import main


def _run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "nope", "--data", "synthetic"], "unknown model"),
    (["train", "--epochs", "abc"], "invalid float"),
    (["train", "--device", "tpu"], "invalid choice"),
    (["eval", "--from", "/nonexistent/run"], "no such run"),
    (["train", "--data", "fashion-mnist", "--data-dir", "/nonexistent", "--epochs", "0"], "not found"),
    (["train", "--config", "/nonexistent.yaml"], "file not found"),
    (["quantize", "--from", "/nonexistent/run", "--bits", "w4a4"], "no such run"),
    (["quantize", "--from", "x", "--first-last-bits", "5x"], "expected 2, 3, 4, 8 or float"),
    (["train", "--data", "synthetic", "--weights", "/nonexistent.safetensors"], "weights file not found"),
    (["train", "--data", "synthetic", "--image-size", "32"], "--image-size applies to --data imagefolder"),
    (["train", "--data", "synthetic", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["train", "--data", "imagefolder"], "needs --data-dir"),
    (["train", "--amp", "fp16"], "invalid choice"),
    (["train", "--batch-size", "0"], "--batch-size: must be > 0, got 0"),
    (["train", "--workers", "-3"], "--workers: must be >= 0, got -3"),
    (["eval", "--from", "x", "--batch-size", "-5"], "must be > 0, got -5"),
    (["infer", "m.lowbit", "--limit", "0"], "--limit: must be > 0"),
    (["bench", "m.lowbit", "--warmup", "-1"], "--warmup: must be >= 0"),
    (["bench", "m.lowbit", "--table-batch", "0"], "--table-batch: must be > 0"),
    (["frontier", "--from", "x", "--examples", "-5"], "--examples: must be > 0"),
    (["sensitivity", "--from", "x", "--method", "hessian", "--max-iter", "0"], "--max-iter: must be > 0"),
    (["sensitivity", "--from", "x", "--method", "hessian", "--tol", "-1"], "--tol: must be > 0.0"),
])
def test_user_errors_are_one_line_exit_2(args, needle, capsys, tmp_path):
    if args[0] in ("train", "quantize"):
        args = [*args, "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(args))
    _, err = capsys.readouterr()
    assert e.value.code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_output(capsys):
    rc, _, err = _run(["train", "--data", "synthetic", "--epochs", "1", "--quiet", "--out", "/proc/lowbit"],
                      capsys)
    assert rc == 2 and err.count("\n") == 1


def test_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    rc, _, err = _run(["eval", "--from", str(run), "--data", "synthetic"], capsys)
    assert rc == 2 and "not a readable lowbit checkpoint" in err and err.count("\n") == 1


def test_foreign_pickle_is_not_executed(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("EXECUTED",))

    (tmp_path / "x.pt").write_bytes(pickle.dumps(Evil()))
    rc, out, err = _run(["eval", "--from", str(tmp_path / "x.pt"), "--data", "synthetic"], capsys)
    assert rc == 2 and "EXECUTED" not in out


def test_yaml_config_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: mlp\nepochs: 1\nbatch_size: 64\ndata: synthetic\nquiet: true\n")
    rc, out, _ = _run(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--lr", "0.01"], capsys)
    assert rc == 0 and "mlp" in out
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.01" in saved and "model: mlp" in saved
    rc, _, err = _run(["eval", "--from", str(tmp_path / "r"), "--data", "synthetic", "--quiet"], capsys)
    assert rc == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    rc, _, err = _run(["train", "--config", str(bad)], capsys)
    assert rc == 2 and "epochz" in err


def test_models_and_help():
    r = subprocess.run([sys.executable, "-m", "lowbit", "models"], capture_output=True, text=True)
    assert r.returncode == 0 and "resnet8" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lowbit", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


def test_quantize_bad_bits_and_wrong_run_kind(tmp_path, capsys):
    rc, _, _ = _run(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "1", "--quiet",
                     "--out", str(tmp_path / "fp")], capsys)
    assert rc == 0
    rc, _, err = _run(["quantize", "--from", str(tmp_path / "fp"), "--bits", "w5a4", "--data", "synthetic",
                       "--out", str(tmp_path / "q")], capsys)
    assert rc == 2 and "5-bit" in err and err.count("\n") == 1
    rc, out, _ = _run(["quantize", "--from", str(tmp_path / "fp"), "--bits", "w4a4", "--data", "synthetic",
                       "--epochs", "1", "--quiet", "--out", str(tmp_path / "q")], capsys)
    assert rc == 0 and "w4a4" in out
    rc, _, err = _run(["quantize", "--from", str(tmp_path / "q"), "--data", "synthetic",
                       "--out", str(tmp_path / "q2")], capsys)
    assert rc == 2 and "fp32 run" in err


def test_weights_then_quantize_from_the_zero_epoch_run(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from lowbit.models import create_model

    src = create_model("mlp")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "mlp.safetensors"))
    rc, out, err = _run(["train", "--model", "mlp", "--weights", str(tmp_path / "mlp.safetensors"), "--epochs", "0",
                         "--data", "synthetic", "--quiet", "--amp", "bf16", "--out", str(tmp_path / "fp")], capsys)
    assert rc == 0, err
    ckpt = torch.load(tmp_path / "fp" / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "fp32" and torch.equal(ckpt["state_dict"]["fc1.weight"], src.fc1.weight)
    config = (tmp_path / "fp" / "config.yaml").read_text()
    assert "amp: bf16" in config and "mlp.safetensors" in config
    rc, out, err = _run(["quantize", "--from", str(tmp_path / "fp"), "--bits", "w8a8", "--epochs", "0",
                         "--data", "synthetic", "--quiet", "--amp", "bf16", "--out", str(tmp_path / "q")], capsys)
    assert rc == 0 and "w8a8" in out, err
    assert "amp: bf16" in (tmp_path / "q" / "config.yaml").read_text()
    rc, _, err = _run(["train", "--model", "resnet8", "--weights", str(tmp_path / "mlp.safetensors"), "--epochs", "0",
                       "--data", "synthetic", "--quiet", "--out", str(tmp_path / "bad")], capsys)
    assert rc == 2 and "do not fit" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["train", "--data", "synthetic", "--epochs", "1"],
    ["quantize", "--from", "x", "--bits", "w4a4"],
    ["eval", "--from", "x"],
    ["sensitivity", "--from", "x", "--method", "hessian"],
])
def test_cuda_without_a_gpu_is_one_line_and_no_folder(argv, monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine that has one
    rc, _, err = _run([*argv, "--device", "cuda", "--out", str(tmp_path / "r")] if argv[0] != "eval"
                      else [*argv, "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA GPU is available" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("config,needle", [
    ("device: 3\n", "--device must be one of cpu, cuda, got 3"),
    ("amp: fp16\n", "--amp must be one of"),
    ("batch_size: 0\n", "--batch-size: must be > 0, got 0"),
    ("epochs: many\n", "--epochs: could not convert string to float"),
])
def test_yaml_config_values_are_checked_like_flags(config, needle, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(config)
    rc, _, err = _run(["train", "--config", str(tmp_path / "c.yaml"), "--data", "synthetic", "--out",
                       str(tmp_path / "r")], capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_a_folder_where_a_file_belongs_is_one_line(tmp_path, capsys):
    rc, _, err = _run(["train", "--config", str(tmp_path), "--data", "synthetic"], capsys)
    assert rc == 2 and "is a folder, expected a file" in err and err.count("\n") == 1


def test_quantize_names_quantizers_other_than_the_recipes(tmp_path, capsys):
    rc, _, err = _run(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "0", "--quiet", "--out",
                       str(tmp_path / "fp32")], capsys)
    assert rc == 0, err
    for method, label in [("minmax", "(lsq, minmax quantizers)"), (None, "(lsq)")]:
        rc, out, err = _run(["quantize", "--from", str(tmp_path / "fp32"), "--bits", "w4a4", "--epochs", "0",
                             "--quiet", "--out", str(tmp_path / f"q{method}"),
                             *(["--method", method] if method else [])], capsys)
        assert rc == 0 and f"mlp w4a4 {label}:" in out, out + err
