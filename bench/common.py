"""Shared helpers of the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from lowbit.io import atomic_write_text, save_json

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count, ISA flags that matter for int8/bf16 kernels, torch build: attach to every result."""
    flags, model = set(), platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
        m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]
    return {
        "cpu": model,
        "cores": torch.get_num_threads(),
        "isa_flags": {f: f in flags for f in wanted},
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    on = [f for f, v in m["isa_flags"].items() if v]
    load = m.get("load_average_1m")
    return (f"{m['cpu']}, {m['cores']} threads, torch {m['torch']} (capability {m['cpu_capability']}), "
            f"flags: {', '.join(on) or 'none of interest'}"
            + (f"; 1-minute load average when written: {load:.1f}" if load is not None else ""))


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / f"{name}.json", payload)
    atomic_write_text(RESULTS / f"{name}.md", markdown)
