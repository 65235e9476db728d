"""bench/bench_gpu.py's --smoke run: every GPU code path on CPU with tiny configs, every section in
the table, no failed case or check, labelled as not a GPU result; and it refuses to overwrite the
committed GPU table. Deviations: none (tests).
"""

import os
import subprocess
import sys

import pytest

from bench import bench_gpu


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--smoke", f"--out={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("# bench_gpu: SMOKE RUN on CPU with tiny configs -- NOT A GPU RESULT")
    for title in bench_gpu.SECTIONS.values():
        assert f"## {title}" in table
    assert "not reached" not in table and "FAIL" not in table and "not run" not in table, table
    rows = [
        line
        for line in table.splitlines()
        if line.startswith(("| lora |", "| full |", "| eager |", "| torch.compile |"))
    ]
    # (b) 2 modes x 2 checkpointing, (c) eager + compile, (d) 2 modes
    assert len(rows) == 4 + 2 + 2, table
    # (a): 2 x (dtypes, step 0) + UNet parity; the sync check n/a
    assert table.count("| pass |") == 5, table


def test_time_guard_covers_every_case(tmp_path):
    """With no budget left, no case runs: every case's row says "not run", nothing fails, and the
    table (at --out) still has every section."""
    out = tmp_path / "bench_gpu.md"
    bench_gpu.main(["--smoke", "--budget_s=0", f"--out={out}"])
    table = out.read_text()
    case_rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    not_run = [line for line in case_rows if "| not run: " in line]
    assert len(not_run) == 5 + 8 + 2 + 2, table  # (a) 5 checks, (b) 8 sides, (c) 2 builds, (d) 2
    assert "FAIL" not in table and "| pass |" not in table, table


def test_smoke_refuses_the_committed_results_path():
    with pytest.raises(SystemExit, match="not a GPU result"):
        bench_gpu.main(["--smoke", f"--out={bench_gpu.RESULTS}"])
