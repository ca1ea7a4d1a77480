"""Guards on the shape of the code: imports point one way, every exception is a FerryError.

The layers, lowest first (DESIGN.md, "imports point one way")::

    ferry.errors                      the exception tree; imports nothing from ferry
    core        pure rules            errors
    adapters    QEMU, catalog, pki    core
    guest       the test guest        core, adapters
    peer        the peer protocol     core, adapters
    host        host services         core, adapters, peer, guest
    api         the agent's HTTP API  host and below
    client      the admin client      core, adapters, peer (its HTTPS transport)
    testing     public test fakes     host and below
    agent       composes an agent     api and below
    lab         composes a lab        client, host (host.toml), agent (its pidfile name) and below
    web         the web console       core, client (a client like the CLI)
    cli         the ``ferry`` command anything but testing

Each layer may also import itself, ``ferry.errors`` and the ``ferry`` package
(``__version__``). Imports under ``if TYPE_CHECKING:`` and inside functions
count the same: a type is a dependency too.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import ferry
from ferry import errors
from ferry.errors import FerryError, error_from_code

SRC = Path(ferry.__file__).parent

BELOW_HOST = {"ferry.core", "ferry.adapters", "ferry.peer", "ferry.guest"}
ALLOWED: dict[str, set[str]] = {
    "ferry.errors": set(),
    "ferry.core": set(),
    "ferry.adapters": {"ferry.core"},
    "ferry.guest": {"ferry.core", "ferry.adapters"},
    "ferry.peer": {"ferry.core", "ferry.adapters"},
    "ferry.host": BELOW_HOST,
    "ferry.api": BELOW_HOST | {"ferry.host"},
    "ferry.client": {"ferry.core", "ferry.adapters", "ferry.peer"},
    "ferry.testing": BELOW_HOST | {"ferry.host"},
    "ferry.agent": BELOW_HOST | {"ferry.host", "ferry.api"},
    "ferry.lab": BELOW_HOST | {"ferry.host", "ferry.client", "ferry.agent"},
    "ferry.web": {"ferry.core", "ferry.client"},
    # Files shipped for installing on a host (the systemd unit): data, no imports of ours.
    "ferry.packaging": set(),
    "ferry.cli": BELOW_HOST
    | {
        "ferry.host",
        "ferry.api",
        "ferry.client",
        "ferry.agent",
        "ferry.lab",
        "ferry.web",
        "ferry.packaging",
    },
    "ferry.__main__": {"ferry.cli"},
}
ALWAYS = {"ferry", "ferry.errors"}

# Foreign packages a layer must not import: no I/O in core; HTTP only in peer,
# api, client and the composition roots; QEMU's QMP and SQLite only in adapters;
# the CLI's libraries only in cli.
_UI = {"typer", "rich"}
_IO = {"aiohttp", "qemu", "sqlite3", "socket", "ssl", "subprocess", "cryptography", "zstandard"}
FORBIDDEN: dict[str, set[str]] = {
    "ferry.core": _IO | _UI,
    "ferry.adapters": {"aiohttp"} | _UI,
    "ferry.guest": {"aiohttp", "qemu", "sqlite3"} | _UI,
    "ferry.peer": {"qemu", "sqlite3"} | _UI,
    "ferry.host": {"aiohttp", "qemu", "sqlite3"} | _UI,
    "ferry.api": {"qemu", "sqlite3"} | _UI,
    "ferry.client": {"qemu", "sqlite3"} | _UI,
    "ferry.web": {"qemu", "sqlite3"} | _UI,
}

# Single modules allowed one foreign package their layer forbids, with the reason.
# The etcd adapter speaks etcd's JSON gateway, which is HTTP: etcd's errors
# enter there and become FerryErrors, as QMP's do in adapters/qemu.py.
MODULE_EXCEPTIONS: set[tuple[str, str]] = {("ferry.adapters.etcd", "aiohttp")}

# Violations that exist today and are being removed (issue 11: the peer layer
# replaces the admin client in host services; the VM service takes its own
# request types). The list only shrinks: an entry that no longer occurs fails
# the test too, so delete it when you remove the import. Never add one.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # all removed; keep it empty


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, as written (``ferry.client.agent_client``, ``aiohttp``)
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> list[Import]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        where = f"src/{path.relative_to(SRC.parent)}"
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(module, alias.name, where, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the importing package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                found.append(Import(module, target, where, node.lineno))
    return found


def _layer(name: str) -> str:
    """``ferry.host.vms.service`` -> ``ferry.host``; ``ferry`` stays ``ferry``."""
    return ".".join(name.split(".")[:2])


def _violations() -> list[Import]:
    bad = []
    for imp in _imports():
        layer = _layer(imp.module)
        assert layer in ALLOWED, f"{imp.module} belongs to no layer: add {layer} to ALLOWED"
        if imp.target.startswith("ferry.") or imp.target == "ferry":
            target = _layer(imp.target)
            if target not in ALWAYS and target != layer and target not in ALLOWED[layer]:
                bad.append(imp)
        elif (
            imp.target.split(".")[0] in FORBIDDEN.get(layer, set())
            and (imp.module, imp.target.split(".")[0]) not in MODULE_EXCEPTIONS
        ):
            bad.append(imp)
    return bad


def test_imports_point_one_way() -> None:
    bad = _violations()
    new = [str(imp) for imp in bad if (imp.module, imp.target) not in KNOWN_VIOLATIONS]
    assert not new, "imports against the layers (see this test's docstring):\n" + "\n".join(new)


def test_the_known_violations_only_shrink() -> None:
    seen = {(imp.module, imp.target) for imp in _violations()}
    gone = sorted(KNOWN_VIOLATIONS - seen)
    assert not gone, f"no longer imported, delete from KNOWN_VIOLATIONS: {gone}"


def _ferry_modules() -> list[str]:
    names = ["ferry"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="ferry."):
        if info.name != "ferry.__main__":  # runs the CLI when imported
            names.append(info.name)
    return names


def _exception_classes() -> list[type[BaseException]]:
    classes = []
    for name in _ferry_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == name and issubclass(obj, BaseException):
                classes.append(obj)
    return classes


def test_every_exception_is_a_ferry_error() -> None:
    classes = _exception_classes()
    assert FerryError in classes
    outside = [_name(c) for c in classes if not issubclass(c, FerryError)]
    assert not outside, f"exception classes outside the FerryError tree: {outside}"


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_tree_lives_in_errors_py_and_crosses_the_api() -> None:
    """One tree, drawn in ``ferry/errors.py``'s docstring; the API sends ``code``
    and the client rebuilds the same class from it (``errors.error_from_code``)."""
    classes = [c for c in _exception_classes() if issubclass(c, FerryError)]
    elsewhere = [_name(c) for c in classes if c.__module__ != errors.__name__]
    assert not elsewhere, f"define these in ferry/errors.py (and draw them there): {elsewhere}"
    tree = errors.__doc__ or ""
    branches = [c for c in classes if c is not FerryError]
    undrawn = [_name(c) for c in branches if f"-- {c.__qualname__} " not in tree]
    assert not undrawn, f"error classes missing from the tree in errors.py's docstring: {undrawn}"
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes), f"two error classes share a code: {sorted(codes)}"
    lost = [_name(c) for c in classes if type(error_from_code(c.code, "m")) is not c]
    assert not lost, f"error classes the client cannot rebuild (add to errors._BY_CODE): {lost}"
