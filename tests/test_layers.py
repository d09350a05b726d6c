"""The import contract: data flows one way through the package (docs/architecture.md).

A module imports only from layers below its own, plus ``errors`` and
``events``. Imports inside functions count too. This fails the moment a
lower layer reaches up (the directory importing the core, the core importing
the policy layer, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bastion"

# lowest first; a module may import its own layer and any layer before it
LAYERS: list[set[str]] = [
    {"errors", "events"},
    {"fastpath"},  # version-pinned asyncssh patches; config reads its feature names
    {"addresses", "config", "model", "secretfiles", "access_settings"},
    {"identity", "trust", "directory", "credentials", "service"},
    {"policy"},
    {"core"},
    {"audit", "metrics", "recording", "httpd"},  # observers: subscribe to events, tap sessions
    {
        "admin",
        "app",
        "check",
        "cli",
        "doctor",
        "grants",
        "register",
        "revocation",
        "serving",
        "workers",
    },
]
# the one allowed exception: `bastion demo` starts the dev stack (lazily)
OUTSIDE_ALLOWED = {("cli", "devstack")}


def layer_of(part: str) -> int:
    for number, members in enumerate(LAYERS):
        if part in members:
            return number
    raise AssertionError(f"bastion.{part} is in no layer: add it to LAYERS and the docs")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top-level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def owner(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        layer_of(owner(path))


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        me = owner(path)
        for name in imports(path):
            top, _, rest = name.partition(".")
            if top == "devstack" and (me, "devstack") not in OUTSIDE_ALLOWED:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name} (the dev stack)")
            if top != "bastion" or not rest:
                continue
            other = rest.split(".")[0]
            if other in ("errors", "events") or other == me:
                continue
            if layer_of(other) > layer_of(me):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(set(wrong)))


def test_the_core_holds_no_policy() -> None:
    """The SSH core acts on plans: it never reads the directory or the policy."""
    core = PACKAGE / "core"
    for path in core.rglob("*.py"):
        for name in imports(path):
            assert not name.startswith(("bastion.directory", "bastion.policy")), (
                f"{path.name} imports {name}"
            )
