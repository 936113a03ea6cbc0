"""Data sets as in-memory tensors, the fixed train/validation split, and batch iteration.

Small image sets (Fashion-MNIST, synthetic) live in memory as uint8 tensors and are normalised and augmented
per batch with vectorised torch ops: on a 2-core CPU this is much faster than a per-sample DataLoader. Each
epoch's order and augmentation come from a generator seeded by (seed, epoch), which is what makes a resumed
run identical to an uninterrupted one. ImageFolder data goes through a standard DataLoader (see imagefolder.py).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.data.idx import read_idx
from lowbit.data.protocol import check_source, head, is_builtin, split_batch, user_batches, user_num_batches
from lowbit.errors import LowbitError

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Per-pixel statistics of the Fashion-MNIST training images (pixel values in [0, 1]).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VAL_SIZE = 5000
SPLIT_SEED = 20230131  # fixed: every stage of every run selects on the same validation images


@dataclass
class TensorDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64, plus how to normalise and augment them.

    ``augmentation`` is this set's own training augmentation (``FitConfig.augmentation=None`` uses it):
    flips for Fashion-MNIST and the synthetic set, none for anything else, so a user's data is never flipped
    unless asked.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float
    num_classes: int
    augmentation: str = "none"

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> TensorDataset:
        return TensorDataset(self.images[index], self.labels[index], self.mean, self.std, self.num_classes,
                             self.augmentation)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


@dataclass
class DataSplits:
    """Train, validation and (optional, report-only) test splits; each any source of :mod:`.protocol`."""

    train: Any
    val: Any
    test: Any = None
    name: str = "custom"

    def __post_init__(self):
        for split in ("train", "val"):
            check_source(getattr(self, split), split)
        if self.test is not None:
            check_source(self.test, "test")

    @property
    def num_classes(self) -> int | None:
        return getattr(self.train, "num_classes", None)

    def example(self, n: int = 1) -> Any:
        """The inputs of the first ``n`` validation examples (a tensor, tuple or dict), to trace or profile."""
        batch = next(iter(iterate(self.val, n, limit=n, device=None)), None)
        if batch is None:
            raise LowbitError("the validation split is empty")
        return head(split_batch(batch)[0], n)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Per-example input shape: the set's own, else the first validation batch's (tensor inputs only)."""
        shape = getattr(self.train, "input_shape", None)
        if shape is not None:
            return tuple(shape)
        inputs, _ = split_batch(next(iter(iterate(self.val, 1, limit=1, device=None))))
        return tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) else None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Search order: ``--data-dir``, ``$LOWBIT_DATA_DIR``, Debian's install location."""
    for cand in (data_dir, os.environ.get("LOWBIT_DATA_DIR"), DEFAULT_FMNIST_DIR):
        if cand:
            return Path(cand)
    return Path(DEFAULT_FMNIST_DIR)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    root = resolve_data_dir(data_dir)
    if not root.is_dir():
        raise LowbitError(f"Fashion-MNIST folder {root} not found; install Debian's dataset-fashion-mnist "
                          f"('make data' does it) or pass --data-dir / set LOWBIT_DATA_DIR")
    arrays = {}
    for key, fname in FMNIST_FILES.items():
        arrays[key] = read_idx(root / fname, expect_ndim=3 if "images" in key else 1)
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise LowbitError(f"{root}: {part} set has {n_img} images but {n_lab} labels; the files do not "
                              f"belong together")
        if arrays[f"{part}_labels"].size and arrays[f"{part}_labels"].max() >= 10:
            raise LowbitError(f"{root / FMNIST_FILES[f'{part}_labels']}: labels outside 0..9")
    return arrays


