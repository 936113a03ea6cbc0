"""The run directory: which folder a command may continue, and what a failed command leaves behind."""

import pytest

from lowbit.errors import LowbitError
from lowbit.runs import RunDir


def _made_by(path, **config):
    run = RunDir(path)
    run.write_config(config)
    return run


def test_resume_refuses_another_commands_folder(tmp_path):
    _made_by(tmp_path / "r", command="sensitivity", source="runs/w4a4", method="eagl")
    with pytest.raises(LowbitError, match="its command is 'sensitivity', not 'train'"):
        RunDir(tmp_path / "r", resume=True, command="train")
    with pytest.raises(LowbitError, match="its method is 'eagl', not 'alps'"):
        RunDir(tmp_path / "r", resume=True, command="sensitivity", same={"source": "runs/w4a4", "method": "alps"})
    run = RunDir(tmp_path / "r", resume=True, command="sensitivity", same={"source": "runs/w4a4/", "method": "eagl"})
    assert run.resume
    run = RunDir(tmp_path / "r", resume=True, command="sensitivity", same={"method": "eagl", "weights": "ab12"})
    assert run.resume  # a setting an older run did not record is not held against it


def test_a_failure_before_any_result_leaves_no_folder(tmp_path):
    run = RunDir(tmp_path / "new")
    with pytest.raises(ValueError), run.removed_on_error():
        run.write_config({"command": "train"})
        raise ValueError("the first batch failed")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kept", ["checkpoint", "folder existed"])
def test_a_failure_keeps_what_can_be_resumed_or_was_there(tmp_path, kept):
    if kept == "folder existed":
        (tmp_path / "r").mkdir()
    run = RunDir(tmp_path / "r")
    with pytest.raises(ValueError), run.removed_on_error():
        run.write_config({"command": "train"})
        if kept == "checkpoint":
            run.file("checkpoint.pt").write_bytes(b"epoch 1")
        raise ValueError("epoch 2 failed")
    assert (tmp_path / "r" / "config.yaml").exists()


def test_an_interrupt_keeps_the_folder(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(KeyboardInterrupt), run.removed_on_error():
        run.write_config({"command": "train"})
        raise KeyboardInterrupt
    assert (tmp_path / "r" / "config.yaml").exists()  # `--resume` starts it again from its config
