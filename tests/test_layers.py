"""The package's layer contracts (pyproject's [tool.importlinter]): a module imports only from layers below it,
and runtime/export read a quantized layer through its public accessors, never its private names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tmpq"


def test_import_layers_are_kept():
    pytest.importorskip("importlinter")
    cli = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run(
        [str(cli), "--no-cache", "--config", str(SRC.parents[1] / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=SRC.parents[1],
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("package", ["runtime", "search", "export.py", "compressed.py", "api.py", "cli.py"])
def test_no_reaching_into_another_packages_private_names(package):
    """`from tmpq.x import _name` or `obj._method(` on another package's object: use its public API instead."""
    files = [SRC / package] if package.endswith(".py") else sorted((SRC / package).glob("*.py"))
    offences = []
    for f in files:
        text = f.read_text()
        offences += [f"{f.name}: {m}" for m in re.findall(r"from tmpq\.[\w.]+ import [^\n]*\b_[a-z]\w*", text)]
        offences += [f"{f.name}: {m}" for m in re.findall(r"\b(?:sn|supernet|twin|unit)\._[a-z]\w*\(", text)]
    assert not offences, offences
