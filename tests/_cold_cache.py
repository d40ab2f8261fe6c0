"""The background runs (``_background``) of the tests that run fastbn in processes of its
own: compiling is most of what they cost, so each kernel is compiled once for all of
them, beside the rest of the suite.

``COLD_CACHE_RUN`` compiles into a Numba cache directory that does not exist yet (the
first process must create it), then runs the command-line tests on that cache:

1. the vectorization probe (``test_vectorization.py``): every public batch-norm pass in
   float32, both memory orders, serial and parallel kernels, compiled in that process so
   their assembly can be read (Numba cannot show the assembly of kernels loaded from its
   disk cache), then one ``VECTORIZATION {json}`` line: packed float instructions per kernel;
2. ``python -m fastbn warmup --dtypes float32 --layouts NCHW`` (``test_main.py``) into the
   same directory: it loads what the probe compiled and compiles the rest (layer, group
   and instance norm, the other signatures of its calls), which it must leave in the cache;
3. the command line (``test_main.py``, ``test_norms_bench.py``): the main job and the
   bench reports on tiny shapes, which load those float32 kernels;
4. the children of ``test_concurrency.py`` (added there): threads on Numba's workqueue
   layer, and a child forked after the parent launched parallel kernels.

Only the commands whose tests are selected run (``conftest.py``), in this order.

``NO_CACHE_RUN`` (``test_concurrency.py``) imports a copy of the package with no writable
cache location at all and calls it: the kernels compile in memory.
"""

import importlib.util
import json
import sys

from _background import REPO_ROOT, BackgroundRun

#: The cache directory of COLD_CACHE_RUN, under its scratch directory (``{scratch}``, see ``_background``).
COLD_CACHE_DIR = "{scratch}/cache/does/not/exist"

VECTORIZATION_PROBE = r"""
import json, re, numba, numpy as np, fastbn
from fastbn.cpu import planes, rows, small
cases = (((2, 8, 16, 16), "NCHW"), ((2, 8, 4, 4), "NCHW"), ((4, 6, 6, 8), "NHWC"))
for (shape, layout), small_size in [(case, size) for case in cases for size in (small.SMALL_SIZE, 0)]:
    small.SMALL_SIZE = small_size  # 0: the parallel planes and rows kernels
    x = np.ones(shape, np.float32)
    for training in (True, False):
        y, mean, invstd = fastbn.batch_norm_forward(x, training=training, layout=layout,
                                                    running_mean=np.zeros(8, np.float32),
                                                    running_var=np.ones(8, np.float32))
        fastbn.batch_norm_backward(x, x, mean, invstd, training=training, layout=layout)
packed = re.compile(r"\bv(?:add|sub|mul|fmadd\d*|fnmadd\d*|fmsub\d*)p[sd]\s[^\n]*%[yz]mm")
counts = {}
for module in (planes, rows, small):
    for name, kernel in vars(module).items():
        defined_here = getattr(getattr(kernel, "py_func", None), "__module__", None) == module.__name__
        if defined_here and hasattr(kernel, "inspect_asm") and kernel.signatures:
            counts[name] = min(len(packed.findall(kernel.inspect_asm(sig))) for sig in kernel.signatures)
print("VECTORIZATION " + json.dumps(counts))
"""

FASTBN = [sys.executable, "-m", "fastbn"]
HAS_TORCH = importlib.util.find_spec("torch") is not None
COLD_CACHE_COMMANDS = {
    "probe": [sys.executable, "-c", VECTORIZATION_PROBE],
    "warmup": [*FASTBN, "warmup", "--dtypes", "float32", "--layouts", "NCHW"],
    "main": [*FASTBN, "--shape", "4,8,6,6", "--repeat", "2"],
    "bench": [*FASTBN, "bench", "--quick", "--no-reference", "--shapes", "4,8,6,6", "64,12",
              "--ops", "forward_train", "backward", "--json", "-"],
    "bench-small": [*FASTBN, "bench", "--small", "--quick", "--no-reference", "--layouts", "NCHW",
                    "--ops", "forward_train", "--json", "-"],
}
if HAS_TORCH:  # what needs torch (its tests skip without it)
    COLD_CACHE_COMMANDS["bench-step"] = ["env", "FASTBN_BENCH_SMOKE=1", *FASTBN, "bench", "--step", "--quick",
                                         "--json", "-"]
    COLD_CACHE_COMMANDS["bench-layer"] = [*FASTBN, "bench", "--op", "layer", "--quick", "--shapes", "16,8",
                                          "--json", "-"]
COLD_CACHE_RUN = BackgroundRun("cold-cache", COLD_CACHE_COMMANDS, env={"NUMBA_CACHE_DIR": COLD_CACHE_DIR})


def json_document(output):
    """The JSON document in a command's ``output`` (from its first ``{`` to its last ``}``)."""
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


NO_CACHE_SCRIPT = r"""
import os, pathlib, shutil, subprocess, sys, textwrap
repo, scratch = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# NUMBA_CACHE_DIR under a regular file (it cannot be created, even as root), a copy of the
# package whose __pycache__ directories are files, and HOME/XDG_CACHE_HOME unusable too.
blocker = scratch / "not_a_dir"
blocker.write_text("")
pkg_root = scratch / "site"
shutil.copytree(repo / "fastbn", pkg_root / "fastbn", ignore=shutil.ignore_patterns("__pycache__"))
for sub in ("fastbn", "fastbn/cpu", "fastbn/cuda"):
    if (pkg_root / sub).is_dir():
        (pkg_root / sub / "__pycache__").write_text("")
code = '''
import numpy as np, fastbn
assert fastbn.__file__.startswith(%r), fastbn.__file__
x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
y, m, s = fastbn.batch_norm_forward(x)
print("NO_CACHE", float(abs(y.mean())) < 1e-5, bool(np.isfinite(fastbn.batch_stats(x)[1]).all()))
''' % str(pkg_root)
env = {"NUMBA_CACHE_DIR": str(blocker / "cache"), "HOME": str(blocker / "home"),
       "XDG_CACHE_HOME": str(blocker / "xdg"), "PYTHONPATH": str(pkg_root), "PYTHONDONTWRITEBYTECODE": "1"}
full_env = {k: v for k, v in os.environ.items() if k not in env}
full_env.update(env)
sys.exit(subprocess.run([sys.executable, "-c", code], env=full_env, cwd=str(scratch), timeout=900).returncode)
"""

NO_CACHE_RUN = BackgroundRun("no-cache",
                             {"no-cache": [sys.executable, "-c", NO_CACHE_SCRIPT, str(REPO_ROOT), "{scratch}"]})
