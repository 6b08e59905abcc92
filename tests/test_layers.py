"""The package's layers, read from the source (no import runs): a module imports only its own
layer and those below it; the reader API stays std-lib only; a function-level import says why."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "wxtoken"

# lowest first: a module may import its own layer and the ones before it
LAYERS: dict[str, tuple[str, ...]] = {
    # what a reader in another program imports: std-lib only
    "reader": ("wxtoken", "wxtoken.reader", "wxtoken.record", "wxtoken.errors",
               "wxtoken.errcodes", "wxtoken.control_client"),
    # one host's token: config, WeChat, schedule, the file store and the refresher
    "core": ("wxtoken.clock", "wxtoken.config", "wxtoken.configcheck", "wxtoken.credentials",
             "wxtoken.schedule", "wxtoken.status", "wxtoken.store", "wxtoken.refresher",
             "wxtoken.tickets", "wxtoken.timing", "wxtoken.failures", "wxtoken.forced",
             "wxtoken.upstream", "wxtoken.deadline", "wxtoken.netcause", "wxtoken.passive",
             "wxtoken.logs", "wxtoken.httpbody", "wxtoken.journal", "wxtoken.sdnotify",
             "wxtoken.runinfo", "wxtoken.reload", "wxtoken.redis_config", "wxtoken.source"),
    "fleet": ("wxtoken.fleet",),
    "component": ("wxtoken.component",),
    # the running daemon (and the emulator, a WeChat of its own)
    "runtime": ("wxtoken.daemon", "wxtoken.registry", "wxtoken.health", "wxtoken.metrics",
                "wxtoken.quota", "wxtoken.emulator"),
    # what listens and what a user types
    "api": ("wxtoken.serve", "wxtoken.control", "wxtoken.control_routes",
            "wxtoken.component.callback", "wxtoken.intake", "wxtoken.cli", "wxtoken.__main__",
            "wxtoken.demo", "wxtoken.wechatpy_session"),
}

# imports against the layering still to be removed (an entry that no longer matches fails too)
KNOWN: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the wxtoken module (or package) imported
    line: int
    in_function: bool
    commented: bool  # a comment on the import's line or the line above


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer's rank; the longest matching prefix decides (component.callback is api)."""
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS.items()):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "wxtoken"  # the package
            if (module == prefix or inside) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank >= 0, f"{module}: in no layer (add it to LAYERS)"
    return rank


def imports(path: Path) -> list[Import]:
    module = module_name(path)
    source = path.read_text()
    lines = source.splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[Import] = []

    def commented(node: ast.stmt) -> bool:
        return "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package[:len(package) - child.level + 1], base]).rstrip(".")
                # the module itself, or a name in it: resolve() keeps what is a module
                targets = [f"{base}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            for target in targets:
                assert isinstance(child, ast.stmt)
                found.append(Import(module, target, child.lineno, in_function, commented(child)))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def all_imports() -> list[Import]:
    found = [i for p in sorted(PACKAGE.rglob("*.py")) for i in imports(p)]
    assert len(found) > 100, f"{PACKAGE}: hardly any imports found"
    return found


def resolve(target: str) -> str:
    """A ``from wxtoken import x`` names a module when x is one, else the package."""
    parts = target.split(".")
    while parts and not ((PACKAGE.parent / Path(*parts)).with_suffix(".py").exists()
                         or (PACKAGE.parent / Path(*parts) / "__init__.py").exists()):
        parts.pop()
    return ".".join(parts)


def test_every_module_imports_only_its_layer_and_those_below() -> None:
    """No import reaches up a layer (core ← fleet ← component ← runtime ← api), bar the ones
    still listed in KNOWN, which must still be there."""
    against: set[tuple[str, str]] = set()
    for i in all_imports():
        if not i.target.startswith("wxtoken"):
            continue
        target = resolve(i.target)
        if layer_of(target) > layer_of(i.module):
            against.add((i.module, target))
    assert against - KNOWN == set(), "imports against the layering"
    assert KNOWN - against == set(), "gone: remove them from KNOWN"


def test_the_reader_api_imports_only_the_standard_library() -> None:
    """A reader in another program imports wxtoken without the daemon's dependencies."""
    for i in all_imports():
        if layer_of(i.module) != 0:
            continue
        top = i.target.split(".")[0]
        assert top == "wxtoken" or top in sys.stdlib_module_names or top == "__future__", \
            f"{i.module}:{i.line} imports {i.target}"


def test_a_function_level_import_says_why() -> None:
    """Imports sit at the top of a module; one inside a function (for a light reader or CLI,
    or a cycle still to break) carries a comment saying why."""
    silent = sorted(f"{i.module}:{i.line} {i.target}" for i in all_imports()
                    if i.in_function and not i.commented)
    assert silent == []
