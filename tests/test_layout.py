"""The import rules of docs/ARCHITECTURE.md (launch → pretrain | finetune | data_pipeline; contracts for all)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contracts", "data_pipeline", "pretrain", "finetune", "launch")
# package -> the project packages it must never import
FORBIDDEN = {
    # the shared contracts (backbone folder, Task interface): imported by pretrain, finetune and launch, importing none
    "contracts": {"data_pipeline", "pretrain", "finetune", "launch"},
    "data_pipeline": {"pretrain", "finetune", "launch"},
    "pretrain": {"finetune", "launch"},
    "finetune": {"pretrain", "launch"},
    "launch": set(),
}


def imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_top_level_names(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_no_unsafe_torch_load():
    """Every torch.load in the project passes weights_only=True: no pickle from a checkpoint is ever run."""
    offenders = []
    for package in PACKAGES + ("bench",):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "torch.load without weights_only=True at " + ", ".join(offenders)


def module_imports(root: Path) -> dict[str, set[str]]:
    """Every project module (dotted name) -> the project modules it imports, anywhere in it (a function's own import
    is a circle deferred, not removed), except under `if TYPE_CHECKING:`, which never runs. Importing a.b.c imports
    the packages a and a.b too."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for package in ("contracts",) + PACKAGES + ("bench",) if (root / package).is_dir()
             for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        tree = ast.parse(path.read_text())
        skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [node.module])
                # `from package import submodule` imports the submodule; names of the package itself, the package
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                # a package is always imported before its modules: an edge to one's own package is no circle
                while target:
                    if target != name and not name.startswith(target + "."):
                        found.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = found
    return graph


def test_no_import_cycles():
    """No module imports itself through others (data_pipeline.embedded <-> write, finetune.detr.detector <-> task
    were such circles): a depth-first search over the module-level imports finds no back edge."""
    graph = module_imports(ROOT)
    assert "launch.runtime.loop" in graph and "contracts.task" in graph["launch.runtime.loop"]
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
