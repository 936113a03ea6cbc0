import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lowbit", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("lowbit")

# Tiny models run faster on one thread, and two OpenMP threads on a busy 2-core machine spin-wait badly.
torch.set_num_threads(1)

FMNIST_DIR = os.environ.get("LOWBIT_DATA_DIR", "/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
