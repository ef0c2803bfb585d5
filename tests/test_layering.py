"""scripts/check_layers.py: clean on a tree that follows the declared direction, one line per violation on a tree
that breaks it (relative, function-level and type-only imports, the core, cycles), and clean on this repository."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_layers.py"

_spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
check_layers = sys.modules.setdefault("check_layers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check_layers)  # registered first: its dataclasses look their module up

SETUP = """
FOLDERS = {
    "nectar": "core",
    "nectar.wire": "wire",
    "nectar.models": "models",
    "nectar.node": "node",
    "nectar.client": "client",
    "nectar.ledger": "ledger",
    "nectar.chain": "chain",
    "nectar.api": "api",
    "nectar.service": "service",
}
"""

# Follows the direction: transitive imports (api -> wire), foundation modules from every package, relative imports
# inside a package, the core importing anything, and a function-level import that is no cycle.
GOOD = {
    "core/__init__.py": "",
    "core/paths.py": "import os\n",
    "core/settings.py": "from nectar import paths\n",
    "core/cli.py": "from nectar.api import app\nfrom nectar.ledger import service\nfrom nectar.node import server\n",
    "wire/__init__.py": "",
    "wire/protocol.py": "from nectar.paths import *\n",
    "models/__init__.py": "from .span import load_span\n",
    "models/span.py": "import torch\nfrom nectar import settings\n",
    "node/__init__.py": "",
    "node/server.py": "from nectar.wire import protocol\nfrom . import backend\n",
    "node/backend.py": "from ..models import span\n\ndef run():\n    from nectar.node import handler\n",
    "node/handler.py": "from nectar.wire.protocol import ErrorCode\n",
    "client/__init__.py": "",
    "client/model.py": "from nectar.models import load_span\nfrom nectar.wire import protocol\n",
    "chain/__init__.py": "",
    "chain/client.py": "import nectar.wire.protocol\n",
    "service/__init__.py": "",
    "service/db.py": "import sqlalchemy\n",
    "ledger/__init__.py": "",
    "ledger/service.py": "from nectar.chain import client\nfrom nectar.service import db\nimport nectar.models.span\n",
    "api/__init__.py": "",
    "api/app.py": "from nectar.client import model\nfrom nectar.wire import protocol\nimport nectar.chain.client\n",
}

# Each entry: a file's text and the line the check must print for it (None: the file only builds a cycle).
BAD = {
    "api/market.py": (
        "import os\nfrom nectar.ledger import service\n",
        "api/market.py:2: package api imports package ledger (api -> ledger is not allowed; "
        "allowed: chain, client, models, service, wire and the foundation modules)",
    ),
    "node/payments.py": (  # a relative import that leaves the package
        "from ..ledger.service import Policy\n",
        "node/payments.py:1: package node imports package ledger (node -> ledger is not allowed; "
        "allowed: models, wire and the foundation modules)",
    ),
    "client/routing.py": (  # inside a function
        "def pick():\n    import nectar.node.server\n",
        "client/routing.py:2: package client imports package node (client -> node is not allowed; "
        "allowed: models, wire and the foundation modules)",
    ),
    "wire/types.py": (  # type-only
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nectar.models.span import Span\n",
        "wire/types.py:3: package wire imports package models (wire -> models is not allowed; "
        "allowed: nothing of ours and the foundation modules)",
    ),
    "core/deployment.py": (  # a foundation module may import only wire and the other foundation modules
        "from nectar.wire import protocol\nfrom nectar.chain import client\n",
        "core/deployment.py:2: package nectar.deployment imports package chain (nectar.deployment -> chain is not "
        "allowed; allowed: wire and the other foundation modules)",
    ),
    "models/attention.py": ("from nectar.models import layout\n", None),
    "models/layout.py": (
        "def build():\n    from nectar.models.attention import kernel\n",
        "models/attention.py:1: import cycle in package models: nectar.models.attention -> nectar.models.layout -> "
        "nectar.models.attention (imports at models/attention.py:1, models/layout.py:2 (function); move the shared "
        "part into a module both import, or pass the object in)",
    ),
    "ledger/policy.py": (  # with node/payments.py: a cycle between packages
        "from nectar.node.server import Server\n",
        "ledger/policy.py:1: package ledger imports package node (ledger -> node is not allowed; "
        "allowed: chain, models, service, wire and the foundation modules)",
    ),
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    (root / "setup.py").write_text(SETUP)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def run_script(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, timeout=120
    )


def test_a_tree_that_follows_the_direction_passes(tmp_path):
    root = write_tree(tmp_path, GOOD)
    result = run_script(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_each_violation_is_reported_once_with_its_file_and_line(tmp_path):
    root = write_tree(tmp_path, {**GOOD, **{name: text for name, (text, _) in BAD.items()}})
    result = run_script(root)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    expected = [line for _, line in BAD.values() if line is not None]
    for line in expected:
        assert line in lines, f"missing:\n{line}\n\ngot:\n{result.stdout}"
    package_cycles = [line for line in lines if "import cycle between packages" in line]
    assert package_cycles == ["ledger/policy.py:1: import cycle between packages: ledger -> node -> ledger"]
    assert len(lines) == len(expected) + 1, result.stdout
    assert "layering violation(s)" in result.stderr


def test_a_package_importing_the_composition_root_breaks_the_direction_and_closes_a_cycle(tmp_path):
    files = {**GOOD, "chain/cli.py": "import importlib\nmodule = importlib.import_module('nectar.cli')\n"}
    lines = [violation.render(tmp_path) for violation in check_layers.check(write_tree(tmp_path, files))]
    assert lines == [
        "chain/cli.py:2: package chain imports package nectar.cli (chain -> nectar.cli is not allowed; "
        "allowed: wire and the foundation modules)",
        "api/app.py:3: import cycle between packages: api -> chain -> nectar -> api (also in this cycle: ledger)",
    ]


def test_wire_importing_a_foundation_module_that_imports_wire_is_a_cycle(tmp_path):
    files = {
        **GOOD,
        "core/deployment.py": "from nectar.wire import protocol\n",
        "wire/eip712.py": "import nectar.deployment\n",
    }
    lines = [violation.render(tmp_path) for violation in check_layers.check(write_tree(tmp_path, files))]
    assert lines == [
        "core/deployment.py:1: import cycle between packages: nectar.deployment -> wire -> nectar.deployment"
    ]


def test_module_level_cycles_leave_out_function_and_type_only_imports(tmp_path):
    files = {
        **GOOD,
        "node/batching.py": "from nectar.node import graphs\n",
        "node/graphs.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nectar.node import batching\n",
    }
    root = write_tree(tmp_path, files)
    every_import = check_layers.check(root)
    assert [v.message.split(" (")[0] for v in every_import] == [
        "import cycle in package node: nectar.node.batching -> nectar.node.graphs -> nectar.node.batching"
    ]
    assert check_layers.check(root, module_level_cycles=True) == []
    # A cycle that runs at import time is reported either way.
    (root / "node/graphs.py").write_text("from nectar.node.batching import Runner\n")
    assert len(check_layers.check(root, module_level_cycles=True)) == 1


def test_from_package_import_name_depends_on_the_submodule_or_the_package(tmp_path):
    modules = {
        "nectar.node": (tmp_path, True),
        "nectar.node.trace": (tmp_path, False),
        "nectar.ledger": (tmp_path, True),
    }
    source = tmp_path / "x.py"
    source.write_text("from nectar.node import trace, Server\nfrom ...ledger import LedgerClient\n")
    found = check_layers.imports_of("nectar.node.sub.x", source, False, modules)
    assert [(f.target, f.line) for f in found] == [("nectar.node.trace", 1), ("nectar.node", 1), ("nectar.ledger", 2)]


def test_the_repository_follows_its_layers():
    """Fails while the issue-19 redesign is in progress; the merged tree must pass it (and scripts/test.sh runs it)."""
    violations = check_layers.check(REPO)
    assert violations == [], "\n".join(v.render(REPO) for v in violations)
