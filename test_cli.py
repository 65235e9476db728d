"""The command lines share one convention (config.Parser), and plot.py draws honest curves.

Every script runs by subprocess in a fresh folder, with flags that are refused or only ask for
--help, so no model is built: --help renders without argparse's %-formatting debris and names @FILE
where flags can come from a file; an unknown flag gets a one-line answer with the closest known
flag; every --a_b option is also accepted as --a-b. The runs of a fixture start together, so that
they share the CPU time of importing torch.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import plot

ROOT = Path(__file__).parent
COMMANDS = {  # A name for the report -> the argv after `python`, with a path for data.py inspect.
    "train.py": ["train.py"],
    "sample.py": ["sample.py"],
    "evaluate.py": ["evaluate.py"],
    "data.py inspect": ["data.py", "inspect", "no_such_pairs"],
    "walkthrough.py": ["walkthrough.py"],
}
COMMANDS = {name: argv for name, argv in COMMANDS.items() if (ROOT / argv[0]).is_file()}
READS_FLAG_FILES = {"train.py"}  # The commands whose parser has fromfile_prefix_chars="@".
NOT_AN_OPTION = "--not_an_option"


def command(name: str, *flags: str) -> list[str]:
    script, *rest = COMMANDS[name]
    return [sys.executable, str(ROOT / script), *rest, *flags]


def start(argv: list[str], folder: Path) -> subprocess.Popen:
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, cwd=folder, stdout=pipe, stderr=pipe, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def misspelt(option: str) -> str:
    """--num_images -> --num_iamges: two inner letters swapped; the option stays the closest."""
    letters = list(option)
    middle = len(letters) // 2 + 1
    letters[middle], letters[middle + 1] = letters[middle + 1], letters[middle]
    return "".join(letters)


def option_with_a_value(help_text: str) -> str:
    """The first option in the help that takes a value ("--max_steps MAX_STEPS"); an --a_b first."""
    options = re.findall(r"^\s+(--[a-z0-9_.]+) [A-Z{]", help_text, flags=re.MULTILINE)
    assert options, help_text
    underscored = [option for option in options if "_" in option]
    return (underscored or options)[0]


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("help")
    running = {name: start(command(name, "--help"), folder) for name in COMMANDS}
    return {name: finish(process) for name, process in running.items()}


@pytest.fixture(scope="module")
def refusals(helps, tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(command, case) -> the run: a misspelt option, and an --a_b option in either spelling."""
    folder = tmp_path_factory.mktemp("refused")
    running = {}
    for name in COMMANDS:
        option = option_with_a_value(helps[name].stdout)
        dashed = "--" + option[2:].replace("_", "-")
        running[name, "misspelt"] = start(command(name, misspelt(option), "1"), folder)
        running[name, "dashes"] = start(command(name, dashed, "1", NOT_AN_OPTION), folder)
        running[name, "underscores"] = start(command(name, option, "1", NOT_AN_OPTION), folder)
    return {key: finish(process) for key, process in running.items()}


def assert_one_line_refusal(run: subprocess.CompletedProcess):
    assert run.returncode != 0, run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_renders_without_format_debris(helps, name):
    run = helps[name]
    assert run.returncode == 0, run.stderr
    assert "--help" in run.stdout
    for debris in ("%(", "'option_strings'", "'dest':"):  # What argparse's % operator leaves.
        assert debris not in run.stdout, run.stdout


@pytest.mark.parametrize("name", sorted(READS_FLAG_FILES & set(COMMANDS)))
def test_help_names_the_flag_file_syntax(helps, name):
    assert "@FILE" in helps[name].stdout


def test_train_help_says_which_defaults_are_the_toy_worlds(helps):
    """--max_steps' default is the toy world's (--model toy is the default); --model's is not."""
    help_text = " ".join(helps["train.py"].stdout.split())
    assert re.search(r"--max_steps MAX_STEPS [^-]*\(default: \d+, the toy world's; otherwise 200\)",
                     help_text), help_text
    assert re.search(r"--model MODEL [^-]*\(default: toy\)", help_text), help_text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unknown_option_is_answered_in_one_line_with_the_closest_one(helps, refusals, name):
    option = option_with_a_value(helps[name].stdout)
    run = refusals[name, "misspelt"]
    assert_one_line_refusal(run)
    assert f"unknown option '{misspelt(option)}' (did you mean {option}?)" in run.stderr


