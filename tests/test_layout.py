"""The import direction of DESIGN.md: launch → pretrain | finetune | data_pipeline; all may import contracts."""
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
