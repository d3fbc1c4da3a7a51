"""Imports flow one way: `dags`, `consumers` -> `pipeline` -> `schemas`.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, and
`importlib.import_module("...")` / `__import__("...")` calls with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "pipeline", "consumers", "dags")

# The `greetflow` commands and the demo: the only pipeline modules that may import the wiring.
ENTRY_POINTS = frozenset(
    {
        "pipeline.cli",
        "pipeline.cli.render",
        "pipeline.cli.bench",
        "pipeline.cli.moderation",
        "pipeline.cli.review",
        "pipeline.cli.stack",
        "pipeline.cli.webhooks",
        "pipeline.cli.campaign",
        "pipeline.cli.api",
        "pipeline.demo",
    }
)
# What pipeline/adapters may import of pipeline (besides other adapters): settings, errors,
# topic names, and the dependency-free metrics, tracing and logging modules.
ADAPTER_DEPENDENCIES = frozenset(
    {
        "pipeline.settings",
        "pipeline.errors",
        "pipeline.topics",
        "pipeline.metrics",
        "pipeline.tracing",
        "pipeline.logs",
    }
)
# The dev stack needs the `dev` extra: only these (and pipeline.dev itself) may import it.
DEV_STACK_USERS = frozenset(
    {"pipeline.cli", "pipeline.demo", "pipeline.bench_faults", "pipeline.bench_scale"}
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _literal_prefix(node: ast.expr) -> str | None:
    """The module name of a `import_module("a.b")` argument; of an f-string, its literal start."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".")
    return None


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def imports(module: str, source: str, *, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, imported name) for every import in `source`, relative ones made absolute.
    `from a import b` yields `a` and `a.b` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            name = _literal_prefix(node.args[0])
            if name:
                yield node.lineno, name


def violations(module: str, path: str, source: str, *, is_package: bool = False) -> list[str]:
    found: dict[tuple[int, str], str] = {}

    def bad(line: int, name: str, rule: str) -> None:
        found.setdefault((line, rule), f"{path}:{line}: {module} imports {name}: {rule}")

    for line, name in imports(module, source, is_package=is_package):
        if _within(module, "schemas"):
            if any(_within(name, p) for p in ("pipeline", "consumers", "dags")):
                bad(line, name, "schemas imports nothing of ours")
            continue
        if not _within(module, "pipeline"):
            continue
        if _within(name, "consumers") or _within(name, "dags"):
            bad(line, name, "pipeline imports no consumers or dags")
        if (
            _within(module, "pipeline.adapters")
            and _within(name, "pipeline")
            and name != "pipeline"
            and not _within(name, "pipeline.adapters")
            and not any(_within(name, d) for d in ADAPTER_DEPENDENCIES)
        ):
            bad(line, name, f"adapters import only {', '.join(sorted(ADAPTER_DEPENDENCIES))}")
        if (
            _within(name, "pipeline.bootstrap")
            and module != "pipeline.bootstrap"
            and module not in ENTRY_POINTS
        ):
            bad(line, name, f"only the entry points ({', '.join(sorted(ENTRY_POINTS))}) import the wiring")
        if (
            _within(name, "pipeline.dev")
            and not _within(module, "pipeline.dev")
            and module not in DEV_STACK_USERS
        ):
            bad(line, name, "the dev stack needs the dev extra; production code does not import it")
    return [found[key] for key in sorted(found)]


def _modules() -> Iterator[tuple[str, Path, bool]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join(parts), path, is_package


def test_imports_flow_one_way() -> None:
    checked = 0
    found: list[str] = []
    for module, path, is_package in _modules():
        source = path.read_text(encoding="utf-8")
        found += violations(module, str(path.relative_to(ROOT)), source, is_package=is_package)
        checked += 1
    assert checked > 50, f"walked only {checked} modules"
    assert not found, "layering violations:\n" + "\n".join(found)


def test_the_walker_catches_each_kind_of_violation() -> None:
    service = """\
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.bootstrap import Container


def build(name: str) -> object:
    from pipeline import bootstrap

    return importlib.import_module(f"consumers.{name}")


def later() -> object:
    return __import__("dags.review_sla")
"""
    found = violations("pipeline.render.service", "pipeline/render/service.py", service)
    assert [f.split(": ")[0] for f in found] == [
        "pipeline/render/service.py:7",
        "pipeline/render/service.py:11",
        "pipeline/render/service.py:13",
        "pipeline/render/service.py:17",
    ], found
    assert "imports pipeline.bootstrap" in found[1]
    assert "imports consumers" in found[2] and "imports dags.review_sla" in found[3]

    adapter = "from pipeline.settings import Settings\nfrom ..render import engine\n"
    found = violations("pipeline.adapters.fake", "pipeline/adapters/fake.py", adapter)
    assert found == [
        "pipeline/adapters/fake.py:2: pipeline.adapters.fake imports pipeline.render: adapters import "
        "only pipeline.errors, pipeline.logs, pipeline.metrics, pipeline.settings, pipeline.topics, "
        "pipeline.tracing"
    ], found

    schema = "def f() -> None:\n    import pipeline.topics\n"
    assert [f.split(": ")[0] for f in violations("schemas.fake", "schemas/fake.py", schema)] == [
        "schemas/fake.py:2"
    ]

    worker = "from pipeline.dev.stack import DevStack\n"
    assert violations("pipeline.workers", "pipeline/workers.py", worker)
    # The entry points may import the wiring and the dev stack.
    assert not violations(
        "pipeline.demo", "pipeline/demo.py", service.replace("consumers", "x").replace("dags", "y")
    )
    assert not violations("pipeline.cli", "pipeline/cli.py", worker)
