"""Every run-directory command on a user's model, data and loss named by import path (--model/--data/--loss)."""

import json
import textwrap

import pytest

from lowbit.cli import main

USER_CODE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class CNN(nn.Module):
        def __init__(self, classes=3, width=6):
            super().__init__()
            self.stem = nn.Conv2d(1, width, 3, padding=1)
            self.mid = nn.Conv2d(width, width, 3, padding=1)
            self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
            self.head = nn.Linear(width * 4 * 4, classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.stem(x)), 2)
            x = F.relu(self.mid(x)) + x
            x = F.max_pool2d(F.relu(self.dw(x)), 2)
            return self.head(x.view(x.size(0), -1))


    def make_cnn(classes=3, width=6):
        return CNN(classes, width)


    def make_images(n=192, classes=3):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
        for k in range(classes):
            x[y == k, :, 5 * k:5 * k + 5] += 1.5
        ds = torch.utils.data.TensorDataset(x, y)
        train, test = torch.utils.data.random_split(ds, [n - 48, 48], generator=g)
        return {"train": train, "test": test}  # lowbit holds out the validation split


    def smooth_ce(outputs, batch):
        return F.cross_entropy(outputs, batch[1], label_smoothing=0.05)


    def not_a_model():
        return 42


    def make_flat(n=96):
        g = torch.Generator().manual_seed(0)
        return {"train": torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,)))}


    class Named(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x, self.y = torch.randn(n, 1, 16, 16), torch.randint(0, 3, (n,))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "klass": self.y[i]}


    def make_named(n=96):
        return {"train": Named(n)}


    def make_bad_labels(n=96):
        x, y = torch.randn(n, 1, 16, 16), torch.full((n,), 7)
        return {"train": torch.utils.data.TensorDataset(x, y)}


    def loss_raises(outputs, batch):
        return {}["nope"]


    def loss_per_example(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none")


    def broken():
        raise ValueError("no GPU here")
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "mycode.py").write_text(USER_CODE)
    return root


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def w4a4_run(user, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    code = f"{user / 'mycode.py'}"
    assert main(["train", "--model", f"{code}:make_cnn", "--model-args", "{width: 6}", "--data",
                 f"{code}:make_images", "--loss", f"{code}:smooth_ce", "--epochs", "2", "--lr", "0.05",
                 "--batch-size", "32", "--quiet", "--out", str(runs / "fp32")]) == 0
    assert main(["quantize", "--from", str(runs / "fp32"), "--bits", "w4a4", "--epochs", "1", "--batch-size", "32",
                 "--quiet", "--out", str(runs / "w4a4")]) == 0
    return runs


def test_train_and_quantize_record_and_reuse_the_user_code(w4a4_run, user):
    cfg = (w4a4_run / "fp32" / "config.yaml").read_text()
    assert "make_cnn" in cfg and "make_images" in cfg and "smooth_ce" in cfg
    summary = json.loads((w4a4_run / "w4a4" / "summary.json").read_text())
    assert summary["model"].endswith("mycode.py:make_cnn") and summary["val_acc"] > 0.5
    from lowbit.io import load_checkpoint

    spec = load_checkpoint(w4a4_run / "w4a4" / "checkpoint.pt")["spec"]
    assert spec["loss"].endswith(":smooth_ce") and spec["model_kwargs"] == {"width": 6}


def test_eval_rebuilds_model_and_data(w4a4_run, capsys):
    out = _cli(["eval", "--from", w4a4_run / "w4a4"], capsys)
    assert "val" in out and "accuracy" in out and "(14 examples)" in out and "(48 examples)" in out


@pytest.mark.parametrize("method", ["eagl", "alps", "hessian", "random"])
def test_sensitivity_every_method(w4a4_run, method, tmp_path, capsys):
    out = _cli(["sensitivity", "--from", w4a4_run / "w4a4", "--method", method, "--epochs", "0.3",
                "--max-iter", "3", "--quiet", "--out", tmp_path / "s"], capsys)
    table = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert {r["layer"] for r in table["rows"]} == {"mid", "dw"} and "sensitivity.json" in out
    if method in ("alps", "hessian"):
        assert json.loads(json.dumps((tmp_path / "s" / "config.yaml").read_text())).count("smooth_ce") == 1


def test_select_and_frontier(w4a4_run, tmp_path, capsys):
    _cli(["sensitivity", "--from", w4a4_run / "w4a4", "--method", "eagl", "--quiet", "--out", tmp_path / "s"],
         capsys)
    out = _cli(["select", "--from", w4a4_run / "w4a4", "--sensitivity", tmp_path / "s", "--budget", "0.5",
                "--out", tmp_path / "plan.yaml"], capsys)
    assert "at 2 bits" in out and (tmp_path / "plan.yaml").exists()
    out = _cli(["frontier", "--from", w4a4_run / "w4a4", "--methods", "eagl,random", "--budgets", "0.5",
                "--epochs", "0.3", "--quiet", "--out", tmp_path / "fr"], capsys)
    payload = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert len(payload["points"]) == 4 and all(p["val_acc"] is not None for p in payload["points"])
    assert payload["config"]["loss"].endswith(":smooth_ce")
    _cli(["quantize", "--from", w4a4_run / "fp32", "--plan", tmp_path / "plan.yaml", "--epochs", "0", "--quiet",
          "--out", tmp_path / "mixed"], capsys)
    # deploy exactly the measured frontier point, then run and time it
    out = _cli(["export", "--from", tmp_path / "fr", "--point", "eagl@0.5", "--out", tmp_path / "m.lowbit",
                "--verify"], capsys)
    point = next(p for p in payload["points"] if p["label"] == "eagl-0.5")
    assert "frontier point eagl-0.5" in out and "bit-exact on every" in out
    assert f"accuracy {100 * point['test_acc']:.2f}%" in out  # the integer model scores what was measured
    out = _cli(["infer", tmp_path / "m.lowbit", "--backend", "fast"], capsys)
    assert "accuracy" in out and "48 images" in out
    out = _cli(["bench", tmp_path / "m.lowbit", "--batch", "4", "--runs", "2", "--warmup", "1", "--budget", "2",
                "--no-onnx", "--quiet"], capsys)
    assert "fp32 eager" in out and "bf16 autocast" in out and "lowbit fast path" in out


@pytest.mark.parametrize("args,needle", [
    (["--model", "{code}:nope"], "has no 'nope'"),
    (["--model", "{code}:not_a_model"], "returned a int, not a torch.nn.Module"),
    (["--model", "{code}:broken"], "raised ValueError: no GPU here"),
    (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--model", "{code}:make_cnn", "--model-args", "{depth: 3}"], "unexpected keyword argument 'depth'"),
    (["--model", "{code}:make_cnn", "--model-args", "[1, 2]"], "expected a mapping"),
    (["--data", "{code}:broken"], "data factory"),
    (["--data", "{code}:not_a_model"], "expected DataSplits"),
    (["--loss", "{code}:nope"], "loss function"),
    (["--metric", "missing.py:f"], "file missing.py not found"),
    (["--data", "{code}:make_flat"], "cannot run a batch of"),
    (["--data", "{code}:make_named"], "target under one of labels"),
    (["--data", "{code}:make_bad_labels"], "Target 7 is out of bounds"),
    (["--loss", "{code}:loss_raises"], "the loss (loss_raises) fails"),
    (["--loss", "{code}:loss_per_example"], "must return a scalar tensor"),
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--data-args", "missing.yaml"], "missing.yaml: file not found"),
])
def test_bad_user_code_is_one_line_and_leaves_no_folder(user, args, needle, tmp_path, capsys):
    code = str(user / "mycode.py")
    base = ["train", "--model", f"{code}:make_cnn", "--data", f"{code}:make_images", "--epochs", "1", "--quiet"]
    argv = [*base, *[a.replace("{code}", code) for a in args], "--out", str(tmp_path / "run")]
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["quantize", "eval", "sensitivity", "frontier"])
def test_later_stages_check_the_data_against_the_model(w4a4_run, user, command, tmp_path, capsys):
    """A run's model given other data fails on one batch with one line, before a folder is made."""
    source = w4a4_run / ("fp32" if command in ("quantize", "eval") else "w4a4")
    argv = [command, "--from", source, "--data", f"{user / 'mycode.py'}:make_named", "--quiet"]
    argv += {"quantize": ["--bits", "w4a4", "--out", tmp_path / "q"], "eval": [],
             "sensitivity": ["--method", "hessian", "--out", tmp_path / "q"],
             "frontier": ["--methods", "random", "--budgets", "0.5", "--out", tmp_path / "q"]}[command]
    rc = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert rc == 2 and "target under one of labels" in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


def test_resume_continues_only_the_same_command_on_the_same_source(w4a4_run, tmp_path, capsys):
    _cli(["sensitivity", "--from", w4a4_run / "w4a4", "--method", "eagl", "--quiet", "--out", tmp_path / "s"],
         capsys)
    config = (tmp_path / "s" / "config.yaml").read_text()
    for argv, needle in [
        (["sensitivity", "--from", w4a4_run / "w4a4", "--method", "random"], "its method is 'eagl'"),
        (["quantize", "--from", w4a4_run / "fp32", "--bits", "w4a4", "--epochs", "0"], "its command is"),
        (["frontier", "--from", w4a4_run / "w4a4", "--methods", "random", "--budgets", "0.5"], "its command is"),
    ]:
        rc = main([str(a) for a in [*argv, "--quiet", "--resume", "--out", tmp_path / "s"]])
        _, err = capsys.readouterr()
        assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert (tmp_path / "s" / "config.yaml").read_text() == config  # untouched
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.yaml", "report.md", "sensitivity.json"]
    for spelled in (f"{w4a4_run / 'w4a4'}/", w4a4_run / "w4a4" / "checkpoint.pt"):  # the same source run
        _cli(["sensitivity", "--from", spelled, "--method", "eagl", "--quiet", "--resume", "--out", tmp_path / "s"],
             capsys)
