"""The kernels' inner loops compile to SIMD code (x86-64 only).

Numba cannot show the assembly of kernels loaded from its disk cache, so the probe of
``_cold_cache.COLD_CACHE_RUN`` compiles them afresh into an empty cache directory (in the
background, from collection on), runs every public pass once in float32 for both memory
orders (NCHW with planes long enough for the plane kernels, and short planes, which
reduce as rows), through the serial small-tensor kernels and the parallel ones, and
counts packed (ymm/zmm) floating-point instructions in each compiled kernel.  A loop
that fails to vectorize (e.g. `range(lo, hi)` bounds Numba cannot prove, or a NaN-unsafe
reduction) leaves a kernel with only scalar `ss`/`sd` arithmetic.
"""

import json
import platform

import pytest

from _cold_cache import COLD_CACHE_RUN


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return ""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checks x86-64 SIMD registers")
@pytest.mark.background(COLD_CACHE_RUN, "probe")
def test_every_kernel_has_packed_float_arithmetic():
    probe_output = COLD_CACHE_RUN.output("probe")
    line = next(line for line in probe_output.splitlines() if line.startswith("VECTORIZATION "))
    counts = json.loads(line.partition(" ")[2])
    if "avx2" not in _cpu_flags():
        pytest.skip("no AVX2: LLVM targets 128-bit xmm registers here")
    assert len(counts) >= 8, counts
    scalar_only = {name: n for name, n in counts.items() if n == 0}
    assert not scalar_only, f"kernels without packed float arithmetic: {scalar_only}"
