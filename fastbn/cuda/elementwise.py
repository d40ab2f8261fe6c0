"""The elementwise kernels of both families: y from x, dx from dy and x, per channel,
and their launchers.

Both families are one index space: element ``i`` of the flat buffer belongs to channel
``(i // S) % C``, with ``S`` the plane size for planes (``(N, C, S)``) and 1 for rows
(``(M, C)``).  :mod:`fastbn.cuda.loadstore` walks it (no division per element, four
loads in flight per thread), in 32-bit indices below 2**31 elements, and for 16-bit
storage two values per 32-bit load and store when every array of the launch starts at
the same 4-byte phase (the launchers pick the :class:`~fastbn.cuda.loadstore.Variant`).

Each kernel takes its arrays twice: as the launch's *units* (``xu``: the words of a
paired launch, else the values themselves) and as values (``x``, for the single
elements at the edges of a paired launch), then ``head``: the elements before the
first word (0 or 1).  Values load with :func:`fastbn.half.widen` and store with
:func:`fastbn.half.narrow`, so one source serves every storage dtype's kernel view.

:func:`elementwise_kernels` ``.apply_eval`` computes eval-mode coefficients from the
running statistics in its prologue, per block, into dynamic shared memory (block 0 also
stores the saved statistics): an eval forward is that one launch.  The coefficients are
those of :func:`fastbn.algebra.forward_channel`, as in the stage kernels.
"""

import collections
import functools

import numpy as np
from numba import cuda

from ..algebra import forward_channel
from ..half import narrow, widen
from . import launching
from .arrays import data_pointer, policy_of, word_view
from .loadstore import Variant, edges, grid_loop, pair_codec, variant_of, walkers
from .plans import elementwise_grid

#: The elementwise kernels of one storage dtype and variant.
ElementwiseKernels = collections.namedtuple("ElementwiseKernels",
                                            ["apply", "backward_apply", "apply_eval", "relu_mask"])

SINGLE = Variant(paired=False, wide_index=False)


