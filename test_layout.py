"""The rules of the house's design, read from the code itself (the syntax tree, not words in the
text).

1. No product file is over 450 lines: one concept a reader can hold.
2. One DPO objective: `logsigmoid` is called in `dpo.dpo_loss` and nowhere else.
3. No library module imports a command-line script (`train.py`, `sample.py`, `walkthrough.py`).
4. The toy world is reached through one door: the string "toy" appears in no core module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent
PRODUCT = sorted(
    path
    for path in ROOT.glob("*.py")
    if not path.name.startswith("test_") and path.name not in ("conftest.py", "testkit.py")
)
SCRIPTS = {"train", "sample", "walkthrough"}
CORE = (
    "scheduler",
    "sampler",
    "unet",
    "vae",
    "clip",
    "tokenizer",
    "dpo",
    "tailorpo",
    "lora",
    "data",
)


def syntax_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
    return names


def test_no_product_file_is_over_450_lines():
    counts = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in PRODUCT}
    too_long = {name: count for name, count in counts.items() if count > 450}
    assert not too_long, too_long


def test_logsigmoid_is_called_only_in_dpo_loss():
    callers = []
    for path in PRODUCT:
        for function in ast.walk(syntax_tree(path)):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Attribute) and node.attr == "logsigmoid":
                    callers.append(f"{path.stem}.{function.name}")
    assert sorted(set(callers)) == ["dpo.dpo_loss"]


def test_no_library_module_imports_a_command_line_script():
    for path in PRODUCT:
        if path.stem in SCRIPTS:
            continue
        scripts = imported_modules(syntax_tree(path)) & SCRIPTS
        assert not scripts, f"{path.name} imports the script(s) {sorted(scripts)}"


def test_core_modules_know_nothing_of_the_toy_world():
    for name in CORE:
        tree = syntax_tree(ROOT / f"{name}.py")
        assert not {"toy", "toy_reward"} & imported_modules(tree), (
            f"{name}.py imports the toy world"
        )
        strings = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        code_strings = [s for s in strings if "toy" in s.split()]
        assert not code_strings, f"{name}.py special-cases the toy: {code_strings[:3]}"
