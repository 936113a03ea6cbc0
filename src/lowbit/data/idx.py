"""Reader for the IDX files of (Fashion-)MNIST, without torchvision.

IDX layout (LeCun's MNIST page): big-endian magic ``0x0000 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes,
then the raw array. We accept only unsigned bytes (dtype 0x08), the only type these data sets use.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

_FIX = ("reinstall Debian's dataset-fashion-mnist or point --data-dir / $LOWBIT_DATA_DIR at the four "
        "original IDX .gz files")


def read_idx(path: str | Path, expect_ndim: int | None = None, fix: str = _FIX) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array; malformed files raise LowbitError ending in
    ``fix``, what the user should do (the data set's files by default)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LowbitError(f"{path}: file not found; {fix}") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read ({e.strerror}); {fix}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise LowbitError(f"{path}: corrupt or truncated gzip ({e}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise LowbitError(f"{path}: wrong magic number, not an IDX file; {fix}")
    dtype, ndim = raw[2], raw[3]
    if dtype != 0x08:
        raise LowbitError(f"{path}: IDX element type 0x{dtype:02x} is not unsigned byte; {fix}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise LowbitError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}; {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LowbitError(f"{path}: truncated IDX header; {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(shape)) if shape else 0
    if len(raw) - header != n:
        raise LowbitError(f"{path}: IDX payload is {len(raw) - header} bytes, header says {n} "
                          f"(shape {shape}); {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as IDX (used by tests and by users converting their own data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path
