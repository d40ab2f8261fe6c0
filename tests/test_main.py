"""The main job and the bench report run end to end (tiny shapes; speed is not checked).

``python -m fastbn`` runs in the background run ``_cold_cache.COLD_CACHE_RUN`` (its
commands name the arguments), started at collection; these tests check what it printed.
"""

import pathlib

import pytest

from _cold_cache import COLD_CACHE_DIR, COLD_CACHE_RUN, json_document


@pytest.mark.background(COLD_CACHE_RUN, "main")
def test_main_job_checks_and_times():
    stdout = COLD_CACHE_RUN.output("main")
    assert "OK" in stdout.splitlines()
    assert stdout.count("forward (train)") == 2 and stdout.count("backward") == 2


@pytest.mark.background(COLD_CACHE_RUN, "bench")
def test_bench_report_json_rows_are_consistent():
    stdout = COLD_CACHE_RUN.output("bench")
    doc = json_document(stdout)
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2  # shapes x layouts x ops
    for row in rows:
        assert row["fastbn_s"] > 0 and row["roofline_s"] > 0
        assert row["gbps"] == row["bytes"] / row["fastbn_s"] / 1e9
        assert row["roofline_fraction"] == row["roofline_s"] / row["fastbn_s"]
        assert row["roofline_suspect"] == (row["roofline_fraction"] > 1.10)
        assert row["cache"] == "in-cache" and row["footprint_bytes"] <= row["llc_bytes"] == doc["llc_bytes"]
    assert "float64 NumPy reference" in stdout
    assert "native_batch_norm_backward" in stdout


def test_progress_counter_never_exceeds_its_total():
    import numpy as np

    from fastbn import bench_report as report
    seen = []
    rows = list(report.bench_rows([(4, 8, 6, 6), (64, 12)], ["NCHW", "NHWC"], ["stats", "backward"],
                               np.dtype(np.float32), quick=True, with_reference=True,
                               progress=lambda done, total, text: seen.append((done, total))))
    assert len(rows) == 2 * 2 * 2
    totals = {total for _, total in seen}
    assert len(totals) == 1
    total = totals.pop()
    assert all(0 <= done <= total for done, _ in seen)
    assert seen[-1] == (total, total)
    # every step but the final "done" is counted once: the total is exact, not an estimate
    assert len(seen) == total + 1


def test_cache_label_and_llc_size(tmp_path):
    from fastbn import bench as fbench
    for index, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "32M")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    llc = fbench.last_level_cache_bytes(str(tmp_path))
    assert llc == 32 << 20
    assert fbench.last_level_cache_bytes(str(tmp_path / "missing")) > 0  # fallback
    # (32, 64, 56, 56) float32: x is 25.7 MB; training forward touches x and y (51 MB)
    assert fbench.cache_label("stats", (32, 64, 56, 56), "float32", llc) == "in-cache"
    assert fbench.cache_label("forward_train", (32, 64, 56, 56), "float32", llc) == "DRAM"
    assert fbench.cache_label("backward", (8, 16, 8, 8), "float32", llc) == "in-cache"


def test_table_flags_a_kernel_faster_than_its_bound():
    from fastbn import bench_report as report
    base = {"shape": [4, 8], "layout": "NCHW", "op": "stats", "cache": "in-cache", "fastbn_s": 1e-5,
            "gbps": 1.0, "roofline_gbps": 1.0}
    ok = dict(base, roofline_fraction=0.5, roofline_suspect=False)
    bad = dict(base, roofline_fraction=1.5, roofline_suspect=True)
    table = report.format_table([ok, bad])
    assert "fastbn us" in table  # microsecond cases are printed in us
    assert table.splitlines()[2].rstrip().endswith(" 50%") and table.splitlines()[3].endswith("150%*")
    assert "*: above 110%" in report.table_legend([ok, bad], 1 << 25)
    assert "*:" not in report.table_legend([ok], 1 << 25)


def test_small_shape_set_and_per_call_timer():
    from fastbn import _timing
    from fastbn import bench as fbench
    assert fbench.parse_shapes(["small"]) == [(32, 128), (256, 64), (8, 16, 8, 8), (16, 32, 16, 16)]
    assert fbench.parse_shapes(["4,8", "2x3x4x5"]) == [(4, 8), (2, 3, 4, 5)]
    calls = []
    t = _timing.best_per_call(lambda: calls.append(1), repeat=3, min_time=0.0, batch_time=1e-4)
    assert 0 < t < 1e-3 and len(calls) > 3 + 4  # warm-up, calibration, then batches of calls


@pytest.mark.background(COLD_CACHE_RUN, "bench-small")
def test_bench_small_flag_times_the_small_shapes():
    doc = json_document(COLD_CACHE_RUN.output("bench-small"))
    assert [tuple(r["shape"]) for r in doc["rows"]] == [(32, 128), (256, 64), (8, 16, 8, 8), (16, 32, 16, 16)]


@pytest.mark.background(COLD_CACHE_RUN, "bench-step")
def test_bench_step_compares_training_steps():
    pytest.importorskip("torch")
    stdout = COLD_CACHE_RUN.output("bench-step")  # FASTBN_BENCH_SMOKE=1: tiny models
    assert "thread settings: OMP_NUM_THREADS=" in stdout and "module hooks" in stdout
    doc = json_document(stdout)
    assert [(r["model"], r["memory_format"]) for r in doc["rows"]] == [
        ("cnn", "NCHW"), ("cnn", "channels_last"), ("mlp", "-")]
    for r in doc["rows"]:
        assert r["output_rel_diff"] < 1e-4  # converted from the same initial weights
        assert r["step_ratio"] == r["torch_step_s"] / r["fastbn_step_s"]
        assert 0 < r["torch_bn_share"] < 1 and 0 < r["fastbn_bn_share"] < 1
        assert len(r["bn_shapes"]) == 4 and r["bn_alone_ratio"] == r["torch_bn_alone_s"] / r["fastbn_bn_alone_s"]


@pytest.mark.background(COLD_CACHE_RUN, "warmup")
def test_warmup_fills_the_disk_cache():
    """``python -m fastbn warmup`` in a cache directory that did not exist (the first
    process of the run made it; after the vectorization probe, when that runs too, warmup
    loads the batch-norm kernels the probe compiled): it must leave layer and group norm,
    which nothing before it ran, in the cache."""
    warmup_output = COLD_CACHE_RUN.output("warmup")
    cache_dir = pathlib.Path(COLD_CACHE_DIR.replace("{scratch}", COLD_CACHE_RUN.scratch))
    assert f"NUMBA_CACHE_DIR: {cache_dir}" in warmup_output
    index_files = list(cache_dir.rglob("*.nbi"))
    assert index_files and list(cache_dir.rglob("*.nbc"))
    kernels = {path.name.partition("-")[0] for path in index_files}
    assert {"layer.layer_forward", "layer.layer_backward", "groups.group_forward_coefficients"} <= kernels
    cache_line = next(line for line in warmup_output.splitlines() if line.startswith("cache: "))
    assert str(cache_dir) in cache_line
