"""The dtype policy: for each storage dtype, what every stage computes and returns in.

One table for every backend (the one place these choices are made):

==========  ==========  ==========  ============  ==========  ===========
storage     accumulate  statistics  parameters    compute     backends
(x, y, dx)  (sums)      (saved,     (weight,      (elementwise
                        batch_stats) bias, running, arithmetic,
                                    dweight)      coefficients)
==========  ==========  ==========  ============  ==========  ===========
float32     float64     float64     float32       float32     cpu, cuda
float64     float64     float64     float64       float64     cpu, cuda
float16     float32     float32     float32       float32     cpu, cuda
bfloat16    float32     float32     float32       float32     cpu, cuda
==========  ==========  ==========  ============  ==========  ===========

- float32 accumulates in float64 and returns float64 statistics, so offset data
  (x = 1e4 + randn) keeps its variance and the backward pass sees the mean unrounded.
- 16-bit storage accumulates in float32 (exact enough for 8- to 11-bit mantissas) and
  keeps parameters and statistics in float32, as PyTorch's mixed-precision batch norm.
  The CPU kernels widen each value to float32 and accumulate in float64, the float32
  path's accumulators (one set of reduction kernels; accumulation is not their cost),
  and return float32 statistics.  bfloat16 is named by ``ml_dtypes.bfloat16`` arrays
  (an optional dependency) and by ``torch.bfloat16`` tensors; kernels see 16-bit
  storage through the integer views of :mod:`fastbn.half`.
- :class:`fastbn.Moments` is float64 for every storage dtype: the merge runs in float64.
"""

import functools
from typing import NamedTuple

import numpy as np

FLOAT16, FLOAT32, FLOAT64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


class DtypePolicy(NamedTuple):
    """What a storage dtype computes in (see the module's table)."""

    storage: str
    accumulate: np.dtype
    statistics: np.dtype
    parameters: np.dtype
    compute: np.dtype
    backends: tuple


#: The policy of every storage dtype fastbn knows, by dtype name (in the order error
#: messages list the accepted dtypes).
POLICIES = {
    "float32": DtypePolicy("float32", FLOAT64, FLOAT64, FLOAT32, FLOAT32, ("cpu", "cuda")),
    "float64": DtypePolicy("float64", FLOAT64, FLOAT64, FLOAT64, FLOAT64, ("cpu", "cuda")),
    "float16": DtypePolicy("float16", FLOAT32, FLOAT32, FLOAT32, FLOAT32, ("cpu", "cuda")),
    "bfloat16": DtypePolicy("bfloat16", FLOAT32, FLOAT32, FLOAT32, FLOAT32, ("cpu", "cuda")),
}


#: Policies by the dtype objects callers pass, filled on first use: looking a dtype up
#: by ``np.dtype(d).name`` costs a microsecond per call (the name is computed).
_POLICY_OF = {}


def policy(dtype):
    """The :class:`DtypePolicy` of storage ``dtype`` (KeyError for dtypes without one)."""
    try:
        return _POLICY_OF[dtype]
    except (KeyError, TypeError):  # not seen yet, or unhashable
        found = POLICIES[np.dtype(dtype).name]
    try:
        _POLICY_OF[dtype] = found
    except TypeError:
        pass
    return found


def numpy_dtype(name):
    """The NumPy dtype named ``name``, or None for bfloat16 without ``ml_dtypes`` (an
    optional dependency, which defines it; imported here when installed, ~20 ms)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def storage_dtypes(backend):
    """The storage dtypes ``backend`` ("cpu" or "cuda") accepts, as NumPy dtypes (those
    NumPy can name: bfloat16 only with ``ml_dtypes`` installed)."""
    found = (numpy_dtype(name) for name, p in POLICIES.items() if backend in p.backends)
    return tuple(d for d in found if d is not None)


def statistics_dtypes(backend):
    """The dtypes of statistics (``save_mean``, ``save_invstd``) ``backend`` accepts back."""
    found = {policy(d).statistics for d in storage_dtypes(backend)}
    return tuple(sorted(found, key=lambda d: d.itemsize))  # messages list float32 first


@functools.lru_cache(maxsize=None)
def largest(dtype):
    """The largest finite value of float ``dtype``: where coefficients saturate."""
    return float(np.finfo(dtype).max)
