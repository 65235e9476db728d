"""Issue 11's minimal form, kept: line budgets, one DPO objective, no module importing a script."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent
PRODUCT = sorted(p for p in ROOT.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py")


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_product_code_stays_within_its_line_budgets():
    counts = {path.name: lines(path) for path in PRODUCT}
    assert sum(counts.values()) <= 4200, counts
    assert max(counts.values()) <= 450, counts
    assert counts["train.py"] <= 330 and counts["tailorpo.py"] <= 300


def test_one_dpo_objective_and_no_module_imports_a_command_line_script():
    logsigmoid_functions = []
    for path in PRODUCT:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and "logsigmoid" in ast.unparse(node):
                logsigmoid_functions.append(f"{path.stem}.{node.name}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert "sample" not in names and "train" not in names, f"{path.name} imports a script"
    assert logsigmoid_functions == ["dpo.dpo_loss"]
    assert "unfold" not in (ROOT / "unet.py").read_text() and "rearrange" in (ROOT / "unet.py").read_text()
