"""Architecture rules that are easy to break by accident: sapo/ does no I/O, the supervisor stays light."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules whose only purpose is files, processes, sockets or our other layers.
FORBIDDEN_IN_SAPO = {"node", "supervisor", "os", "pathlib", "shutil", "tempfile", "glob", "socket",
                     "subprocess", "filelock", "json", "pickle", "yaml", "structlog", "logging"}


def _imports_and_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield "import", alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield "import", node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            yield "call", "open", node.lineno


def test_sapo_does_no_io_and_imports_no_other_layer():
    problems = []
    for path in sorted((ROOT / "sapo").glob("*.py")):
        for kind, name, line in _imports_and_calls(path):
            if (kind == "import" and name in FORBIDDEN_IN_SAPO) or kind == "call":
                problems.append(f"{path.name}:{line}: {kind} {name}")
    assert not problems, "sapo/ must stay pure:\n" + "\n".join(problems)


def test_the_layering_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom node.storage import x\nopen('f')\n")
    found = {(k, n) for k, n, _ in _imports_and_calls(bad)}
    assert found == {("import", "os"), ("import", "node"), ("call", "open")}


def test_config_and_tasks_do_not_import_torch():
    code = "import sys, node.config, sapo.config, sapo.tasks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