@pytest.mark.parametrize("spelling", ["dashes", "underscores"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_options_are_accepted_with_dashes_or_underscores(helps, refusals, name, spelling):
    """The run stops at the next flag (unknown) or at the value "1", never at the option itself."""
    option = option_with_a_value(helps[name].stdout)
    run = refusals[name, spelling]
    assert_one_line_refusal(run)
    assert "unknown option '--" + option[2:].replace("_", "-") not in run.stderr
    assert f"unknown option '{option}" not in run.stderr


SAMPLE_REFUSALS = {  # Flags -> the one line sample.py answers, before the toy world is built.
    ("--height", "20"): "--height=20: height and width must be positive multiples of 8",
    ("--width", "100"): "--width=100: height and width must be positive multiples of 8",
    ("--lora", "missing.safetensors"): "--lora=missing.safetensors: no such file or folder",
}


@pytest.fixture(scope="module")
def sample_refusals(tmp_path_factory) -> dict[tuple, tuple[subprocess.CompletedProcess, Path]]:
    running = {}
    for flags in SAMPLE_REFUSALS:
        folder = tmp_path_factory.mktemp("sample")
        argv = [sys.executable, str(ROOT / "sample.py"), "--model", "toy", "--prompt", "x", *flags]
        running[flags] = (start(argv, folder), folder)
    return {flags: (finish(process), folder) for flags, (process, folder) in running.items()}


@pytest.mark.parametrize("flags", list(SAMPLE_REFUSALS))
def test_sample_refuses_bad_sizes_and_missing_files_before_building_the_toy(sample_refusals, flags):
    """The toy world would pretrain its model (minutes) into ./.cache on first use."""
    run, folder = sample_refusals[flags]
    assert_one_line_refusal(run)
    assert run.stderr.strip() == f"sample.py: {SAMPLE_REFUSALS[flags]}"
    assert not (folder / ".cache").exists()


# plot.py ---------------------------------------------------------------------------------------


def write_log(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_smoothing_weighs_only_the_points_seen_so_far():
    """A bias-corrected EMA: the first point weighs (1 - s) s^k / (1 - s^(k+1)) after k more points,
    not s^k as when the average starts at the first value."""
    smooth = 0.9
    curve = plot.smoothed([0.0] + [1.0] * 30, smooth)
    first_weight = (1 - smooth) * smooth**5 / (1 - smooth**6)
    assert curve[0] == 0.0
    assert curve[5] == pytest.approx(1 - first_weight, abs=1e-12)


def test_smoothing_keeps_a_constant_curve_constant():
    assert plot.smoothed([0.25] * 10, 0.9) == pytest.approx([0.25] * 10, abs=1e-15)


def test_a_curve_without_points_gets_no_legend_entry(tmp_path):
    loss = ([1, 2, 3], [0.7, 0.6, 0.65])
    alone = plot.save_line_plot(str(tmp_path / "alone.png"), {"loss": loss})
    curves = {"loss": loss, "val_loss": ([], [])}
    with_empty = plot.save_line_plot(str(tmp_path / "empty.png"), curves)
    assert Image.open(alone).tobytes() == Image.open(with_empty).tobytes()


def test_each_reward_series_gets_its_own_panel(tmp_path):
    rows = [{"step": step, "loss": 0.5, "reward_w": 0.1 * step, "reward_l": -0.1 * step,
             "final_reward": 0.01 * step} for step in range(1, 20)]
    rows += [{"step": step, "eval_reward": 5.0 + step / 100} for step in (5, 10, 15)]
    paths = plot.plot_metrics(write_log(tmp_path / "metrics.jsonl", rows))
    reward_png = next(path for path in paths if path.endswith("reward.png"))
    assert Image.open(reward_png).height == 4 * plot.PANEL_HEIGHT


def test_the_plot_command_refuses_a_folder_or_a_missing_file_in_one_line(tmp_path):
    for target in (tmp_path, tmp_path / "missing.jsonl"):
        run = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(target)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert_one_line_refusal(run)
        assert run.stderr.startswith("plot.py: ")


# progress.py -----------------------------------------------------------------------------------

LOOP = """
import progress
bar = progress.bar(range(1000), desc="pretraining", unit="step")
for step in bar:
    bar.set_postfix({"loss": "0.6931", "implicit_accuracy": "0.5", "val_implicit_accuracy": "0.5",
                     "eval_reward": "1.234", "grad_norm": "0.01234"})
"""


def test_a_redirected_progress_bar_writes_a_line_every_five_percent(tmp_path):
    run = subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    lines = run.stderr.splitlines()
    assert run.returncode == 0, run.stderr
    assert len(lines) == 21, run.stderr  # 0%, 5%, ..., 100%.
    assert all(line.startswith("pretraining: ") for line in lines)
    assert max(len(line) for line in lines) <= 80
    assert "1000/1000" in lines[-1]


def options_without_help(help_text: str) -> list[str]:
    """The options whose --help line has no explanation: argparse writes an explanation on the
    option's own line after a gap of two spaces, or on the next line, indented past the options."""
    lines = help_text.splitlines() + [""]
    bare = []
    for line, next_line in zip(lines, lines[1:]):
        if not re.match(r"^  -", line):
            continue
        explained_here = re.search(r"\S {2,}\S", line.strip())
        explained_below = re.match(r"^ {8,}[^\s-]", next_line)
        if not (explained_here or explained_below):
            bare.append(line.strip())
    return bare


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_explains_every_option(helps, name):
    assert options_without_help(helps[name].stdout) == []
