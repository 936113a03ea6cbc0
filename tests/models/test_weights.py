import pickle

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.io import save_checkpoint
from lowbit.models import create_model, load_weights_


def _source():
    torch.manual_seed(1)
    m = create_model("resnet8", width=0.5)
    with torch.no_grad():  # non-default buffers, so a load that skips them is caught
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_()
                mod.running_var.uniform_(0.5, 2)
    return m


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp", "compiled_ddp", "nested", "lowbit"])
def test_torch_save_files_and_their_wrappers(tmp_path, wrap):
    src = _source()
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        "model": {"model": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled_ddp": {f"_orig_mod.module.{k}": v for k, v in sd.items()},
        "nested": {"checkpoint": 1, "state_dict": {"model": {f"module.{k}": v for k, v in sd.items()}}},
    }.get(wrap)
    path = tmp_path / "w.pt"
    if wrap == "lowbit":  # an fp32 lowbit checkpoint works as a weights file too
        save_checkpoint(path, {"kind": "fp32", "state_dict": sd})
    else:
        torch.save(obj, path)
    dst = create_model("resnet8", width=0.5)
    assert not _same(src, dst)
    assert load_weights_(dst, path) is dst
    assert _same(src, dst)


@pytest.mark.parametrize("name", ["w.safetensors", "w.bin"])  # safetensors found by its header too
def test_safetensors_by_suffix_or_header(tmp_path, name):
    src = _source()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / name))
    dst = create_model("resnet8", width=0.5)
    load_weights_(dst, tmp_path / name)
    assert _same(src, dst)


def test_half_precision_file_and_missing_bn_counters(tmp_path):
    src = _source()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()
          if not k.endswith("num_batches_tracked")}  # files from before PyTorch 0.4.1 lack the counters
    save_file(sd, str(tmp_path / "w.safetensors"))
    dst = create_model("resnet8", width=0.5)
    load_weights_(dst, tmp_path / "w.safetensors")
    assert dst.conv1.weight.dtype == torch.float32
    assert torch.equal(dst.conv1.weight, src.conv1.weight.half().float())


def _error(tmp_path, sd, model=None) -> str:
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(LowbitError) as e:
        load_weights_(model or create_model("resnet8", width=0.5), tmp_path / "w.pt")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "w.pt") in msg
    return msg


def test_mismatched_keys_are_named(tmp_path):
    sd = _source().state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(2)
    msg = _error(tmp_path, sd)
    assert "1 missing (fc.bias)" in msg and "1 unexpected (extra.weight)" in msg


def test_many_mismatches_are_capped(tmp_path):
    sd = {f"x{i}": torch.zeros(1) for i in range(10)}
    msg = _error(tmp_path, sd)
    assert "10 unexpected" in msg and "(+7 more)" in msg and "another architecture" in msg


def test_classifier_for_other_classes(tmp_path):
    sd = create_model("resnet8", num_classes=1000, width=0.5).state_dict()
    msg = _error(tmp_path, sd)
    assert "fc.weight [1000, 32] in the file vs [10, 32]" in msg and "1000 classes" in msg


def test_other_architecture(tmp_path):
    msg = _error(tmp_path, create_model("mlp").state_dict())
    assert "another architecture" in msg


@pytest.mark.parametrize("name,content,needle", [
    ("w.pt", b"", "not a readable weights file"),
    ("w.pt", b"garbage" * 10, "not a readable weights file"),
    ("w.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", "not a readable safetensors file"),
])
def test_unreadable_files(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LowbitError, match=needle):
        load_weights_(create_model("mlp"), tmp_path / name)


def test_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(LowbitError, match="no state dict"):
        load_weights_(create_model("mlp"), tmp_path / "t.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "d.pt")
    with pytest.raises(LowbitError, match="found keys epoch, lr"):
        load_weights_(create_model("mlp"), tmp_path / "d.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("EXECUTED",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    torch.save({"state_dict": _Evil()}, tmp_path / "w.pt")
    with pytest.raises(LowbitError, match="does not unpickle"):
        load_weights_(create_model("mlp"), tmp_path / "w.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(LowbitError, match="not a readable weights file"):
        load_weights_(create_model("mlp"), tmp_path / "raw.pkl")
    assert "EXECUTED" not in capsys.readouterr().out


def test_missing_file_and_urls_are_not_fetched(tmp_path):
    with pytest.raises(LowbitError, match="weights file not found"):
        load_weights_(create_model("mlp"), tmp_path / "nope.safetensors")
    with pytest.raises(LowbitError, match="never downloads"):
        load_weights_(create_model("mlp"), "https://download.pytorch.org/models/resnet18-f37072fd.pth")
