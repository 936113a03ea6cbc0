import gzip

import numpy as np
import pytest

from lowbit.data import fashion_mnist, read_idx, write_idx
from lowbit.data.datasets import FMNIST_FILES
from lowbit.errors import LowbitError


def _fake_fmnist(tmp_path, n_train=50, n_test=20):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / FMNIST_FILES["train_images"], rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(tmp_path / FMNIST_FILES["train_labels"], rng.integers(0, 10, n_train))
    write_idx(tmp_path / FMNIST_FILES["test_images"], rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(tmp_path / FMNIST_FILES["test_labels"], rng.integers(0, 10, n_test))
    return tmp_path


def test_round_trip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx", a, compress=False), expect_ndim=3), a)


@pytest.mark.parametrize("corrupt", ["magic", "length", "truncated_gzip", "dtype", "ndim", "empty"])
def test_malformed_files_give_one_clear_error(tmp_path, corrupt):
    good = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(range(5))
    data = {
        "magic": gzip.compress(b"\x12\x34" + good[2:]),
        "length": gzip.compress(good[:-2]),
        "truncated_gzip": gzip.compress(good)[:-6],
        "dtype": gzip.compress(bytes([0, 0, 0x0D, 1]) + good[4:]),
        "ndim": gzip.compress(good),
        "empty": b"",
    }[corrupt]
    p = tmp_path / "f.gz"
    p.write_bytes(data)
    with pytest.raises(LowbitError) as e:
        read_idx(p, expect_ndim=3 if corrupt == "ndim" else 1)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg and "--data-dir" in msg


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        fashion_mnist(tmp_path / "nope")
    d = _fake_fmnist(tmp_path)
    (d / FMNIST_FILES["test_labels"]).unlink()
    with pytest.raises(LowbitError, match="t10k-labels"):
        fashion_mnist(d, val_size=10)


def test_label_image_count_mismatch(tmp_path):
    d = _fake_fmnist(tmp_path)
    write_idx(d / FMNIST_FILES["train_labels"], np.zeros(7))
    with pytest.raises(LowbitError, match="belong together"):
        fashion_mnist(d, val_size=10)


def test_data_dir_env_var(tmp_path, monkeypatch):
    d = _fake_fmnist(tmp_path)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(d))
    s = fashion_mnist(None, val_size=10)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert s.train.images.shape[1:] == (1, 28, 28)
