"""Export and runtime are siblings over the IR: neither imports the other, and the IR imports neither.

Checked twice: statically (every import statement of every module, including those inside functions and
``TYPE_CHECKING`` blocks) and dynamically (importing one package in a fresh interpreter loads none of the
other)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit

SRC = Path(lowbit.__file__).resolve().parent
FORBIDDEN = {  # package -> packages it must not import
    "ir": ("lowbit.export", "lowbit.runtime", "lowbit.deploy"),
    "export": ("lowbit.runtime", "lowbit.deploy"),
    "runtime": ("lowbit.export", "lowbit.deploy"),
}


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_no_import_between_export_and_runtime(package):
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(SRC.parent)} imports {m}" for f in files for m in sorted(_imports(f))
           if m.startswith(FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package,other", [("lowbit.export", "lowbit.runtime"), ("lowbit.runtime", "lowbit.export"),
                                           ("lowbit.ir", "lowbit.export"), ("lowbit.ir", "lowbit.runtime")])
def test_importing_one_loads_none_of_the_other(package, other):
    code = f"import sys, {package}; print(sorted(m for m in sys.modules if m.startswith('{other}')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_deploy_sits_above_both():
    imports = set().union(*(_imports(f) for f in (SRC / "deploy").rglob("*.py")))
    assert any(m.startswith("lowbit.export") for m in imports)
    assert any(m.startswith("lowbit.runtime") for m in imports)