@functools.cache
def elementwise_kernels(dtype, variant=SINGLE):
    """The :class:`ElementwiseKernels` for storage (kernel-view) ``dtype`` and ``variant``."""
    dtype = np.dtype(dtype)
    comp = policy_of(dtype).compute.type
    index, _, _, next_channel = walkers(variant.wide_index)
    low, high, pack = pair_codec(dtype)
    paired = variant.paired

    @cuda.jit(device=True)
    def bounded(v, floor):
        """``v`` raised to ``floor`` (-inf: none; 0: ReLU); NaN stays NaN."""
        return floor if v < floor else v

    # apply: ops = (xu, ru, yu, x, residual, add_residual, floor, center, scale, shift, y)
    @cuda.jit(device=True)
    def apply_one_load(i, ops):
        return widen(ops[3][i])

    @cuda.jit(device=True)
    def apply_one_store(i, a, o, c, plane_size, num_channels, ops):
        center, scale, shift, y = ops[7], ops[8], ops[9], ops[10]
        v = (a - center[c]) * scale[c] + shift[c]
        if ops[5]:
            v += widen(ops[4][i])
        y[i] = narrow(bounded(v, ops[6]), y.dtype)

    @cuda.jit(device=True)
    def apply_pair_load(u, ops):
        return ops[0][u]

    @cuda.jit(device=True)
    def apply_pair_store(u, word, o, c, plane_size, num_channels, ops):
        center, scale, shift = ops[7], ops[8], ops[9]
        d = next_channel(o, c, plane_size, num_channels)
        v0 = (low(word) - center[c]) * scale[c] + shift[c]
        v1 = (high(word) - center[d]) * scale[d] + shift[d]
        if ops[5]:
            r = ops[1][u]
            v0 += low(r)
            v1 += high(r)
        ops[2][u] = pack(bounded(v0, ops[6]), bounded(v1, ops[6]))

    # backward_apply: ops = (dyu, xu, dxu, dy, x, center, dy_scale, x_scale, shift, dx)
    @cuda.jit(device=True)
    def backward_one_load(i, ops):
        return widen(ops[3][i]), widen(ops[4][i])

    @cuda.jit(device=True)
    def backward_one_store(i, values, o, c, plane_size, num_channels, ops):
        center, dy_scale, x_scale, shift, dx = ops[5], ops[6], ops[7], ops[8], ops[9]
        g, a = values
        dx[i] = narrow(g * dy_scale[c] + (a - center[c]) * x_scale[c] + shift[c], dx.dtype)

    @cuda.jit(device=True)
    def backward_pair_load(u, ops):
        return ops[0][u], ops[1][u]

    @cuda.jit(device=True)
    def backward_pair_store(u, words, o, c, plane_size, num_channels, ops):
        center, dy_scale, x_scale, shift = ops[5], ops[6], ops[7], ops[8]
        g, a = words
        d = next_channel(o, c, plane_size, num_channels)
        v0 = low(g) * dy_scale[c] + (low(a) - center[c]) * x_scale[c] + shift[c]
        v1 = high(g) * dy_scale[d] + (high(a) - center[d]) * x_scale[d] + shift[d]
        ops[2][u] = pack(v0, v1)

    # relu_mask: ops = (dyu, yu, gu, dy, y, g)
    @cuda.jit(device=True)
    def relu_one_load(i, ops):
        return widen(ops[3][i]), widen(ops[4][i])

    @cuda.jit(device=True)
    def relu_one_store(i, values, o, c, plane_size, num_channels, ops):
        g, v = values
        ops[5][i] = narrow(comp(0) if v <= comp(0) else g, ops[5].dtype)

    @cuda.jit(device=True)
    def relu_pair_load(u, ops):
        return ops[0][u], ops[1][u]

    @cuda.jit(device=True)
    def relu_pair_store(u, words, o, c, plane_size, num_channels, ops):
        g, v = words
        zero = comp(0)
        ops[2][u] = pack(zero if low(v) <= zero else low(g), zero if high(v) <= zero else high(g))

    def walk(one_load, one_store, pair_load, pair_store):
        """The device function running a kernel's units, then (paired) its edge elements."""
        units = grid_loop(pair_load if paired else one_load, pair_store if paired else one_store,
                          2 if paired else 1, variant.wide_index)
        singles = edges(one_load, one_store, variant.wide_index)

        @cuda.jit(device=True)
        def run(head, num_units, size, plane_size, num_channels, ops):
            units(num_units, head, plane_size, num_channels, ops)
            if paired:
                singles(head, num_units, size, plane_size, num_channels, ops)
        return run

    apply_walk = walk(apply_one_load, apply_one_store, apply_pair_load, apply_pair_store)
    backward_walk = walk(backward_one_load, backward_one_store, backward_pair_load, backward_pair_store)
    relu_walk = walk(relu_one_load, relu_one_store, relu_pair_load, relu_pair_store)

    @cuda.jit
    def apply(xu, ru, yu, head, x, residual, add_residual, floor, plane_size, num_channels, center, scale, shift,
              y):
        """y = max((x - center[c]) * scale[c] + shift[c] (+ residual), floor); vectors (C,)
        and ``floor`` (-inf, or 0 for ReLU) in the compute dtype; ``residual`` like x, read
        only when ``add_residual`` (else any placeholder of x's type)."""
        ops = (xu, ru, yu, x, residual, add_residual, floor, center, scale, shift, y)
        apply_walk(head, xu.size, x.size, index(plane_size), index(num_channels), ops)

    @cuda.jit
    def apply_eval(xu, ru, yu, head, x, residual, add_residual, floor, plane_size, num_channels, running_mean,
                   running_var, weight, bias, use_weight, use_bias, eps, big, save_mean, save_invstd, y):
        """Eval forward in one launch: each block computes every channel's coefficients
        from the running statistics into dynamic shared memory (3 C values of the compute
        dtype), block 0 also storing save_mean and save_invstd, then applies them."""
        shared = cuda.shared.array(0, comp)
        center = shared[:num_channels]
        scale = shared[num_channels:2 * num_channels]
        shift = shared[2 * num_channels:3 * num_channels]
        c = cuda.threadIdx.x
        while c < num_channels:
            mean = np.float64(running_mean[c])
            var = np.float64(running_var[c])
            if cuda.blockIdx.x == 0:
                forward_channel(c, mean, var, weight, bias, use_weight, use_bias, eps, big,
                                save_mean, save_invstd, center, scale, shift)
            else:
                # Other blocks only need the coefficients: the saved statistics go to
                # slots forward_channel overwrites afterwards (center, then scale).
                forward_channel(c, mean, var, weight, bias, use_weight, use_bias, eps, big,
                                center, scale, center, scale, shift)
            c += cuda.blockDim.x
        cuda.syncthreads()
        ops = (xu, ru, yu, x, residual, add_residual, floor, center, scale, shift, y)
        apply_walk(head, xu.size, x.size, index(plane_size), index(num_channels), ops)

    @cuda.jit
    def backward_apply(dyu, xu, dxu, head, dy, x, plane_size, num_channels, center, dy_scale, x_scale, shift, dx):
        """dx = dy * dy_scale[c] + (x - center[c]) * x_scale[c] + shift[c] (compute dtype)."""
        ops = (dyu, xu, dxu, dy, x, center, dy_scale, x_scale, shift, dx)
        backward_walk(head, xu.size, x.size, index(plane_size), index(num_channels), ops)

    @cuda.jit
    def relu_mask(dyu, yu, gu, head, dy, y, g):
        """g = 0 where y <= 0 else dy (PyTorch's threshold_backward), flat buffers."""
        ops = (dyu, yu, gu, dy, y, g)
        relu_walk(head, dyu.size, dy.size, index(1), index(1), ops)

    return ElementwiseKernels(apply, backward_apply, apply_eval, relu_mask)


