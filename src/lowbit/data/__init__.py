"""Data: Fashion-MNIST (IDX reader), the fixed train/validation split, synthetic data, ImageFolder."""

from lowbit.data.datasets import (
    FMNIST_CLASSES,
    DataSplits,
    TensorDataset,
    augment,
    fashion_mnist,
    iterate,
    normalize,
    num_batches,
    resolve_data_dir,
    split_train_val,
    synthetic,
)
from lowbit.data.idx import read_idx, write_idx

__all__ = [
    "FMNIST_CLASSES", "DataSplits", "TensorDataset", "augment", "fashion_mnist", "get_data", "iterate",
    "normalize", "num_batches", "read_idx", "resolve_data_dir", "split_train_val", "synthetic", "write_idx",
]


def get_data(name: str = "fashion-mnist", data_dir=None, **kw) -> DataSplits:
    """Data set by name: ``fashion-mnist`` (default), ``synthetic`` (tests, smoke runs) or ``imagefolder``."""
    from lowbit.errors import LowbitError

    if name in ("fashion-mnist", "fmnist"):
        return fashion_mnist(data_dir, **kw)
    if name == "synthetic":
        return synthetic(**kw)
    if name == "imagefolder":
        from lowbit.data.imagefolder import image_folder

        if not data_dir:
            raise LowbitError("--data imagefolder needs --data-dir pointing at a folder with train/ and val/")
        return image_folder(data_dir, **kw)
    raise LowbitError(f"unknown data set {name!r}; choose fashion-mnist, synthetic or imagefolder")
