"""Virtual (ghost) batch norm on the CPU: statistics per (slice, c), slices of ``k``
samples along N (the last one smaller when k does not divide N), all slices in one pass.

No kernel of its own: the batched rows and planes kernels of group norm
(:mod:`fastbn.cpu.norms`) with slices in the role of samples, and the batch-norm
coefficient stage (:func:`fastbn.cpu.stages.forward_coefficients`,
:func:`~fastbn.cpu.stages.backward_coefficients`) run over ``slices * C`` entries with
weight, bias and running statistics tiled per slice, so the algebra stays that of
:mod:`fastbn.algebra`.  Arguments arrive validated by :mod:`fastbn.ghost`.

- Rows family (rank 2, or channel-last memory ``(N * S, C)``): a slice is a contiguous
  run of ``k * S`` rows, so the batched rows kernels take the whole slices as
  ``(N // k, k * S, C)`` and the tail slice as ``(1, r * S, C)``: two calls at most,
  statistics directly per (slice, c).
- Planes family (channel-first memory ``(N, C, S)``): per-(n, c) moments from the planes
  kernels on the view ``(1, N * C, S)``, Chan-merged over the n of each slice in
  ascending order; coefficients per (slice, c) repeated per (n, c) for the apply pass.
"""

import numpy as np

from .. import _checks, dtypes
from ..coefficients import BackwardCoefficients, ForwardCoefficients
from ..geometry import PLANES, instance_geometry
from ..stats import BackwardSums, Moments
from . import channels, groups, norms, plans, stages, views