def _units(*arrays):
    """``(kernels, grid, head, units)`` of a launch over flat, same-sized ``arrays`` of one
    storage view: the variant's kernels, its grid, and the arrays as its units."""
    dtype = arrays[0].dtype
    phases = tuple(data_pointer(a) % 4 for a in arrays) if dtype.itemsize == 2 else ()
    variant = variant_of(arrays[0].size, phases)
    kernels = elementwise_kernels(dtype, variant)
    if not variant.paired:
        return kernels, elementwise_grid(arrays[0].size), 0, arrays
    head = phases[0] // 2
    units = tuple(word_view(a, head) for a in arrays)
    return kernels, elementwise_grid(units[0].size), head, units


def launch_apply(xf, rf, yf, floor, plane_size, num_channels, center, scale, shift, stream):
    """Queue ``yf = max((xf - center[c]) * scale[c] + shift[c] (+ rf), floor)`` over flat
    buffers (``rf`` None: no residual)."""
    residual = xf if rf is None else rf
    kernels, (grid, block), head, (xu, ru, yu) = _units(xf, residual, yf)
    launching.launch(kernels.apply, grid, block, stream, xu, ru, yu, head, xf, residual, rf is not None, floor,
                     plane_size, num_channels, center, scale, shift, yf)


def launch_apply_eval(xf, rf, yf, floor, plane_size, num_channels, coefficient_args, stream):
    """Queue the one-launch eval forward (``coefficient_args``: running_mean, running_var,
    weight, bias, use_weight, use_bias, eps, big, save_mean, save_invstd)."""
    residual = xf if rf is None else rf
    kernels, (grid, block), head, (xu, ru, yu) = _units(xf, residual, yf)
    launching.launch(kernels.apply_eval, grid, block, stream, xu, ru, yu, head, xf, residual, rf is not None,
                     floor, plane_size, num_channels, *coefficient_args, yf,
                     shared_bytes=eval_shared_bytes(num_channels, xf.dtype))


def launch_backward_apply(dyf, xf, dxf, plane_size, num_channels, center, dy_scale, x_scale, shift, stream):
    """Queue ``dxf = dyf * dy_scale[c] + (xf - center[c]) * x_scale[c] + shift[c]``."""
    kernels, (grid, block), head, (dyu, xu, dxu) = _units(dyf, xf, dxf)
    launching.launch(kernels.backward_apply, grid, block, stream, dyu, xu, dxu, head, dyf, xf, plane_size,
                     num_channels, center, dy_scale, x_scale, shift, dxf)


def launch_relu_mask(dyf, yf, gf, stream):
    """Queue ``gf = 0 where yf <= 0 else dyf``."""
    kernels, (grid, block), head, (dyu, yu, gu) = _units(dyf, yf, gf)
    launching.launch(kernels.relu_mask, grid, block, stream, dyu, yu, gu, head, dyf, yf, gf)


def eval_shared_bytes(num_channels, dtype):
    """Dynamic shared memory of ``apply_eval`` for C channels of storage ``dtype``."""
    return 3 * num_channels * policy_of(dtype).compute.itemsize


#: Dynamic shared memory a kernel may use without opting in (48 KiB on every GPU).
MAX_DYNAMIC_SHARED = 48 * 1024
