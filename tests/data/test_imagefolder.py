"""ImageFolder data on a tiny synthetic folder: splits, transforms, sharding, layouts, and the CLI end to end.

Every image is one solid colour whose red channel encodes its index (R = 10 + 10·k), so any crop or resize
keeps it readable and a batch tells exactly which images it holds.
"""

import json

import pytest
import torch

pytest.importorskip("torchvision")

from lowbit.cli import main  # noqa: E402
from lowbit.data import get_data, iterate  # noqa: E402
from lowbit.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402

CLASSES, PER_CLASS, PER_CLASS_VAL = 3, 6, 2


def _write(root, split, per_class, start=0):
    from PIL import Image

    k = start
    for c in range(CLASSES):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (48, 40), (10 + 10 * k, 80 * c, 128)).save(d / f"{i}.png")
            k += 1
    return k


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    n = _write(root, "train", PER_CLASS)
    _write(root, "val", PER_CLASS_VAL, start=n)
    return root


def _ids(x: torch.Tensor) -> list[int]:
    """Image index from the red channel of a normalised batch."""
    red = (x[:, 0].mean((1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    return ((red - 10) / 10).round().long().tolist()


def _all(ds, **kw):
    xs, ys = zip(*iterate(ds, 4, **kw), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_splits_are_seeded_disjoint_and_sized(folder):
    a = get_data("imagefolder", folder, val_fraction=0.25, image_size=32)
    b = get_data("imagefolder", folder, val_fraction=0.25, image_size=32)
    n = CLASSES * PER_CLASS
    assert len(a.val) == round(0.25 * n) and len(a.train) == n - len(a.val) and len(a.test) == CLASSES * PER_CLASS_VAL
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices
    assert not set(a.train.indices) & set(a.val.indices)
    assert sorted(a.train.indices + a.val.indices) == list(range(n))
    assert a.num_classes == CLASSES and a.input_shape == (3, 32, 32) and a.name == "imagefolder"
    assert len(get_data("imagefolder", folder, val_fraction=0.5).val) == n // 2


def test_images_are_resized_cropped_and_normalised(folder):
    data = get_data("imagefolder", folder, val_fraction=0.25, image_size=32)
    for ds, train in ((data.train, True), (data.val, False), (data.test, False)):
        x, y = _all(ds, train=train)
        assert x.shape == (len(ds), 3, 32, 32) and x.dtype == torch.float32
        ids = _ids(x)
        assert sorted(ids) == sorted(ds.indices) if ds is not data.test else sorted(ids) == list(range(18, 24))
        want = torch.tensor([(10 + 10 * k) / 255 for k in ids])
        assert torch.allclose(x[:, 0, 0, 0], (want - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5)
        assert torch.allclose(x[:, 2], torch.full_like(x[:, 2], (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]),
                              atol=1e-5)
        assert y.tolist() == [k % (CLASSES * PER_CLASS) // (PER_CLASS if k < 18 else PER_CLASS_VAL) for k in ids]
    assert _ids(_all(data.val)[0]) == data.val.indices  # evaluation keeps the folder order


def test_training_order_depends_only_on_seed_and_epoch(folder):
    ds = get_data("imagefolder", folder, image_size=16).train
    order = [_ids(_all(ds, train=True, seed=s, epoch=e)[0]) for s, e in ((0, 0), (0, 0), (0, 1), (1, 0))]
    assert order[0] == order[1] and order[0] != order[2] and order[0] != order[3]
    assert _ids(_all(ds, train=True, limit=5)[0]) == order[0][:5]


@pytest.mark.parametrize("world,limit", [(2, None), (3, None), (4, 7)])
def test_shards_are_disjoint_and_cover_the_epoch(folder, world, limit):
    ds = get_data("imagefolder", folder, image_size=16).train
    full = _ids(_all(ds, train=True, seed=3, epoch=2, limit=limit)[0])
    shards = [_ids(_all(ds, train=True, seed=3, epoch=2, limit=limit, shard=(r, world))[0]) for r in range(world)]
    assert [full[r::world] for r in range(world)] == shards
    assert sorted(sum(shards, [])) == sorted(full) and max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(LowbitError, match="rank"):
        list(ds.batches(4, train=True, seed=0, epoch=0, device="cpu", limit=None, shard=(world, world)))


def test_workers_reach_the_data_loader(folder):
    data = get_data("imagefolder", folder, image_size=16, workers=1)
    assert data.train.workers == data.val.workers == data.test.workers == 1
    assert _ids(_all(data.val)[0]) == data.val.indices  # through one worker process


def _layout(tmp_path, train=(("a", 2), ("b", 2)), val=(("a", 1), ("b", 1))):
    from PIL import Image

    for split, classes in (("train", train), ("val", val)):
        (tmp_path / split).mkdir(exist_ok=True)
        for c, n in classes:
            (tmp_path / split / c).mkdir()
            for i in range(n):
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("case,needle", [
    ("no_val", "val: folder not found"),
    ("no_classes", "class folder"),
    ("empty_class", "no valid file"),
    ("other_classes", "different class folders (b, c in only one"),
    ("too_few", "too few to split"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, case, needle):
    import shutil

    if case == "no_classes":
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
    elif case == "empty_class":
        _layout(tmp_path, train=(("a", 2), ("b", 0)))
    elif case == "other_classes":
        _layout(tmp_path, val=(("a", 1), ("c", 1)))
    elif case == "too_few":
        _layout(tmp_path, train=(("a", 1),), val=(("a", 1),))
    else:
        shutil.rmtree(_layout(tmp_path) / "val")
    with pytest.raises(LowbitError) as e:
        get_data("imagefolder", tmp_path)
    assert needle.lower() in str(e.value).lower() and "\n" not in str(e.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, workers):
    _layout(tmp_path)
    (tmp_path / "val" / "a" / "0.png").write_bytes(b"not a png")
    data = get_data("imagefolder", tmp_path, workers=workers)
    with pytest.raises(LowbitError) as e:
        _all(data.test)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "val" / "a" / "0.png")) and "unreadable image" in msg and "\n" not in msg


def test_bad_options(folder):
    for kw, needle in (({"val_fraction": 0.0}, "--val-fraction"), ({"image_size": 0}, "--image-size"),
                       ({"workers": -1}, "--workers")):
        with pytest.raises(LowbitError, match=needle):
            get_data("imagefolder", folder, **kw)


def _cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_train_then_quantize_through_the_cli(folder, tmp_path, capsys):
    common = ["--data", "imagefolder", "--data-dir", str(folder), "--val-fraction", "0.25", "--batch-size", "7",
              "--quiet"]
    _cli(["train", "--model", "tv:resnet18", "--image-size", "32", "--epochs", "1", "--lr", "0.01", *common,
          "--out", str(tmp_path / "fp")], capsys)
    ckpt = torch.load(tmp_path / "fp" / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "fp32" and ckpt["epoch"] == 1
    assert ckpt["spec"]["input_shape"] == [3, 32, 32] and ckpt["spec"]["num_classes"] == CLASSES
    summary = json.loads((tmp_path / "fp" / "summary.json").read_text())
    assert summary["data"] == "imagefolder" and 0 <= summary["test_acc"] <= 1
    # no --image-size: quantize and eval take the run's 32 pixels
    out = _cli(["quantize", "--from", str(tmp_path / "fp"), "--bits", "w4a4", "--epochs", "0.5", *common,
                "--out", str(tmp_path / "q")], capsys)
    assert "w4a4" in out
    q = torch.load(tmp_path / "q" / "checkpoint.pt", weights_only=True)
    assert q["kind"] == "quantized" and [r["examples"] for r in map(json.loads, (tmp_path / "q" / "metrics.jsonl")
                                                                      .read_text().splitlines())] == [7]
    out = _cli(["eval", "--from", str(tmp_path / "q"), *common], capsys)
    assert f"({CLASSES * PER_CLASS_VAL} images)" in out
    assert main(["eval", "--from", str(tmp_path / "q"), "--data", "synthetic"]) == 2
    assert "(--data imagefolder)" in capsys.readouterr().err


def test_pretrained_weights_zero_epochs_then_quantize(folder, tmp_path, capsys):
    from lowbit.models import create_model

    src = create_model("tv:resnet18", num_classes=CLASSES).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "r18.pt")
    common = ["--data", "imagefolder", "--data-dir", str(folder), "--image-size", "32", "--quiet"]
    _cli(["train", "--model", "tv:resnet18", "--weights", str(tmp_path / "r18.pt"), "--epochs", "0", *common,
          "--out", str(tmp_path / "fp")], capsys)
    ckpt = torch.load(tmp_path / "fp" / "checkpoint.pt", weights_only=True)
    assert ckpt["kind"] == "fp32" and ckpt["epoch"] == 0
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    summary = json.loads((tmp_path / "fp" / "summary.json").read_text())
    assert {"val_acc", "test_acc"} <= set(summary) and summary["weights"] == str(tmp_path / "r18.pt")
    _cli(["quantize", "--from", str(tmp_path / "fp"), "--bits", "w8a8", "--epochs", "0", *common,
          "--out", str(tmp_path / "q")], capsys)
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["epochs"] == 0
