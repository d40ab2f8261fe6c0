"""What a new process pays before its first result: ``import fastbn`` loads its public
names on first use (PEP 562), and a forward and backward call import only what they run."""

import os
import subprocess
import sys

import pytest

import fastbn
from _background import REPO_ROOT

#: A new process: ``import fastbn`` alone, then one small training forward and backward
#: (float64 (4, 3): the signature the in-process tests put in the disk cache).
FIRST_CALL = r"""
import sys, numpy as np
before = set(sys.modules)
import fastbn
print("import", sorted(set(sys.modules) - before))
x = np.linspace(-1.0, 2.0, 12).reshape(4, 3)
y, mean, invstd = fastbn.batch_norm_forward(x, training=True)
dx, dweight, dbias = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
print("result", float(y.sum()), float(dx.sum()), float(dbias.sum()))
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
    y_sum, dx_sum, dbias_sum = map(float, first_call_output["result"].split())
    # y is standardized per channel (sum 0), dx of a constant dy is 0, dbias = sum(dy) = 4 per channel.
    assert abs(y_sum) < 1e-12 and abs(dx_sum) < 1e-12 and dbias_sum == 12.0


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
