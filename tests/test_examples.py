"""The README's examples run end to end, at small sizes, on data they make themselves."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tabular_mlp_api():
    result = _load("tabular_mlp").main(rows=400, epochs=2)
    assert 0 <= result["fp32"] <= 1 and 0 <= result["w4a4"] <= 1
    assert result["chosen"] and all(result["plan"]["layers"][n] == [2, 2] for n in result["chosen"])


def test_own_cnn_api_exports_bit_exact():
    result = _load("own_cnn").main(n=400, epochs=1)
    assert result["bit_exact"] and result["low_layers"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tabular_cli_script(tmp_path):
    lowbit = Path(sys.executable).with_name("lowbit")
    env = {**os.environ, "ROWS": "400", "EPOCHS": "1", "OUT": str(tmp_path / "tab"), "OMP_NUM_THREADS": "1",
           "LOWBIT": str(lowbit) if lowbit.exists() else f"{sys.executable} -m lowbit"}
    proc = subprocess.run(["bash", str(EXAMPLES / "tabular_cli.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bit-exact on every" in proc.stdout and "lowbit fast path" in proc.stdout
    for run in ("fp32", "w4a4", "sens-eagl", "sens-alps", "frontier"):
        assert (tmp_path / "tab" / run / "config.yaml").exists()
    assert (tmp_path / "tab" / "mixed.lowbit").exists()
