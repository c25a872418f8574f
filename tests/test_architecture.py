"""Dependencies point one way (docs/design.md, "Layers"): cli -> distributed -> extract / train / infer -> backbone, store, methods, data.

The import-linter contracts live in pyproject.toml ([tool.importlinter]); these tests run them and check
the two rules a static graph cannot see: what a fresh interpreter really loads, and the CLI package,
which is installed from another directory (cli/ mapped to featcache.cli).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    "modules",
    [
        ["featcache.store"],
        ["featcache.methods"],
        ["featcache.training"],
        ["featcache.augment"],
        ["featcache.store.reader", "featcache.store.writer", "featcache.checkpoint"],
    ],
)
def test_store_methods_and_training_load_no_timm_and_no_backbone(modules: list[str]) -> None:
    code = (
        f"import sys, json\nfor m in {modules!r}: __import__(m)\n"
        "print(json.dumps([m for m in ('timm', 'featcache.backbone', 'featcache.extraction', 'featcache.cli') "
        "if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_library_module_imports_the_cli(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"  # the scan itself sees both import forms
    probe.write_text("import featcache.cli.app\nfrom featcache.cli.options import print_json\n")
    assert _imported_modules(probe) == {"featcache.cli.app", "featcache.cli.options"}
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.startswith("featcache.cli"))
        for p in (ROOT / "featcache").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
