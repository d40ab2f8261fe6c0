"""The stream and device every launch of a call goes to: the caller's.

PyTorch tensors run on ``torch.cuda.current_stream(device)``, CuPy arrays on CuPy's
current stream, both wrapped by ``numba.cuda.external_stream`` (cached per pointer).
Numba arrays have no stream of their own, and the public signatures take none, so
numba users choose one with :func:`stream`::

    s = numba.cuda.stream()
    with fastbn.cuda.stream(s):
        y, mean, invstd = fastbn.batch_norm_forward(x, w, b)   # queued on s

Outside such a block numba arrays run on numba's default stream.  Every launch of a
call goes to the one stream, so its kernels are ordered among themselves and against
whatever the caller queued there before and after; nothing waits on the host.
"""

import contextlib
import threading

from numba import cuda

from .arrays import SIMULATOR, package_of

_state = threading.local()
_external = {}
_external_lock = threading.Lock()
_default = None


class SimulatorStream:
    """What the simulator, which has no streams, launches on: a handle to tell them apart."""

    def __init__(self, handle):
        self.handle = handle

    def __repr__(self):
        return f"SimulatorStream({self.handle!r})"


def default_stream():
    """Numba's default stream (one object, so it keys caches)."""
    global _default
    if _default is None:
        _default = SimulatorStream(0) if SIMULATOR else cuda.default_stream()
    return _default


def external(pointer, device=0):
    """The numba stream wrapping a ``cudaStream_t`` of another library (cached)."""
    if pointer == 0:
        return default_stream()
    key = (device, pointer)
    with _external_lock:
        s = _external.get(key)
        if s is None:
            s = _external[key] = SimulatorStream(pointer) if SIMULATOR else cuda.external_stream(pointer)
    return s


@contextlib.contextmanager
def stream(s):
    """Context manager: launches for numba device arrays in this thread go to numba
    stream ``s`` (torch and CuPy arrays keep their library's current stream)."""
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


def current():
    """The stream numba arrays launch on in this thread."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else default_stream()


def device_of(caller):
    """The CUDA device ordinal ``caller`` lives on (the current device for numba arrays)."""
    package = package_of(caller)
    if package == "torch":
        return caller.device.index or 0
    if package == "cupy":
        return caller.device.id
    if SIMULATOR:
        return 0
    return cuda.get_current_device().id


def for_array(caller):
    """The stream a call with data ``caller`` launches on (see the module docstring)."""
    package = package_of(caller)
    if package == "torch":
        import torch
        return external(torch.cuda.current_stream(caller.device).cuda_stream, device_of(caller))
    if package == "cupy":
        import cupy
        with cupy.cuda.Device(caller.device.id):
            return external(cupy.cuda.get_current_stream().ptr, caller.device.id)
    return current()


@contextlib.contextmanager
def on_device_of(caller):
    """Make ``caller``'s device current for the block (a tensor on cuda:1 runs on cuda:1)."""
    if SIMULATOR or package_of(caller) not in ("torch", "cupy"):
        yield
        return
    device = device_of(caller)
    if cuda.get_current_device().id == device:
        yield
        return
    with cuda.gpus[device]:
        yield
