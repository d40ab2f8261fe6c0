"""Every CUDA kernel compiles for a real GPU (sm_90 PTX), without a GPU.

The simulator runs kernels as Python, so it cannot catch what only Numba's CUDA
compiler rejects (typing and lowering in the CUDA target, NVVM).  Compiling to PTX
needs only libNVVM from a CUDA toolkit, no driver or device; skipped without one.
Each kernel is compiled for every storage dtype's kernel view (bfloat16's is int16)
and every argument dtype fastbn launches it with (statistics float32/float64; eval
passes running statistics; the stages accept (mean, var) pairs in the parameter,
statistics or float64 dtype).  The PTX also shows what the elementwise kernels promise:
16-bit values loaded two per 32-bit access, and no 64-bit index arithmetic in the
32-bit index variant.
"""

import re

import numba
import numpy as np
import pytest

if numba.config.ENABLE_CUDASIM:
    pytest.skip("compiles for the real CUDA target (the simulator is on)", allow_module_level=True)

from numba import cuda, typeof  # noqa: E402

from fastbn.cuda.arrays import policy_of as policy  # noqa: E402  (storage and kernel-view dtypes)

COMPUTE_CAPABILITY = (9, 0)


@pytest.fixture(scope="module")
def compile_ptx():
    """compile_ptx(kernel, *example_args) -> PTX text; skips without libNVVM."""
    try:
        cuda.compile_ptx(lambda a: None, numba.void(typeof(np.zeros(1))), cc=COMPUTE_CAPABILITY)
    except Exception as error:  # no CUDA toolkit: nothing to compile with
        pytest.skip(f"libNVVM unavailable: {type(error).__name__}: {error}")
    import numba.cuda.dispatcher as dispatcher

    class TargetDevice:
        compute_capability = COMPUTE_CAPABILITY

    # Device functions ask the current device for its compute capability, which needs
    # a driver; answer for the target instead.
    saved = dispatcher.get_current_device
    dispatcher.get_current_device = TargetDevice
    try:
        def compile_kernel(kernel, *args):
            signature = numba.void(*(typeof(a) for a in args))
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=COMPUTE_CAPABILITY)
            return ptx
        yield compile_kernel
    finally:
        dispatcher.get_current_device = saved


STORAGE_DTYPES = [np.float16, np.float32, np.float64]
#: The kernels' views of every storage dtype: bfloat16's is int16 (fastbn.half).
KERNEL_VIEWS = STORAGE_DTYPES + [np.int16]
#: Statistics dtypes a backward stage accepts for mean and invstd (fastbn.dtypes).
STATISTICS = (np.float32, np.float64)


def _vector(dtype):
    return np.zeros(4, dtype)


def _forward_finish(dtype, finalize):
    """The reduction's finishing arguments: placeholders (the moments stage) or the
    fused training forward's (weight, bias, running statistics, saved statistics,
    coefficients), as :mod:`fastbn.cuda.stages` and :mod:`fastbn.cuda.fused` pass them."""
    p = policy(dtype)
    if not finalize:
        f = _vector(np.float64)
        return (False, f, f, False, False, 1.0, 1.0, 0.0, f, f, False, f, f, f, f, f)
    par, stat, comp = _vector(p.parameters), _vector(p.statistics), _vector(p.compute)
    return (True, par, par, True, True, 1e-5, 1e38, 0.1, par, par, True, stat, stat, comp, comp, comp)


def _backward_finish(dtype, finalize, mean):
    p = policy(dtype)
    if not finalize:
        f = _vector(np.float64)
        return (False, f, f, False, False, 1.0, f, f, f, f, f, f)
    par, comp = _vector(p.parameters), _vector(p.compute)
    return (True, _vector(mean), par, True, True, 1e38, par, par, comp, comp, comp, comp)