def split_train_val(n: int, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed, seeded split of the training set; validation is for selection, test only for reporting."""
    if not 0 < val_size < n:
        raise LowbitError(f"validation size {val_size} must be between 1 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def fashion_mnist(data_dir: str | os.PathLike | None = None, val_size: int = VAL_SIZE) -> DataSplits:
    a = load_fashion_mnist(data_dir)
    full = TensorDataset(torch.from_numpy(a["train_images"].copy()).unsqueeze(1),
                         torch.from_numpy(a["train_labels"].astype(np.int64)), FMNIST_MEAN, FMNIST_STD, 10)
    test = TensorDataset(torch.from_numpy(a["test_images"].copy()).unsqueeze(1),
                         torch.from_numpy(a["test_labels"].astype(np.int64)), FMNIST_MEAN, FMNIST_STD, 10)
    tr, va = split_train_val(len(full), val_size)
    train = full.subset(tr)
    train.augmentation = "flip"  # see the README: flips help at our budget, crops do not
    return DataSplits(train, full.subset(va), test, "fashion-mnist")


def synthetic(n_train: int = 512, n_val: int = 128, n_test: int = 128, num_classes: int = 10,
              shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0) -> DataSplits:
    """A small learnable data set for tests: each class is a fixed random template plus noise.

    Templates are smooth (a 7×7 pattern upsampled) and mirror-symmetric, so the training augmentation (small
    crops, horizontal flips) keeps each class recognisable.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((num_classes, shape[0], 7, 7), generator=g)
    templates = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    templates = templates + templates.flip(-1)
    templates = (templates - templates.mean()) / templates.std()  # zero mean, unit contrast

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 128 + 60 * templates[y] + 40 * torch.randn((n, *shape), generator=g)
        x = x.clamp(0, 255).round().to(torch.uint8)
        return TensorDataset(x, y, 0.5, 0.25, num_classes)

    train = make(n_train)
    train.augmentation = "flip"
    return DataSplits(train, make(n_val), make(n_test), "synthetic")


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, vectorised over the batch (x: B, C, H, W)."""
    B, _, H, W = x.shape
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g)  # drawn even for pad 0: the same random stream
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(H)[None, :])[:, None, :, None]  # B, 1, H, 1
        cols = (dx[:, None] + torch.arange(W)[None, :])[:, None, None, :]  # B, 1, 1, W
        bidx = torch.arange(B)[:, None, None, None]
        out = xp[bidx, torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    else:  # flips only: the crop of an unpadded image is the image (a gather saved per batch)
        out = x
    if flip:
        mask = torch.rand(B, generator=g) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


AUGMENTATIONS = ("crop+flip", "flip", "none")


def iterate(ds: Any, batch_size: int, *, train: bool = False, seed: int = 0, epoch: int = 0,
            device: str | torch.device | None = "cpu", limit: int | None = None, augmentation: str | None = None,
            shard: tuple[int, int] | None = None) -> Iterator[Any]:
    """Yield batches of any source (:mod:`lowbit.data.protocol`); lowbit's image sets give normalised (x, y).

    Training order and augmentation depend only on (seed, epoch). ``augmentation`` (None: the set's own)
    applies to lowbit's in-memory image sets only; asking for it on other data is an error, never a silent
    change to a user's inputs.

    ``limit`` caps the number of examples (a fraction of an epoch, e.g. for ALPS or calibration). ``shard=(rank,
    world)`` keeps ``order[rank::world]`` of those examples: every rank draws the same order, so the shards are
    disjoint and together cover the epoch (data-parallel training; batches then hold ``batch_size`` examples of
    this rank's shard). Data sets that are not in memory (ImageFolder) provide their own ``batches`` with the
    same contract; one whose ``batches`` takes no ``shard`` cannot be split over ranks.
    """
    if shard is not None:
        r, w = shard
        if not 0 <= r < w:
            raise LowbitError(f"shard {shard}: need 0 <= rank < world size")
    if not is_builtin(ds):
        if train and augmentation not in (None, "none"):
            raise LowbitError(f"augmentation {augmentation!r} applies to lowbit's image sets; augment your own "
                              "data in its Dataset (or leave augmentation unset)")
        yield from user_batches(ds, batch_size, train=train, seed=seed, epoch=epoch, device=device, limit=limit,
                                shard=shard)
        return
    if hasattr(ds, "batches"):
        kw = {}
        if shard is not None and shard[1] > 1:
            if "shard" not in inspect.signature(ds.batches).parameters:
                raise LowbitError(f"{type(ds).__name__} cannot be split over torchrun ranks (its batches() takes "
                                  "no shard); run this data set in one process, without torchrun")
            kw["shard"] = shard
        yield from ds.batches(batch_size, train=train, seed=seed, epoch=epoch, device=device, limit=limit, **kw)
        return
    augmentation = ds.augmentation if augmentation is None else augmentation
    if augmentation not in AUGMENTATIONS:
        raise LowbitError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if train and augmentation != "none" and ds.labels.ndim > 1:
        raise LowbitError(f"augmentation {augmentation!r} moves pixels but not per-pixel labels "
                          f"{tuple(ds.labels.shape[1:])}; use augmentation='none' for dense targets")
    n = len(ds) if limit is None else min(limit, len(ds))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(ds), generator=g)[:n] if train else torch.arange(n)
    if shard is not None and shard[1] > 1:
        order = order[shard[0]::shard[1]]
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1009 + shard[0])  # ranks augment apart
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = ds.images[idx].float() / 255.0
        if train and augmentation != "none":  # in pixel space, so crop padding is black like the background
            x = augment(x, g, pad=2 if augmentation == "crop+flip" else 0)
        x = (x - ds.mean) / ds.std
        y = ds.labels[idx]
        yield (x, y) if device is None else (x.to(device, non_blocking=True), y.to(device, non_blocking=True))


def num_batches(ds: Any, batch_size: int, limit: int | None = None) -> int:
    if not is_builtin(ds):
        return user_num_batches(ds, batch_size, limit)
    n = len(ds) if limit is None else min(limit, len(ds))
    return (n + batch_size - 1) // batch_size
