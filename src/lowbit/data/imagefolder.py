"""ImageFolder (ImageNet layout) data through torchvision transforms and a standard DataLoader.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (the ImageNet convention: ``val`` is the
reporting set). A seeded ``val_fraction`` of ``train`` is carved out for selection, as with Fashion-MNIST.
Transforms are the standard ones at ``image_size`` (224): random-resized crop + flip for training; resize to
256/224 of the size + centre crop for evaluation. Each epoch's order and the augmentation seeds come from
(seed, epoch), so a resumed run sees what an uninterrupted one would. Each folder is scanned once: with
ImageNet's 1.28M files a scan takes a while, so the train and validation splits share one listing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.errors import LowbitError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_SEED = 20230131  # as for Fashion-MNIST: every stage of every run selects on the same images


def _tv():
    try:
        import torchvision
    except ImportError:
        raise LowbitError("ImageFolder data needs torchvision: pip install 'lowbit[vision]'") from None
    return torchvision


class _BadImage(Exception):
    """An unreadable image; a plain one-argument exception so DataLoader workers can re-raise it."""


def _load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _BadImage(f"{path}: unreadable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None


class _Images(torch.utils.data.Dataset):
    """(path, label) pairs, read and transformed on access; module level so worker processes can pickle it."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, y = self.samples[i]
        return self.transform(_load_rgb(path)), y


class FolderDataset:
    """A split of an ImageFolder; iterated through a DataLoader by :func:`lowbit.data.iterate`."""

    def __init__(self, base, indices: list[int] | None, train: bool, workers: int = 0, image_size: int = 224):
        T = _tv().transforms
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            resize = round(image_size * 256 / 224)
            tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        self.base = base  # the folder listing (torchvision ImageFolder, no transform), shared between splits
        self.transform = tf
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.num_classes = len(base.classes)
        self.workers = workers
        self.image_size = image_size
        self.train_transform = train

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([self.base.targets[i] for i in self.indices])

    def batches(self, batch_size: int, *, train: bool, seed: int, epoch: int, device, limit: int | None,
                shard: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (x, y) batches; the order (shuffled when ``train``) depends only on (seed, epoch).

        ``limit`` keeps the first examples of that order. ``shard=(rank, world)`` then keeps every world-th
        example from ``rank`` on: the ranks of a data-parallel run get disjoint parts (sizes differing by at
        most one) that together are exactly what one process sees.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx = self.indices
        if train:
            idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        if limit is not None:
            idx = idx[:limit]
        rank = 0
        if shard is not None:
            rank, world = _check_shard(shard)
            idx = idx[rank::world]
        images = _Images([self.base.samples[i] for i in idx], self.transform)
        aug_seed = seed * 1_000_003 + epoch + 7_919 * rank  # ranks must not repeat each other's crops
        torch.manual_seed(aug_seed)  # transforms in the main process (workers=0)
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                             num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(aug_seed),  # worker seeds
                                             pin_memory=torch.device(device).type == "cuda",
                                             persistent_workers=False)
        try:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        except _BadImage as e:  # from a worker the message is a traceback whose last line is ours
            raise LowbitError(str(e).strip().splitlines()[-1].split("_BadImage: ", 1)[-1]) from None


def _check_shard(shard) -> tuple[int, int]:
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise LowbitError(f"shard must be (rank, world), got {shard!r}") from None
    if not 0 <= rank < world:
        raise LowbitError(f"shard (rank {rank}, world {world}) needs 0 <= rank < world")
    return rank, world


def image_folder(root: str | Path, val_fraction: float = 0.02, workers: int = 0, image_size: int = 224,
                 seed: int = SPLIT_SEED):
    """Train/val/test splits of an ImageNet-layout folder (``train/`` and ``val/`` inside ``root``).

    ``workers`` is the DataLoader's number of worker processes (0 = load in this process).
    """
    from lowbit.data.datasets import DataSplits

    tv = _tv()
    root = Path(root)
    train_dir, test_dir = root / "train", root / "val"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise LowbitError(f"{d}: folder not found; ImageFolder data needs {root}/train/<class>/… and "
                              f"{root}/val/<class>/…")
    if not 0 < val_fraction < 1:
        raise LowbitError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if int(image_size) != image_size or image_size < 1:
        raise LowbitError(f"--image-size must be a positive number of pixels, got {image_size}")
    if int(workers) != workers or workers < 0:
        raise LowbitError(f"--workers must be >= 0, got {workers}")
    try:
        base_train = tv.datasets.ImageFolder(str(train_dir))
        base_test = tv.datasets.ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise LowbitError(f"{root}: {str(e).splitlines()[0]}") from None
    if base_train.classes != base_test.classes:
        only = sorted(set(base_train.classes) ^ set(base_test.classes))
        raise LowbitError(f"{root}: train/ and val/ have different class folders ({', '.join(only[:3])} "
                          f"in only one of them)")
    n = len(base_train)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise LowbitError(f"{train_dir}: {n} image(s) are too few to split off a validation fraction of "
                          f"{val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    tr, va = sorted(perm[n_val:]), sorted(perm[:n_val])
    image_size, workers = int(image_size), int(workers)
    return DataSplits(FolderDataset(base_train, tr, True, workers, image_size),
                      FolderDataset(base_train, va, False, workers, image_size),
                      FolderDataset(base_test, None, False, workers, image_size), "imagefolder")