#: (storage view, fused finishing arguments, in 32-bit words).  16-bit planes of even
#: size and rows of an even number of channels are reduced in words: float16's fused
#: form compiles that variant of both families, its stage form the single-value one;
#: bfloat16 (int16) compiles its fused form in words (its single-value kernels differ
#: from float16's only in the conversion, which its elementwise kernels compile).
REDUCTION_FORMS = [(np.float16, False, False), (np.float16, True, True), (np.float32, False, False),
                   (np.float32, True, False), (np.float64, False, False), (np.float64, True, False),
                   (np.int16, True, True)]


@pytest.mark.parametrize("dtype, finalize, paired", REDUCTION_FORMS,
                         ids=[f"{np.dtype(d).name}-{'fused' if f else 'stage'}{'-words' if p else ''}"
                              for d, f, p in REDUCTION_FORMS])
def test_reduction_kernels_compile_to_ptx(compile_ptx, dtype, finalize, paired):
    from fastbn.cuda.planes import planes_kernels
    from fastbn.cuda.rows import rows_kernels

    dtype = np.dtype(dtype)
    x = np.zeros(60, dtype)
    xp = np.zeros(30, np.uint32) if paired else x
    partials = np.zeros((4, 3))
    counters, f64 = np.zeros(4, np.int32), _vector(np.float64)
    planes, rows = planes_kernels(dtype, False, paired), rows_kernels(dtype, False, paired)
    finish = _forward_finish(dtype, finalize)
    ptx = compile_ptx(planes.moments, xp, 4, 5, 3, partials, partials, partials, counters, f64, f64, f64, *finish)
    assert "shfl.sync.down" in ptx  # the warp merge uses shuffles
    assert "atom.global.add" in ptx and "membar.gl" in ptx  # the last-block merge
    assert _has_a_loop_over_values_in_32_bits(ptx)
    if paired:  # two values per 32-bit load
        assert any(op.startswith(("ld.global.u32", "ld.global.b32")) for loop in _loops(ptx) for op in loop)
    ptx = compile_ptx(rows.moments, xp, 4, 3, partials, partials, partials, counters, f64, f64, f64, *finish)
    assert "atom.global.add" in ptx
    assert _has_a_loop_over_values_in_32_bits(ptx)
    if paired:
        assert any(op.startswith(("ld.global.u32", "ld.global.b32")) for loop in _loops(ptx) for op in loop)
    for mean in STATISTICS:
        finish = _backward_finish(dtype, finalize, mean)
        compile_ptx(planes.backward_sums, xp, xp, _vector(mean), 4, 5, 3, partials, partials, counters,
                    f64, f64, f64, *finish)
        compile_ptx(rows.backward_sums, xp, xp, _vector(mean), 4, 3, partials, partials, counters,
                    f64, f64, f64, *finish)


def _divisions(ptx):
    return len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)\b", ptx))


def _wide_arithmetic(ptx):
    """64-bit integer multiplies, divisions and remainders (``mul.wide.u32`` is a 32-bit
    multiply with a 64-bit product: an address, not index arithmetic)."""
    return re.findall(r"\b(?:mul|mad|div|rem)(?:\.lo|\.hi)?\.[su]64\b", ptx)


def _loops(ptx):
    """The instructions of every loop (from a label to the last branch back to it)."""
    lines = [line.strip() for line in ptx.splitlines()]
    loops = []
    for start, line in enumerate(lines):
        label = re.fullmatch(r"(\$L__BB\d+_\d+):", line)
        if not label:
            continue
        back = [end for end in range(start + 1, len(lines)) if re.search(rf"\bbra(?:\.uni)?\s+\{label.group(1)};",
                                                                         lines[end])]
        if back:
            loops.append([op for op in lines[start + 1:back[-1] + 1]
                          if op and not op.endswith(":") and not op.startswith((".", "//", "{", "}"))])
    return loops


def _loop_body(ptx):
    """The largest loop: the elementwise kernels' unrolled grid-stride loop."""
    return max(_loops(ptx), key=len)


