"""Tiny BERT encoders (2 layers, hidden 32) built from a config: nothing is downloaded.

Each test module skips itself without transformers (``pytest.importorskip``; a conftest cannot skip)."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a config; nothing may be fetched

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bert():
    import tiny_bert

    return tiny_bert.make_model(seed=0)


@pytest.fixture(scope="session")
def splits():
    import tiny_bert

    from lowbit.data import DataSplits

    return DataSplits(*tiny_bert.make_data(n_train=256, n_val=64, n_test=64, seq_len=16))


@pytest.fixture
def batch(splits):
    from torch.utils.data import default_collate

    return default_collate([splits.train[i] for i in range(16)])
