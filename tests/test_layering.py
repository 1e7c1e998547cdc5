"""Package shape: no import cycles between rpgrl modules, and the trainer stays an
orderer of calls (short, no parallel-strategy branches)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rpgrl"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str) -> set[str]:
    """rpgrl modules imported anywhere in ``source``: lazy ones and those under TYPE_CHECKING
    too (a type-only import back into a caller is still a cycle in the design)."""
    tree = ast.parse(source)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rpgrl") and not node.level:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rpgrl")}
    return out


def _graph() -> dict[str, set[str]]:
    graph = {_module(p): _imports(p.read_text()) for p in PKG.rglob("*.py")}
    return {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}


def test_type_checking_imports_count():
    """The scan sees imports under ``if TYPE_CHECKING:`` (they once hid a cycle)."""
    source = ("from typing import TYPE_CHECKING\n\nfrom rpgrl.config import Config\n\n"
              "if TYPE_CHECKING:\n    from rpgrl.loop.trainer import Trainer\n\n"
              "def f():\n    import rpgrl.tools.plots\n")
    assert _imports(source) == {"rpgrl.config", "rpgrl.loop.trainer", "rpgrl.tools.plots"}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_trainer_is_short_and_strategy_free():
    text = (PKG / "loop" / "trainer.py").read_text()
    assert len(text.splitlines()) <= 350
    assert "fsdp" not in text.lower()
