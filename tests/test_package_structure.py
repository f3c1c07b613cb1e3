"""The package's shape stays as issue 8 left it: no import circle, and task types are told apart
only inside `tasks/` (everything else asks the registered task)."""

from __future__ import annotations

import ast
from pathlib import Path

from lora_scripts.tasks import TASK_MODULES, get_task
from lora_scripts.tasks.base import Task

PACKAGE = Path(__file__).resolve().parents[1] / "lora_scripts"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth, type-checking-only ones excluded)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                     for n in ast.walk(node)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` needs the submodule; `from pkg import name`, pkg itself
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    graph = package_imports()
    assert "lora_scripts.tasks.base" in graph["lora_scripts.tasks.text"]  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_tasks_tell_task_types_apart():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("tasks/") or relative == "config.py":  # the schema validates per task
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(is_task_type(operand) for operand in [node.left, *node.comparators]):
                offenders.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def is_task_type(node: ast.expr) -> bool:
    """`task_type` or `<anything>.task_type`: the value a branch on the task type compares."""
    return (isinstance(node, ast.Name) and node.id == "task_type") or (isinstance(node, ast.Attribute) and node.attr == "task_type")


def test_the_branch_finder_finds_a_planted_branch():
    planted = ast.parse('if cfg.task_type == "image":\n    pass\nok = name not in task_type.exports')
    compares = [node for node in ast.walk(planted) if isinstance(node, ast.Compare)]
    assert [any(is_task_type(o) for o in [c.left, *c.comparators]) for c in compares] == [True, False]


def test_every_task_type_of_the_schema_is_registered():
    from typing import get_args

    from lora_scripts.config import TaskType

    assert set(TASK_MODULES) == set(get_args(TaskType))
    for name in TASK_MODULES:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
