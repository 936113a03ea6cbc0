"""Progress: bars in a terminal, plain timestamped lines in a log, nothing with quiet."""

import torch
from torch import nn

from lowbit.data import DataSplits
from lowbit.progress import progress
from lowbit.train import FitConfig, fit


def test_log_lines_when_output_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_PROGRESS", "log")
    for _ in progress(range(3), total=3, desc="jobs", unit="job"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1].split(" (")[0] for line in err] == ["jobs: 1/3 job", "jobs: 2/3 job",
                                                                      "jobs: 3/3 job"]
    bar = progress(total=100, desc="batches", every=0.0)
    bar.set_postfix(loss="0.5")
    bar.update(10)
    assert "batches: 10/100 it loss=0.5" in capsys.readouterr().err


def test_quiet_and_off_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_PROGRESS", "log")
    assert list(progress(range(2), quiet=True, unit="job")) == [0, 1]
    monkeypatch.setenv("LOWBIT_PROGRESS", "off")
    assert list(progress(range(2), unit="job")) == [0, 1]
    assert capsys.readouterr().err == ""


def test_fit_logs_every_epoch(monkeypatch, capsys):
    monkeypatch.setenv("LOWBIT_PROGRESS", "log")
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    data = DataSplits(torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x, y))
    fit(nn.Linear(4, 2), data, FitConfig(epochs=2, batch_size=8), desc="mine")
    err = capsys.readouterr().err
    assert "mine: 1/2 epoch" in err and "mine: 2/2 epoch" in err and "val=" in err
