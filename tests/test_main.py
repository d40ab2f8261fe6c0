"""The main job and the bench report run end to end (tiny shapes; speed is not checked)."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "fastbn", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_main_job_checks_and_times():
    result = run_module("--shape", "4,8,6,6", "--repeat", "2")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout.splitlines()
    assert result.stdout.count("forward (train)") == 2 and result.stdout.count("backward") == 2


def test_bench_report_json_rows_are_consistent():
    result = run_module("bench", "--quick", "--no-reference", "--shapes", "4,8,6,6", "64,12",
                        "--ops", "forward_train", "backward", "--json", "-")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2  # shapes x layouts x ops
    for row in rows:
        assert row["fastbn_s"] > 0 and row["roofline_s"] > 0
        assert row["gbps"] == row["bytes"] / row["fastbn_s"] / 1e9
        assert row["roofline_fraction"] == row["roofline_s"] / row["fastbn_s"]
