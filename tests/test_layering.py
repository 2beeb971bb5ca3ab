"""The import direction: server -> engine -> models, nothing back, and no runtime code importing test or dev code.

Read with `ast`, not by importing, so a lazy import inside a function or a relative import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV_ONLY = {"tests", "benchmarks", "tools"}
# What each runtime package may not import (besides DEV_ONLY).
FORBIDDEN = {"models": {"engine", "server"}, "engine": {"server"}, "server": set()}


def _imported_packages(node: ast.Import | ast.ImportFrom, package: list[str]) -> list[str]:
    """The top-level packages an import statement reaches, relative imports resolved against `package`."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    base = package[: max(0, len(package) - node.level + 1)] if node.level else []
    full = ".".join([*base, *([node.module] if node.module else [])])
    # `from .. import engine` at the top level names the packages themselves.
    return [full.split(".")[0]] if full else [alias.name.split(".")[0] for alias in node.names]


def layering_violations(root: Path) -> list[str]:
    """Every import under root's runtime packages that goes against the direction, as 'file:line: import'."""
    found = []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((root / layer).rglob("*.py")):
            package = list(path.relative_to(root).parent.parts)  # what `from .` means in this file
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                bad = set(_imported_packages(node, package)) & (forbidden | DEV_ONLY)
                if bad:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_catches_each_kind_of_backward_import(tmp_path: Path):
    files = {
        "models/ok.py": "import torch\nfrom models.config import ModelConfig\nfrom . import config\n",
        "models/sub/ok.py": "from .. import config\nfrom ..loader import load\n",
        "models/up.py": "from engine.config import EngineConfig\n",
        "models/sub/rel.py": "def f():\n    from ...server import app\n",
        "models/sub/__init__.py": "from ... import engine\n",
        "engine/up.py": "import server.app\n",
        "engine/ok.py": "from models import loader\nfrom .config import EngineConfig\n",
        "server/dev.py": "from tests.conftest import x\nimport benchmarks.bench_engine\nfrom tools import train_demo\n",
        "server/ok.py": "from engine.engine import Engine\nfrom models.config import ModelConfig\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert layering_violations(tmp_path) == [
        "models/sub/__init__.py:1: from ... import engine",
        "models/sub/rel.py:2: from ...server import app",
        "models/up.py:1: from engine.config import EngineConfig",
        "engine/up.py:1: import server.app",
        "server/dev.py:1: from tests.conftest import x",
        "server/dev.py:2: import benchmarks.bench_engine",
        "server/dev.py:3: from tools import train_demo",
    ]


def test_runtime_imports_go_server_to_engine_to_models():
    assert (ROOT / "engine" / "engine.py").exists()
    assert layering_violations(ROOT) == []