def _has_a_loop_over_values_in_32_bits(ptx):
    """True when some loop loading values from global memory (a reduction's loop over
    its values, whatever their width) has no 64-bit index arithmetic.  (The merges'
    loops over float64 partials index 2-D arrays in 64 bits; so did the loops over
    values before they carried a 32-bit index.)"""
    loads = re.compile(r"ld\.global(?:\.nc)?\.(?:f32|f64|[bsu]16|[bu]32)\b")
    return any(not _wide_arithmetic("\n".join(loop)) for loop in _loops(ptx) if any(map(loads.match, loop)))


#: (storage kernel view, paired): 16-bit storage runs paired (bfloat16's view is int16).
#: Its single-value form (arrays at different 4-byte phases) is the float32 form's loop
#: with the 16-bit loads and stores the paired kernels' edge elements compile already.
ELEMENTWISE_FORMS = [(np.float16, True), (np.int16, True), (np.float32, False), (np.float64, False)]


@pytest.mark.parametrize("dtype, paired", ELEMENTWISE_FORMS,
                         ids=[f"{np.dtype(d).name}-{'paired' if p else 'single'}" for d, p in ELEMENTWISE_FORMS])
def test_elementwise_kernels_compile_to_ptx(compile_ptx, dtype, paired):
    from fastbn.cuda.elementwise import elementwise_kernels
    from fastbn.cuda.loadstore import Variant
    from fastbn.cuda.plans import UNROLL

    dtype = np.dtype(dtype)
    p = policy(dtype)
    x = np.zeros(60, dtype)
    u = np.zeros(30, np.uint32) if paired else x
    vector = _vector(p.compute)
    kernels = elementwise_kernels(dtype, Variant(paired, False))
    # Integer divisions only set up the thread's cursors (a quotient and a remainder per
    # cursor, plus the step's, plus the edge elements' of a paired launch), none per
    # element; with 32-bit indices they are 32-bit, and no index arithmetic is 64-bit.
    most = 2 * (UNROLL + 1) + (2 * 2 if paired else 0)
    floor = p.compute.type(0)
    ptxs = [compile_ptx(kernels.apply, u, u, u, 0, x, x, True, floor, 5, 4, vector, vector, vector, x),
            compile_ptx(kernels.backward_apply, u, u, u, 0, x, x, 5, 4, vector, vector, vector, vector, x)]
    par, stat = _vector(p.parameters), _vector(p.statistics)
    ptxs.append(compile_ptx(kernels.apply_eval, u, u, u, 0, x, x, False, floor, 5, 4, par, par, par, par, True, True,
                            1e-5, 1e38, stat, stat, x))
    ptxs.append(compile_ptx(kernels.relu_mask, u, u, u, 0, x, x, x))
    for ptx in ptxs:
        assert _divisions(ptx) <= most, _divisions(ptx)
        assert not _wide_arithmetic(ptx), _wide_arithmetic(ptx)
        if paired:  # two 16-bit values per 32-bit load, four words in flight
            assert len(re.findall(r"\bld\.global(?:\.nc)?\.(?:u32|b32|v2)", "\n".join(_loop_body(ptx)))) >= UNROLL


