"""ImageFolder (ImageNet layout) data through torchvision and a standard DataLoader.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (the ImageNet convention: ``val`` is the
reporting set). A seeded ``val_fraction`` of ``train`` is carved out for selection, as with Fashion-MNIST.
Transforms are the standard ones at 224: random-resized crop + flip for training; resize 256 + centre crop
for evaluation. Each epoch's order and the workers' seeds come from a generator seeded by (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.errors import LowbitError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tv():
    try:
        import torchvision
    except ImportError:
        raise LowbitError("ImageFolder data needs torchvision: pip install 'lowbit[vision]'") from None
    return torchvision


class FolderDataset:
    """A split of an ImageFolder; iterated through a DataLoader by :func:`lowbit.data.iterate`."""

    def __init__(self, base, indices: list[int] | None, train: bool, workers: int = 0, image_size: int = 224):
        tv = _tv()
        T = tv.transforms
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        else:
            resize = round(image_size * 256 / 224)
            tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        self.base = tv.datasets.ImageFolder(base.root, transform=tf)
        self.indices = list(range(len(self.base))) if indices is None else indices
        self.num_classes = len(self.base.classes)
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
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx = self.indices
        if train:
            idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        if limit is not None:
            idx = idx[:limit]
        sub = torch.utils.data.Subset(self.base, idx)
        torch.manual_seed(seed * 1_000_003 + epoch)  # transforms in the main process (workers=0)
        loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False,
                                             num_workers=self.workers, generator=g,
                                             pin_memory=torch.device(device).type == "cuda",
                                             persistent_workers=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def image_folder(root: str | Path, val_fraction: float = 0.02, workers: int = 0, image_size: int = 224,
                 seed: int = 20230131):
    """Train/val/test splits of an ImageNet-layout folder (``train/`` and ``val/`` inside ``root``)."""
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
    try:
        base_train = tv.datasets.ImageFolder(str(train_dir))
        base_test = tv.datasets.ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise LowbitError(f"{root}: {str(e).splitlines()[0]}") from None
    if base_train.classes != base_test.classes:
        raise LowbitError(f"{root}: train/ and val/ have different class folders")
    n = len(base_train)
    n_val = max(1, round(val_fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    tr, va = sorted(perm[n_val:]), sorted(perm[:n_val])
    return DataSplits(FolderDataset(base_train, tr, True, workers, image_size),
                      FolderDataset(base_train, va, False, workers, image_size),
                      FolderDataset(base_test, None, False, workers, image_size), f"imagefolder:{root.name}")