class _SliceRows(norms._PerChannel):
    """Whole slices of channel-last rows as the batched view (slices, rows per slice, C):
    one "sample" of the group-norm helpers per slice."""

    def __init__(self, rows, num_slices):
        self.channel_last = True
        self.num_samples, self.num_channels = num_slices, rows.shape[1]
        self.num_rows = rows.shape[0] // num_slices
        self.rows_per_chunk = plans.rows_per_chunk(self.num_channels)
        self.num_chunks = -(-self.num_rows // self.rows_per_chunk)
        self.size = rows.size


class _Slicing:
    """How one call cuts ``x`` into slices and which kernel family reads them."""

    def __init__(self, x, geom, k):
        self.geom = geom
        self.num_samples = x.shape[0]
        self.num_channels = geom.kept
        self.k = k
        self.num_slices = -(-self.num_samples // k)
        self.samples = np.minimum(k, self.num_samples - k * np.arange(self.num_slices))  # per slice
        self.per_sample = x.size // (self.num_samples * self.num_channels)  # values per (n, c)
        self.by_planes = geom.family == PLANES
        if self.by_planes:  # (N, C, S) seen as (1, N * C, S)
            xv = views.kernel_view(x, geom)
            self.planes = instance_geometry(xv.shape, xv.strides, xv.itemsize)

    def slice_count(self):
        """Values per (slice, c), float64 (slices * C,)."""
        return np.repeat(self.samples * float(self.per_sample), self.num_channels)

    def kernel_view(self, a):
        """A dense array as the view its kernels take: (N, C, S) planes or (N * S, C) rows."""
        v = views.kernel_view(a, self.geom)
        return v if self.by_planes else v.reshape(-1, self.num_channels)

    def row_parts(self, *rows):
        """``[(first slice, number of slices, views of rows)]``: the whole slices, then the tail."""
        full = self.num_samples // self.k
        split = full * self.k * self.per_sample
        parts = []
        if full:
            parts.append((0, full, tuple(r[:split] for r in rows)))
        if full < self.num_slices:
            parts.append((full, 1, tuple(r[split:] for r in rows)))
        return parts

    def per_sample_vectors(self, vectors):
        """Per-(slice, c) vectors repeated for each sample n of the slice: (N * C,) each."""
        return [np.repeat(v.reshape(self.num_slices, self.num_channels), self.samples, axis=0).ravel()
                for v in vectors]

    def slice_rows(self, v, first, count):
        """Rows ``first .. first + count`` of a per-(slice, c) vector, as (count, C)."""
        return v.reshape(self.num_slices, self.num_channels)[first:first + count]


def _tiled(v, s):
    """A (C,) parameter vector repeated for every slice, (slices * C,); None stays None."""
    return None if v is None else np.tile(v, s.num_slices)


def _padded_by_slice(v, s):
    """Per-(n, c) values (N * C,) as (slices, C, k), zero past N: the k samples of each
    (slice, c) consecutive, for the run merges of :mod:`fastbn.cpu.groups`."""
    padded = np.zeros((s.num_slices * s.k, s.num_channels))
    padded[:s.num_samples] = v.reshape(s.num_samples, s.num_channels)
    return np.ascontiguousarray(padded.reshape(s.num_slices, s.k, s.num_channels).transpose(0, 2, 1)).ravel()


def _slice_moments(x, s):
    """Per-(slice, c) :class:`Moments`, float64 (slices * C,)."""
    if s.by_planes:
        m = stages.moments(s.kernel_view(x), s.planes)
        result = Moments(*np.empty((3, s.num_slices * s.num_channels)))
        # Zero-count padding is neutral in Chan's merge: the tail slice merges its own samples only.
        groups.merge_groups(*(_padded_by_slice(v, s) for v in m), s.k, *result)
        return result
    parts = [norms._channel_moments(xr, _SliceRows(xr, count)) for _, count, (xr,) in s.row_parts(s.kernel_view(x))]
    return Moments(*(np.concatenate(v) for v in zip(*parts)))


def forward(x, weight, bias, running_mean, running_var, momentum, eps, geom, k, out, dtype):
    """``(y, save_mean, save_invstd)`` of training batch norm per slice of ``k`` samples;
    statistics float64 (slices, C).  Running statistics get the average over the slices
    of ``(1 - momentum) * r + momentum * slice statistic`` (unbiased slice variances)."""
    _checks.check_not_16_bit(dtype, "x", "batch norm with virtual_batch_size")
    s = _Slicing(x, geom, k)
    num_c = s.num_channels
    m = _slice_moments(x, s)
    # Per-(slice, c) vectors are flat (slices * C,): the batch-norm coefficient stage runs
    # them as slices * C channels, with weight and bias tiled per slice.
    c = stages.forward_coefficients(m.count, m.mean, m.m2, True, _tiled(weight, s), _tiled(bias, s), eps,
                                    None, None, momentum, False, dtype)
    center, scale, shift = c.center, c.scale, c.shift
    if running_mean is not None:
        _update_running(m, s, weight, bias, eps, running_mean, running_var, momentum, dtype)
    target = views.output_target(out, (x,), geom)
    if s.by_planes:
        coefficients = ForwardCoefficients(*s.per_sample_vectors((center, scale, shift)), None, None)
        stages.apply(s.kernel_view(x), coefficients, s.planes, s.kernel_view(target))
    else:
        for first, count, (xr, yr) in s.row_parts(s.kernel_view(x), s.kernel_view(target)):
            view = _SliceRows(xr, count)
            norms._launch(norms.batched_apply, xr.size)(
                view.batched(xr), *(s.slice_rows(v, first, count) for v in (center, scale, shift)),
                view.rows_per_chunk, view.batched(yr))
    shape = (s.num_slices, num_c)
    return views.finish_output(target, out), c.mean.reshape(shape), c.invstd.reshape(shape)


def _update_running(m, s, weight, bias, eps, running_mean, running_var, momentum, dtype):
    """Running statistics <- the average over the slices of each slice's update.

    At a given count the update is linear in the slice's (mean, M2), so slices of one
    size update once with their averaged moments, weighted by how many they are: one
    (C,) update for the whole slices and one for a smaller last slice (the coefficients
    the stage also computes are dropped), instead of slices * C updates."""
    shape = (s.num_slices, s.num_channels)
    full = s.num_samples // s.k
    total_mean, total_var = np.zeros((2, s.num_channels))
    for lo, hi in ((0, full), (full, s.num_slices)):
        if hi == lo:
            continue
        averaged = [v.reshape(shape)[lo:hi].mean(axis=0) for v in (m.mean, m.m2)]
        updated = [np.array(r, np.float64) for r in (running_mean, running_var)]
        stages.forward_coefficients(m.count.reshape(shape)[lo], *averaged, True, weight, bias, eps, *updated,
                                    momentum, True, dtype)
        total_mean += (hi - lo) * updated[0]
        total_var += (hi - lo) * updated[1]
    running_mean[...] = total_mean / s.num_slices
    running_var[...] = total_var / s.num_slices


def _slice_sums(dy, x, mean, s):
    """Per-(slice, c) sum(dy) and sum(dy * (x - slice mean)), float64 (slices * C,)."""
    if s.by_planes:
        sample_mean, = s.per_sample_vectors((mean,))
        sums = stages.backward_sums(s.kernel_view(dy), s.kernel_view(x), sample_mean, s.planes)
        return [_padded_by_slice(v, s).reshape(-1, s.k).sum(axis=1) for v in (sums.sum_dy, sums.sum_dy_xmu)]
    parts = [norms._channel_sums(gr, xr, s.slice_rows(mean, first, count).ravel(), _SliceRows(xr, count))
             for first, count, (gr, xr) in s.row_parts(s.kernel_view(dy), s.kernel_view(x))]
    return [np.concatenate(v) for v in zip(*parts)]


def backward(dy, x, save_mean, save_invstd, weight, geom, k, out, dtype):
    """``(dx, dweight, dbias)`` of training batch norm per slice of ``k`` samples, from
    the forward's (slices, C) statistics; dweight and dbias (C,) in the parameter dtype."""
    _checks.check_not_16_bit(dtype, "x", "batch norm with virtual_batch_size")
    s = _Slicing(x, geom, k)
    num_c = s.num_channels
    mean = np.ascontiguousarray(save_mean, np.float64).ravel()
    invstd = np.ascontiguousarray(save_invstd, np.float64).ravel()
    sum_dy, sum_dy_xmu = _slice_sums(dy, x, mean, s)
    sums = BackwardSums(s.slice_count(), sum_dy, sum_dy_xmu)
    coefficients = stages.backward_coefficients(sums, mean, invstd, _tiled(weight, s), True, dtype)
    grads = np.empty((2, s.num_slices * num_c))
    channels.weight_bias_gradients(sum_dy, sum_dy_xmu, invstd, *grads)
    target = views.output_target(out, (dy, x), geom)
    if s.by_planes:
        stages.backward_apply(s.kernel_view(dy), s.kernel_view(x),
                              BackwardCoefficients(*s.per_sample_vectors(coefficients)), s.planes,
                              s.kernel_view(target))
    else:
        for first, count, (gr, xr, dr) in s.row_parts(*(s.kernel_view(a) for a in (dy, x, target))):
            view = _SliceRows(xr, count)
            norms._launch(norms.batched_backward_apply, xr.size)(
                view.batched(gr), view.batched(xr), *(s.slice_rows(v, first, count) for v in coefficients),
                view.rows_per_chunk, view.batched(dr))
    dweight, dbias = grads.reshape(2, s.num_slices, num_c).sum(axis=1).astype(dtypes.policy(dtype).parameters)
    return views.finish_output(target, out), dweight, dbias