def test_elementwise_32_bit_indices_shorten_the_loop(compile_ptx):
    """The float32 apply loop per element: 32-bit indices against the 64-bit variant
    (on numba 0.68, sm_90: 31.5 against 53 PTX instructions per element)."""
    from fastbn.cuda.elementwise import elementwise_kernels
    from fastbn.cuda.loadstore import Variant
    from fastbn.cuda.plans import UNROLL

    x, vector = np.zeros(60, np.float32), _vector(np.float32)
    loops = {}
    for wide in (False, True):
        apply = elementwise_kernels(x.dtype, Variant(False, wide)).apply
        ptx = compile_ptx(apply, x, x, x, 0, x, x, False, np.float32(0), 5, 4, vector, vector, vector, x)
        assert bool(_wide_arithmetic(ptx)) == wide  # the 64-bit variant's cursors divide in 64 bits
        loops[wide] = _loop_body(ptx)
    assert len(loops[False]) / UNROLL <= 0.75 * len(loops[True]) / UNROLL, (len(loops[False]), len(loops[True]))


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_channel_kernels_compile_to_ptx(compile_ptx, dtype):
    from fastbn.cuda import channels

    p = policy(dtype)
    f64, statistics, parameters = _vector(np.float64), _vector(p.statistics), _vector(p.parameters)
    vector = _vector(p.compute)
    # Moments (float64); (mean, var) pairs: running statistics (parameter dtype) or any
    # statistics-dtype or float64 pair the stage accepts (count is then a placeholder).
    inputs = [(f64, f64, f64, True)]
    kinds = {np.dtype(d): _vector(d) for d in (p.parameters, p.statistics, np.float64)}
    inputs += [(mean, mean, var, False) for mean in kinds.values() for var in kinds.values()]
    for count, mean, second, from_moments in inputs:
        compile_ptx(channels.forward_coefficients, count, mean, second, from_moments, parameters, parameters,
                    True, False, 1e-5, 1e38, 0.1, parameters, parameters, from_moments,
                    statistics, statistics, vector, vector, vector)
    for mean in STATISTICS:
        for invstd in STATISTICS:
            compile_ptx(channels.backward_coefficients, f64, f64, f64, _vector(mean), _vector(invstd), parameters,
                        True, True, 1e38, vector, vector, vector, vector)
        compile_ptx(channels.weight_bias_gradients, f64, f64, _vector(mean), parameters, parameters)
    compile_ptx(channels.mean_var, f64, f64, f64, True, statistics, statistics)


def test_merge_kernels_compile_to_ptx(compile_ptx):
    from fastbn.cuda import channels

    f64 = _vector(np.float64)
    compile_ptx(channels.merge_moments, *[f64] * 9)
    compile_ptx(channels.merge_sums, *[f64] * 9)
    compile_ptx(channels.mean_var, f64, f64, f64, False, f64, f64)
    compile_ptx(channels.inverse_std, f64, f64, 1e-5, f64)


@pytest.mark.parametrize("dtype", KERNEL_VIEWS + [np.int32])
def test_copy_and_zero_kernels_compile_to_ptx(compile_ptx, dtype):
    from fastbn.cuda import copies, workspace

    a = np.zeros((1, 2, 3, 4, 5), dtype)
    compile_ptx(copies.copy5, a, a)
    compile_ptx(workspace._zero, np.zeros(8, dtype))


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_norm_kernels_compile_to_ptx(compile_ptx, dtype):
    """The per-index kernels of layer, group and instance norm (:mod:`fastbn.cuda.groups`),
    with the argument dtypes :mod:`fastbn.cuda.norms` launches them with (saved
    statistics from the caller: float32 or float64)."""
    from fastbn.cuda import groups

    p = policy(dtype)
    f64, parameters, vector = _vector(np.float64), _vector(p.parameters), _vector(p.compute)
    saved = _vector(p.statistics)
    compile_ptx(groups.group_forward_coefficients, f64, f64, f64, 2, parameters, parameters, True, False, 1e-5,
                1e38, f64, f64, saved, saved, vector, vector, vector)
    compile_ptx(groups.instance_running_update, f64, f64, f64, 0.1, f64, f64, parameters, parameters)
    compile_ptx(groups.column_coefficients, parameters, parameters, True, False, vector, vector, vector)
    compile_ptx(groups.column_gradients, f64, f64, parameters, parameters)
    for statistics in map(_vector, STATISTICS):
        compile_ptx(groups.expand_groups, statistics, 2, f64)
        compile_ptx(groups.group_backward_coefficients, 12.0, f64, f64, statistics, statistics, 2, parameters, True,
                    1e38, vector, vector, vector, vector)
        compile_ptx(groups.group_parameter_gradients, f64, f64, statistics, 2, f64, f64, parameters, parameters)
        compile_ptx(groups.normalized_coefficients, statistics, statistics, 1e38, f64, f64, vector, vector, vector)
