"""``python -m fastbn bench --op layer|group|instance`` runs end to end on tiny shapes
(speed is not checked) and reports fastbn against torch in the same rows."""

import pathlib

import pytest

from fastbn import bench_norms

from _cold_cache import COLD_CACHE_RUN, json_document

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_rows_cover_layouts_and_directions():
    rows = list(bench_norms.norm_rows("group", [(2, 4, 3, 3)], "float32", rounds=1))
    assert [(r["layout"], r["direction"]) for r in rows] == [
        ("NCHW", "forward"), ("NCHW", "backward"), ("NHWC", "forward"), ("NHWC", "backward")]
    for r in rows:
        assert r["fastbn_ms"] > 0
        assert r["torch_ms"] is None or r["speedup"] == r["torch_ms"] / r["fastbn_ms"]


@pytest.mark.background(COLD_CACHE_RUN, "bench-layer")
def test_cli_op_option_json():
    """``python -m fastbn bench --op layer --quick --shapes 16,8 --json -``, run in the
    background (``_cold_cache.COLD_CACHE_RUN``)."""
    pytest.importorskip("torch")
    doc = json_document(COLD_CACHE_RUN.output("bench-layer"))
    assert doc["op"] == "layer" and [r["direction"] for r in doc["rows"]] == ["forward", "backward"]
    assert all(r["torch_ms"] > 0 for r in doc["rows"])


def test_asv_suite_smoke(monkeypatch):
    import importlib

    import numba
    monkeypatch.setenv("FASTBN_ASV_SMOKE", "1")
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    suite = importlib.reload(importlib.import_module("benchmarks.bench_norms"))
    cases = suite.Norms.params[0]
    assert {c.split(":")[0] for c in cases} == set(bench_norms.NORM_OPS)
    saved = numba.get_num_threads()
    try:
        bench = suite.Norms()
        bench.setup(cases[0], "backward", "fastbn", 1)
        bench.time_pass(cases[0], "backward", "fastbn", 1)
    finally:
        numba.set_num_threads(saved)
