import pytest

from tests.sensitivity.mixed_helpers import w4a4_run


@pytest.fixture(scope="session")
def w4a4(tmp_path_factory):
    """``(run_dir, data)`` of a trained tiny W4A4 run."""
    return w4a4_run(tmp_path_factory.getbasetemp() / "mixed-w4a4")
