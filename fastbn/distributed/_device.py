"""The few per-channel values of a synchronized call, between where the data lives and the host.

Statistics and sums are computed where the data lives (the CUDA stages for device
arrays); only their (C,) float64 vectors travel to the host for the collective (a few
hundred bytes), and the merged ones travel back for the coefficients and the apply
pass.  Host (NumPy) values pass through untouched.  Copies run on the caller's stream
(:mod:`fastbn.cuda.streams`), and the download waits for it: the collective needs the
values on the host.
"""

import numpy as np

FLOAT64 = np.dtype(np.float64)


def _stream(caller):
    """The numba stream ``caller``'s launches went to; 0 under the simulator (no streams)."""
    from ..cuda import streams

    s = streams.for_array(caller)
    return 0 if isinstance(s, streams.SimulatorStream) else s


def to_host(values, backend, caller):
    """``values`` (float64 (C,) vectors of ``backend``) as NumPy arrays."""
    if backend.name == "cpu":
        return tuple(np.ascontiguousarray(v, FLOAT64) for v in values)
    from ..cuda import streams
    from ..cuda.arrays import as_numba

    with streams.on_device_of(caller):
        s = _stream(caller)
        host = tuple(as_numba(v).copy_to_host(stream=s) for v in values)
        if s:
            s.synchronize()
    return host


def to_backend(values, backend, caller):
    """Host float64 (C,) vectors ``values`` where ``backend`` computes: themselves on
    the CPU, else one device allocation of ``caller``'s kind, filled on its stream."""
    if backend.name == "cpu":
        return tuple(values)
    from ..cuda import streams
    from ..cuda.arrays import as_numba, empty

    host = np.ascontiguousarray(np.stack(values), FLOAT64)
    with streams.on_device_of(caller):
        s = _stream(caller)
        block = empty(caller, host.shape, FLOAT64, stream=s)
        as_numba(block).copy_to_device(host, stream=s)
    return tuple(block[i] for i in range(host.shape[0]))


def empty_like(x, out, dtype):
    """``out``, else an empty array shaped like ``x`` (a rank holding no samples), of its kind."""
    if out is not None:
        return out
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, dtype)
    from ..cuda.arrays import empty

    return empty(x, tuple(x.shape), dtype)
