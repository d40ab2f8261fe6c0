"""The kernels' inner loops compile to SIMD code (x86-64 only).

Numba cannot show the assembly of kernels loaded from its disk cache, so a subprocess
compiles them afresh into an empty cache directory, runs every public pass once in float32
for both memory orders (NCHW with planes long enough for the plane kernels, and short
planes, which reduce as rows), through the serial small-tensor kernels and the parallel
ones, and counts packed (ymm/zmm) floating-point instructions in each
compiled kernel.  A loop that fails to vectorize (e.g. `range(lo, hi)` bounds Numba cannot
prove, or a NaN-unsafe reduction) leaves a kernel with only scalar `ss`/`sd` arithmetic.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
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
print(json.dumps(counts))
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return ""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checks x86-64 SIMD registers")
def test_every_kernel_has_packed_float_arithmetic(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    if "avx2" not in _cpu_flags():
        pytest.skip("no AVX2: LLVM targets 128-bit xmm registers here")
    assert len(counts) >= 8, counts
    scalar_only = {name: n for name, n in counts.items() if n == 0}
    assert not scalar_only, f"kernels without packed float arithmetic: {scalar_only}"
