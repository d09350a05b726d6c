"""Dependencies: every third-party import is declared in pyproject.toml,
requirements.lock pins each package with hashes, its asyncssh is one the
speed-ups were verified against, and the venv runs exactly the locked versions.

Regenerate the lock with ``scripts/lock.sh``; moving to a new asyncssh is
docs/upgrading-asyncssh.md. Fast: reads files and metadata, starts nothing.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
EXTRAS = {
    extra: {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}
    for extra, reqs in PROJECT.get("optional-dependencies", {}).items()
}
ANY_EXTRA = {name for reqs in EXTRAS.values() for name in reqs}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass(frozen=True)
class Import:
    module: str  # top-level name
    where: str  # path:line
    optional: bool  # inside `try: ... except ImportError`


def _catches_import_error(node: ast.Try) -> bool:
    names: set[str] = set()
    for handler in node.handlers:
        types = handler.type
        elts = types.elts if isinstance(types, ast.Tuple) else [types]
        names.update(e.id for e in elts if isinstance(e, ast.Name))
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _imports(path: Path) -> Iterator[Import]:
    """Every absolute import in a file, module level or inside functions."""
    rel = path.relative_to(ROOT)

    def walk(node: ast.AST, optional: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name.split(".")[0], f"{rel}:{node.lineno}", optional)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield Import(node.module.split(".")[0], f"{rel}:{node.lineno}", optional)
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                yield from walk(child, True)
            for other in (*node.handlers, *node.orelse, *node.finalbody):
                yield from walk(other, optional)
            return
        for sub in ast.iter_child_nodes(node):
            yield from walk(sub, optional)

    yield from walk(ast.parse(path.read_text(), str(path)), False)


def _local_modules() -> set[str]:
    names = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in ROOT.glob("*.py")}
    names |= {p.stem for p in (ROOT / "tests").glob("*.py")}  # conftest
    return names


def _third_party(dirs: Iterable[Path]) -> list[Import]:
    local = _local_modules()
    found = []
    for d in dirs:
        for path in sorted(d.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for imp in _imports(path):
                if imp.module not in sys.stdlib_module_names and imp.module not in local:
                    found.append(imp)
    return found


def _distributions(module: str) -> set[str]:
    """The distributions providing a top-level module (its own name if not installed)."""
    dists = importlib.metadata.packages_distributions().get(module, [module])
    return {canonicalize_name(d) for d in dists}


def _packaged_dirs() -> list[Path]:
    """The top-level packages pyproject.toml ships (bastion, devstack, ...)."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = find["packages"]["find"]["include"]
    return [
        p
        for p in sorted(ROOT.iterdir())
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    ]


def _undeclared(imports: list[Import], required: set[str]) -> list[str]:
    problems = []
    for imp in imports:
        allowed = required | ANY_EXTRA if imp.optional else required
        dists = _distributions(imp.module)
        if not dists & allowed:
            problems.append(f"{imp.where}: import {imp.module} (distribution {sorted(dists)})")
    return problems


def _lock() -> dict[str, tuple[str, str]]:
    """name -> (version, the requirement's whole text with its hash lines)."""
    pins: dict[str, tuple[str, str]] = {}
    blocks: list[str] = []
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if blocks and blocks[-1].rstrip().endswith("\\"):
            blocks[-1] += "\n" + line
        else:
            blocks.append(line)
    for block in blocks:
        match = _PIN.match(block)
        assert match, f"requirements.lock: not an exact pin: {block.splitlines()[0]!r}"
        pins[canonicalize_name(match[1])] = (match[2], block)
    return pins


def _verified_versions() -> tuple[str, ...]:
    module: ModuleType
    try:
        module = importlib.import_module("bastion.fastpath")
    except ImportError:  # before the move to the package
        module = importlib.import_module("bastion.tuning")
    versions = module.VERIFIED_VERSIONS
    assert isinstance(versions, tuple) and versions, versions
    return versions


def test_shipped_code_imports_only_declared_dependencies() -> None:
    dirs = _packaged_dirs()
    assert ROOT / "bastion" in dirs
    imports = _third_party(dirs)
    assert {"asyncssh", "cryptography"} <= {i.module for i in imports}  # the scan sees them
    assert _undeclared(imports, set(RUNTIME)) == [], (
        "imported by the package but not in pyproject.toml [project] dependencies "
        "(then scripts/lock.sh)"
    )


def test_tests_and_bench_import_only_declared_dependencies() -> None:
    imports = _third_party([ROOT / "tests", ROOT / "bench"])
    assert "pytest" in {i.module for i in imports}
    assert _undeclared(imports, set(RUNTIME) | set(EXTRAS["test"])) == [], (
        "imported by tests/ or bench/ but in neither dependencies nor the test extra"
    )


def test_optional_imports_are_recognised() -> None:
    # bastion/cli.py: `try: import uvloop / except ImportError` -> an extra suffices
    optional = {i.module for i in _third_party([ROOT / "bastion"]) if i.optional}
    assert "uvloop" in optional
    assert "uvloop" in ANY_EXTRA and "uvloop" not in RUNTIME


def test_pyproject_keeps_ranges_not_pins() -> None:
    for name, req in RUNTIME.items():
        assert req.specifier, f"{name}: give a version range"
        assert not any(s.operator in ("==", "===") for s in req.specifier), (
            f"{name}: exact pins belong in requirements.lock, pyproject.toml keeps ranges"
        )


def test_every_locked_package_is_pinned_with_hashes() -> None:
    pins = _lock()
    assert len(pins) > 10
    for name, (_, block) in pins.items():
        assert "--hash=sha256:" in block, f"requirements.lock: {name} has no sha256 hash"


def test_lock_covers_pyproject_within_its_ranges() -> None:
    pins = _lock()
    for name, req in {**RUNTIME, **EXTRAS["test"]}.items():
        assert name in pins, f"{name} is declared but not locked: run scripts/lock.sh"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"locked {name}=={pins[name][0]} is outside pyproject's {req}: run scripts/lock.sh"
        )
    assert "uvloop" not in pins  # the verified figures are measured without it


def test_locked_asyncssh_is_a_verified_version() -> None:
    version, _ = _lock()["asyncssh"]
    verified = _verified_versions()
    assert version.startswith(verified), (
        f"requirements.lock pins asyncssh {version}, the speed-ups are verified for "
        f"{verified}: see docs/upgrading-asyncssh.md"
    )


def test_installed_versions_are_the_locked_ones() -> None:
    pins = _lock()
    assert importlib.metadata.version("asyncssh") == pins["asyncssh"][0], (
        "the venv's asyncssh is not the locked one: run scripts/setup.sh"
    )
    import asyncssh

    assert asyncssh.__version__ == pins["asyncssh"][0]
    drift = {}
    for name, (version, _) in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            drift[name] = f"locked {version}, installed {installed}"
    assert drift == {}, "the venv differs from requirements.lock: run scripts/setup.sh"


def test_setup_installs_from_the_lock_with_hashes() -> None:
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert "--require-hashes -r" in setup and "requirements.lock" in setup
    assert "--no-deps -e" in setup
