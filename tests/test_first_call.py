"""What a new process pays before its first result: ``import fastbn`` loads its public
names on first use (PEP 562), and a forward and backward call import only what they run."""

import os
import subprocess
import sys

import pytest

import fastbn
from fastbn.__main__ import main
from _background import REPO_ROOT

#: A new process: ``import fastbn`` alone, then one small training forward and backward
#: (the tensor of ``python -m fastbn warmup --first-call``, so both load the same kernels).
FIRST_CALL = r"""
import sys, numpy as np
before = set(sys.modules)
import fastbn
print("import", sorted(set(sys.modules) - before))
x = np.linspace(-1.0, 2.0, 8 * 16 * 8 * 8, dtype=np.float32).reshape(8, 16, 8, 8)
y, mean, invstd = fastbn.batch_norm_forward(x, training=True)
dx, dweight, dbias = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
print("result", abs(y.mean(axis=(0, 2, 3))).max(), abs(dx).max(), dbias.min(), dbias.max())
print("modules", sorted(m for m in sys.modules if m.startswith(("fastbn", "torch", "numba.cuda"))))
"""

#: Modules a host forward and backward never run: they must stay unimported.
UNUSED_BY_THE_CALL = {"torch", "numba.cuda", "fastbn.cuda", "fastbn.torch", "fastbn.reference", "fastbn.layers",
                      "fastbn.norms", "fastbn.ghost", "fastbn.distributed", "fastbn.stages"}


@pytest.fixture(scope="module")
def first_call_output():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", FIRST_CALL], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {line.partition(" ")[0]: line.partition(" ")[2] for line in done.stdout.splitlines()}


def test_import_fastbn_loads_no_submodule(first_call_output):
    assert first_call_output["import"] == "['fastbn', 'fastbn._version']"


def test_forward_and_backward_import_only_what_they_run(first_call_output):
    loaded = set(eval(first_call_output["modules"]))
    assert {"fastbn._api", "fastbn.cpu", "fastbn.cpu.fused"} <= loaded
    assert not loaded & UNUSED_BY_THE_CALL, loaded & UNUSED_BY_THE_CALL
    y_mean, dx_max, dbias_min, dbias_max = map(float, first_call_output["result"].split())
    # y is standardized per channel (mean 0 up to float32 rounding of values ~1); a constant
    # dy has dx 0 (up to rounding) and dbias = sum(dy) = 8 * 8 * 8 per channel, exactly.
    assert y_mean < 1e-5 and dx_max < 1e-5 and dbias_min == dbias_max == 512.0


def test_warmup_first_call_times_new_processes(capsys):
    assert main(["warmup", "--first-call", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastbn ") and "first call of 2 new processes" in lines[0]
    first, others = lines[1], lines[2]
    assert first.startswith("process 1 (compiles what the cache lacks): ")
    assert others.startswith("processes 2-2, best / median: ")
    names = first.split(": ", 1)[1]
    for phase in ("numpy", "numba", "import fastbn", "first forward", "first backward", "total", "process"):
        assert f"{phase} " in names and f"{phase} " in others
    numbers = [float(v) for v in names.split() if v[0].isdigit()]
    assert len(numbers) == 7 and min(numbers) >= 0 and numbers[3] > 0 and numbers[6] > numbers[5]
    assert abs(sum(numbers[:5]) - numbers[5]) < 2e-3  # total: the phases' sum (each rounded to 1 ms)


def test_warmup_first_call_needs_a_positive_count():
    with pytest.raises(ValueError, match="--first-call: expected a positive number of processes, got -1"):
        main(["warmup", "--first-call", "-1"])


def test_every_public_name_resolves_to_its_definition():
    from fastbn import _api, layers, norms, reference, stages, stats
    defined_in = {_api: ["batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_stats"],
                  layers: ["BatchNorm"], stages: ["moments"], stats: ["BackwardSums", "Moments", "stream_moments"],
                  norms: ["group_norm", "group_norm_backward", "group_norm_forward", "instance_norm", "layer_norm",
                          "layer_norm_backward", "layer_norm_forward"]}
    expected = {name: getattr(module, name) for module, names in defined_in.items() for name in names}
    expected.update(reference=reference, stages=stages)
    assert sorted(fastbn.__all__) == sorted(expected)
    namespace = {}
    exec("from fastbn import *", namespace)
    for name, value in expected.items():
        assert getattr(fastbn, name) is value and namespace[name] is value, name
    assert set(fastbn.__all__) | {"cpu", "dtypes", "__version__"} <= set(dir(fastbn))


def test_submodules_reachable_as_before_and_unknown_names_refused():
    from fastbn.cpu import fused
    assert fastbn.dtypes.policy("float32").storage == "float32" and fastbn.cpu.fused is fused
    with pytest.raises(AttributeError, match="module 'fastbn' has no attribute 'batchnorm'"):
        fastbn.batchnorm
