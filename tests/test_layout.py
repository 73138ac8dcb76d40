"""The folders show the two things citygw deploys, and every import points down
(docs/architecture.md, "Packages"): a gateway module never imports the platform, the
platform never the gateway, the drivers neither, and common/ only the kernels."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: a package may import only packages of a lower layer (and itself)
LAYER = {
    "native": 0,
    "common": 1,
    "buffer": 2,
    "firmware_bridge": 2,
    "drivers": 3,
    "agent": 4,
    "central": 4,
    "cli": 5,
}


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
    return out


def test_every_import_points_down() -> None:
    upward = sorted(
        f"{path.relative_to(ROOT)} imports {top}"
        for package, layer in LAYER.items()
        for path in (ROOT / package).rglob("*.py")
        for top in imports_of(path)
        if top in LAYER and top != package and LAYER[top] >= layer
    )
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from central.stores import open_store\nimport agent.runtime as r\n")
    assert imports_of(module) == {"central", "agent"}
