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


FMNIST_TRAIN_SIZE = 60_000


def get_data(name: str = "fashion-mnist", data_dir=None, *, val_fraction: float | None = None,
             image_size: int | None = None, workers: int = 0, **kw) -> DataSplits:
    """Data set by name: ``fashion-mnist`` (default), ``synthetic`` (tests, smoke runs) or ``imagefolder``.

    ``val_fraction`` (share of the training images held out for selection) and ``image_size`` default to the
    data set's own (Fashion-MNIST: 5,000 of 60,000 at 28×28; ImageFolder: 2% at 224). ``workers`` sizes the
    ImageFolder DataLoader; in-memory sets need none. An option a data set cannot honour is an error rather
    than silently ignored, so a run's config.yaml says what it used.
    """
    from lowbit.errors import LowbitError

    if val_fraction is not None and not 0 < val_fraction < 1:
        raise LowbitError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if name == "imagefolder":
        from lowbit.data.imagefolder import image_folder

        if not data_dir:
            raise LowbitError("--data imagefolder needs --data-dir pointing at a folder with train/ and val/")
        opts = {k: v for k, v in (("val_fraction", val_fraction), ("image_size", image_size)) if v is not None}
        return image_folder(data_dir, workers=workers, **opts, **kw)
    if name not in ("fashion-mnist", "fmnist", "synthetic"):
        raise LowbitError(f"unknown data set {name!r}; choose fashion-mnist, synthetic or imagefolder")
    if image_size is not None:
        raise LowbitError(f"--image-size applies to --data imagefolder; {name} has fixed-size images")
    if name == "synthetic":
        if val_fraction is not None:
            raise LowbitError("--val-fraction does not apply to --data synthetic (fixed split sizes)")
        return synthetic(**kw)
    if val_fraction is not None:
        kw["val_size"] = max(1, round(val_fraction * FMNIST_TRAIN_SIZE))
    return fashion_mnist(data_dir, **kw)
