"""walkthrough.py (issue 20): the papers read beside the code, checked against the code.

On the suite's tiny SD1.5 folder (--model PATH) every block finds its code line in the source, every
identity holds within its float32 bound, and every `# Eq.` tag of the product code is shown by some
block; README.md's "Paper -> code" table names code that exists; bad input is refused in one line
before any model is built.
"""

import ast
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import toy
import walkthrough
import weights
from config import ConfigError

ROOT = Path(__file__).parent
NOT_PRODUCT = ("conftest.py", "testkit.py")  # test infrastructure, as in test_layout.py
PRODUCT = sorted(path for path in ROOT.glob("*.py")
                 if not path.name.startswith("test_") and path.name not in NOT_PRODUCT)
EQ_TAG = re.compile(r"#\s*Eq\.\s*\d")  # a `# Eq. N` comment
# The identities that issue 20 asks the walk to check, by a phrase of their claims.
REQUIRED_CLAIMS = ("eta = 0 gives sigma_t = 0", "eta = 0 is deterministic", "loss = log 2",
                   "implicit accuracy = 0", "closed form = difference of",
                   "positive inner product", "push raises the step-wise reward",
                   "one UNet call scores both", "UNet calls")


@pytest.fixture(scope="module")
def walks(tiny_sd_dir, tmp_path_factory):
    """The three walks on the tiny SD1.5 pipeline folder: `python walkthrough.py --model PATH`."""
    out = tmp_path_factory.mktemp("walkthrough")
    return walkthrough.main(["all", "--model", str(tiny_sd_dir), "--out", str(out), "--step", "2"])


def blocks(walks):
    return [block for walk in walks for block in walk]


def source_line(name: str, number: int) -> str:
    """Line `number` (from 1) of the repository file `name`, stripped as the walk prints it."""
    return (ROOT / name).read_text(encoding="utf-8").splitlines()[number - 1].strip()


def test_model_path_runs_all_three_walks_on_the_tiny_sd15_folder(walks):
    assert [walk.number for walk in walks] == [1, 2, 3]
    assert all(len(walk) >= 3 for walk in walks)


def test_every_block_finds_its_code_line_in_the_source(walks):
    missing = [(block.number, marker) for block in blocks(walks) for marker, found in block.code
               if found is None]
    assert not missing
    for block in blocks(walks):
        for _, (name, line, text) in block.code:  # the line shown is the file's line, verbatim
            assert source_line(name, line) == text


def test_every_identity_holds_within_its_float32_bound(walks):
    checks = [(block.number, claim, residual, tolerance) for block in blocks(walks)
              for claim, residual, tolerance, ok in block.checks]
    failed = [check for check in checks if check[2] > check[3]]
    assert not failed
    claims = " / ".join(claim for _, claim, _, _ in checks)
    assert [phrase for phrase in REQUIRED_CLAIMS if phrase not in claims] == []


def eq_tags(path: Path) -> set[tuple[str, int]]:
    """(file, line) of the `# Eq. N` comments of a module (comments only, not strings)."""
    with path.open(encoding="utf-8") as source:
        return {(path.name, token.start[0]) for token in tokenize.generate_tokens(source.readline)
                if token.type == tokenize.COMMENT and EQ_TAG.match(token.string)}


def test_every_eq_tag_of_the_product_code_is_shown_by_some_block(walks):
    tags = set().union(*(eq_tags(path) for path in PRODUCT))
    shown = {(found[0], found[1]) for block in blocks(walks) for _, found in block.code if found}
    assert tags, "no `# Eq.` tags found: the pattern is wrong"
    assert sorted(tags - shown) == []


def test_the_pictures_are_written_as_png(walks):
    pictures = [path for walk in walks for path in walk.pictures]
    assert [path.name for path in pictures] == ["dpo.png", "tailorpo.png"]
    for path in pictures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def defined_names(path: Path) -> dict[str, set[str]]:
    """{top-level function or class: its method names} of a module, from its syntax tree."""
    names = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            methods = [item.name for item in node.body if isinstance(item, ast.FunctionDef)]
            names[node.name] = set(methods)
    return names


def paper_to_code_cells() -> list[str]:
    """The `file.py: name, name` cells of README.md's "Paper -> code" table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Paper → code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "`" in line]
    code_cells = [row.split("|")[-2] for row in rows]
    return [cell for code in code_cells for cell in re.findall(r"`([\w/]+\.py: [^`]+)`", code)]


def test_readme_paper_to_code_table_names_code_that_exists():
    cells = paper_to_code_cells()
    assert len(cells) >= 15, cells
    unresolved = []
    for cell in cells:
        file, names = cell.split(": ", 1)
        defined = defined_names(ROOT / file)
        owner = None  # "Class.method, other": a bare name after Class.method may be its method too
        for name in names.split(", "):
            if "." in name:
                owner, member = name.split(".")
                exists = member in defined.get(owner, set())
            else:
                exists = name in defined or name in defined.get(owner, set())
            if not exists:
                unresolved.append(f"{file}: {name}")
    assert unresolved == []


def test_readme_excerpt_shows_todays_code_lines():
    """The README's walkthrough excerpt says its line numbers are those of the code today: each
    `code  file.py:N  text` line there is line N of that file."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"^ +code  (\w+\.py):(\d+)  (.+)$", text, flags=re.MULTILINE)
    assert len(shown) >= 4, shown
    for name, number, line in shown:
        assert source_line(name, int(number)) == line


def refuse_to_build(*args, **kwargs):
    raise AssertionError("a model was built before the options were checked")


@pytest.mark.parametrize("argv, says", [
    (["bogus"], "ddim"), (["--step", "99"], "--step"), (["--step", "x"], "--step"),
    (["--seed", "1.5"], "--seed"), (["--reward", "nope"], "saturation"),
    (["--guidance", "high"], "--guidance"), (["--stepz", "1"], "--step"),
])
def test_a_bad_option_is_refused_in_one_line_before_a_model_is_built(argv, says, monkeypatch):
    monkeypatch.setattr(toy.World, "load_model", refuse_to_build)
    monkeypatch.setattr(weights, "load_stable_diffusion", refuse_to_build)
    with pytest.raises(ConfigError) as error:
        walkthrough.main(argv)
    assert says in str(error.value) and "\n" not in str(error.value)


def test_a_folder_that_is_not_sd15_is_refused_saying_what_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        walkthrough.main(["--model", str(tmp_path)])
    message = str(error.value)
    assert "\n" not in message and "diffusers folder" in message and str(tmp_path) in message


def test_the_script_prints_an_unknown_walk_as_one_line_and_fails():
    result = subprocess.run([sys.executable, "walkthrough.py", "bogus"], cwd=ROOT, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "tailorpo" in result.stderr
