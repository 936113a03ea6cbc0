"""Tests that depend on the CPU's int8 instructions run under every capability, forced instead of read from the
machine, so they pass alike on AVX2-only, AVX512-VNNI and AMX machines."""

import pytest

from lowbit.runtime.fastpath import CAPABILITIES, forced_capability


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """The capability fast models and latency tables assume inside the test: avx2, vnni, amx in turn."""
    with forced_capability(request.param) as cap:
        yield cap
