"""Framework-free layers built on fastbn's public functions.

:class:`BatchNorm` is a NumPy batch-norm layer with PyTorch's ``nn.BatchNorm*d``
semantics (training/eval, momentum or cumulative moving average, ``num_batches_tracked``,
``affine``, ``track_running_stats``) and PyTorch's ``state_dict`` keys, so the state of a
trained ``torch.nn.BatchNorm2d`` (as NumPy arrays) loads as is.
"""

import math

import numpy as np

from . import _checks
from . import distributed
from . import ghost
from ._api import batch_norm_backward, batch_norm_forward
from .dtypes import policy, storage_dtypes

#: The arrays a layer may hold, in PyTorch's ``state_dict`` order.
_PARAMETER_NAMES = ("weight", "bias")
_RUNNING_STAT_NAMES = ("running_mean", "running_var")


def _host_copy(array):
    """A NumPy copy of a host array, or of a CUDA device array (numba's ``copy_to_host``)."""
    if isinstance(array, np.ndarray):
        return array.copy()
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    raise TypeError(f"cannot copy a {type(array).__name__} to host: expected a numpy.ndarray "
                    f"or a numba CUDA device array")


class _SavedForward:
    """What :meth:`BatchNorm.backward` needs from the last successful forward pass."""

    __slots__ = ("x", "weight", "save_mean", "save_invstd", "used_batch_stats", "comm")

    def __init__(self, x, weight, save_mean, save_invstd, used_batch_stats, comm=None):
        self.x = x
        self.weight = weight
        self.save_mean = save_mean
        self.save_invstd = save_invstd
        self.used_batch_stats = used_batch_stats
        self.comm = comm  # the communicator the forward pass synchronized over, or None


class BatchNorm:
    """Batch normalization layer over the channel axis, for NumPy (or CUDA device) arrays.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel, with PyTorch's
    ``torch.nn.BatchNorm1d/2d/3d`` semantics; one class serves every rank (2 to 5).

    Parameters
    ----------
    num_features : int, the number of channels C.
    eps : float > 0, added to the variance.
    momentum : float in [0, 1], or None.  Running statistics are updated as
        ``r = (1 - momentum) * r + momentum * batch`` (unbiased batch variance); None
        means a cumulative moving average, ``momentum = 1 / num_batches_tracked``.
    affine : bool; when True the layer has learnable ``weight`` (ones) and ``bias``
        (zeros), else both are None (scale 1, shift 0).
    track_running_stats : bool; when True the layer keeps ``running_mean`` (zeros),
        ``running_var`` (ones) and ``num_batches_tracked`` (0) and eval mode normalizes
        with them; when False all three are None and batch statistics are always used.
    layout : "NCHW" (channels on axis 1) or "NHWC" (channels on the last axis).
    dtype : float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``): the dtype of
        the inputs the layer accepts, and of its parameters and running statistics,
        which are float32 for the 16-bit dtypes (``parameter_dtype``, see
        :mod:`fastbn.dtypes`).
    comm : None, or an ``mpi4py.MPI.Comm`` or ``torch.distributed.ProcessGroup``: in
        training mode the batch statistics then span every rank's batch
        (:mod:`fastbn.distributed`; forward and backward become collectives, a rank may
        pass an empty batch, and ``grad_weight``/``grad_bias`` are this rank's
        contributions, to be summed over the ranks like the other gradients).  Eval
        mode does not communicate.
    virtual_batch_size : None or a positive int k: when batch statistics are used, each
        slice of k samples along N (the last one smaller when k does not divide N) is
        normalized with its own statistics, and the running statistics get the average
        of the slices' (see :func:`fastbn.batch_norm_forward`).  No effect in eval with
        running statistics.  Not with ``comm``; NumPy arrays only.

    Attributes
    ----------
    parameter_dtype : numpy dtype of the arrays below (``dtype``, float32 for 16-bit).
    weight, bias : (C,) arrays of ``parameter_dtype``, or None when ``affine=False``.
    running_mean, running_var : (C,) arrays of ``parameter_dtype``, or None when
        ``track_running_stats=False``; updated in place by training forward passes.
    num_batches_tracked : int (None when ``track_running_stats=False``).
    grad_weight, grad_bias : (C,) arrays of ``parameter_dtype`` set by :meth:`backward` (None
        before it, and always None when ``affine=False``); overwritten, not accumulated.
    training : bool, True after construction and :meth:`train`, False after :meth:`eval`.

    Device arrays: the layer only calls :func:`fastbn.batch_norm_forward` and
    :func:`fastbn.batch_norm_backward`, so it runs wherever those run.  For CUDA input
    call :meth:`to_device` first (parameters and running statistics must live where
    ``x`` lives; mixing host and device arrays raises TypeError), and :meth:`cpu` to
    move them back.  :meth:`state_dict` always returns host (NumPy) copies.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32, comm=None, virtual_batch_size=None):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if momentum is not None:
            momentum = _checks.check_scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
        accepted = storage_dtypes("cpu")
        try:
            given = np.dtype(dtype)
        except TypeError:  # not a dtype NumPy knows (e.g. "bfloat16" without ml_dtypes imported)
            given = None
        if given not in accepted:
            raise TypeError(f"dtype: expected {' or '.join(d.name for d in accepted)}, "
                            f"got {repr(dtype) if given is None else given}")
        if virtual_batch_size is not None:
            virtual_batch_size = ghost.check_virtual_batch_size(virtual_batch_size)
            if comm is not None:
                raise ValueError("virtual_batch_size: expected None with comm (virtual batches are per rank "
                                 f"and not synchronized), got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size
        self.num_features = int(num_features)
        self.eps = _checks.check_scalar(eps, "eps", 0.0, math.inf, low_open=True)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.layout = _checks.check_layout(layout)
        self.dtype = np.dtype(dtype)
        self.parameter_dtype = policy(self.dtype).parameters
        self.training = True
        self.comm = comm

        shape = (self.num_features,)
        self.weight = np.ones(shape, self.parameter_dtype) if self.affine else None
        self.bias = np.zeros(shape, self.parameter_dtype) if self.affine else None
        self.running_mean = np.zeros(shape, self.parameter_dtype) if self.track_running_stats else None
        self.running_var = np.ones(shape, self.parameter_dtype) if self.track_running_stats else None
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"layout={self.layout!r}, dtype={self.dtype.name}"
                + ("" if self.virtual_batch_size is None else f", virtual_batch_size={self.virtual_batch_size}") + ")")

    # ------------------------------------------------------------------ mode

    def train(self, mode=True):
        """Set training mode (batch statistics, running statistics updated); returns self."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode: expected a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode (running statistics when tracked, else batch statistics); returns self."""
        return self.train(False)

    def _uses_batch_stats(self):
        # As PyTorch: without running statistics there is nothing else to normalize with.
        return self.training or self.running_mean is None

    # ------------------------------------------------------------------ passes

    def _check_x(self, x, name):
        if self.comm is not None and isinstance(x, np.ndarray) and 2 <= x.ndim <= 5 and x.shape[0] == 0:
            # A rank of a synchronized layer may hold no samples: check the rest of x.
            x = np.broadcast_to(np.zeros((), x.dtype), (1, *x.shape[1:]))
        _checks.check_input(x, name, (self.dtype,))
        axis = _checks.channel_axis(len(x.shape), self.layout)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} channels on axis {axis} "
                f"(layout {self.layout!r}), got shape {tuple(x.shape)}"
            )

    def forward(self, x):
        """Normalize ``x``; in training mode also update the running statistics.

        Parameters
        ----------
        x : array of rank 2-5 and dtype ``self.dtype``, with ``num_features`` channels on
            axis 1 (``layout="NCHW"``) or on the last axis (``"NHWC"``); never modified.

        Returns
        -------
        y : array shaped like ``x``, dtype ``self.dtype`` (same memory order as ``x``
            when ``x`` is contiguous in either channel-first or channel-last order).

        Saves ``x`` (by reference: do not modify it before :meth:`backward`), the weight
        and the statistics used for :meth:`backward`.  If it raises, the layer (running
        statistics, ``num_batches_tracked``, saved state) is left as it was.
        """
        self._check_x(x, "x")
        use_batch_stats = self._uses_batch_stats()
        update_running = self.training and self.track_running_stats
        momentum = 0.0
        if update_running:
            # momentum=None: cumulative average over the batches seen, this one included.
            momentum = 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        # As PyTorch: training without tracking passes no running statistics.
        pass_running = not self.training or self.track_running_stats
        # Only training synchronizes (as torch's SyncBatchNorm); eval never communicates.
        comm = self.comm if self.training else None
        kwargs = dict(running_mean=self.running_mean if pass_running else None,
                      running_var=self.running_var if pass_running else None,
                      training=use_batch_stats, momentum=momentum, eps=self.eps, layout=self.layout)
        if self.virtual_batch_size is not None:
            kwargs["virtual_batch_size"] = self.virtual_batch_size
        if comm is not None:
            y, save_mean, save_invstd = distributed.batch_norm_forward(x, self.weight, self.bias, comm=comm,
                                                                       **kwargs)
        else:
            y, save_mean, save_invstd = batch_norm_forward(x, self.weight, self.bias, **kwargs)
        if update_running:
            self.num_batches_tracked += 1
        self._saved = _SavedForward(x, self.weight, save_mean, save_invstd, use_batch_stats, comm)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient of the loss with respect to the last forward pass's input.

        Parameters
        ----------
        dy : gradient with respect to ``y``; shape and dtype of the forward ``x``; never
            modified.

        Returns
        -------
        dx : array shaped like ``x``, dtype ``self.dtype``.

        Sets ``grad_weight = sum(dy * x_hat)`` and ``grad_bias = sum(dy)`` ((C,),
        ``self.parameter_dtype``) when ``affine``.  Differentiates through the batch statistics
        when the forward pass used them (training, or ``track_running_stats=False``),
        else treats the running statistics as constants (frozen batch norm).  May be
        called more than once per forward pass.
        """
        if self._saved is None:
            raise RuntimeError("backward: called before forward (there is no saved forward pass)")
        saved = self._saved
        if saved.comm is not None:  # collective, like the forward pass it differentiates
            dx, dweight, dbias = distributed.batch_norm_backward(
                dy, saved.x, saved.save_mean, saved.save_invstd, saved.weight, comm=saved.comm,
                training=True, layout=self.layout)
        else:
            dx, dweight, dbias = batch_norm_backward(
                dy, saved.x, saved.save_mean, saved.save_invstd, saved.weight,
                training=saved.used_batch_stats, layout=self.layout, virtual_batch_size=self.virtual_batch_size)
        if self.affine:
            self.grad_weight, self.grad_bias = dweight, dbias
        return dx

    # ------------------------------------------------------------------ state

    def _state_names(self):
        names = list(_PARAMETER_NAMES) if self.affine else []
        if self.track_running_stats:
            names += [*_RUNNING_STAT_NAMES, "num_batches_tracked"]
        return names

    def _is_on_device(self):
        arrays = [getattr(self, name) for name in (*_PARAMETER_NAMES, *_RUNNING_STAT_NAMES)]
        return any(a is not None and not isinstance(a, np.ndarray) for a in arrays)

    def state_dict(self):
        """The layer's state under PyTorch's keys, as host (NumPy) copies.

        Returns
        -------
        dict : ``weight``, ``bias`` (when ``affine``), ``running_mean``, ``running_var``
            ((C,) arrays of ``self.parameter_dtype``) and ``num_batches_tracked`` (0-d int64 array)
            (when ``track_running_stats``), in that order.
        """
        state = {}
        for name in self._state_names():
            if name == "num_batches_tracked":
                state[name] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[name] = _host_copy(getattr(self, name))
        return state

    def load_state_dict(self, state_dict):
        """Load a state saved by :meth:`state_dict` or by ``torch.nn.BatchNorm*d``.

        Parameters
        ----------
        state_dict : mapping with exactly the keys :meth:`state_dict` returns; (C,)
            real arrays (any array-like NumPy can read, e.g. CPU torch tensors), cast to
            ``self.parameter_dtype``; ``num_batches_tracked`` a non-negative integer (0-d).

        Raises ValueError (missing or unexpected keys, wrong shapes or values) or
        TypeError (non-numeric values) before changing anything.  Values are copied;
        arrays go to the device when the layer's arrays are there (:meth:`to_device`).
        """
        expected = self._state_names()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing key(s) {missing}")
            if unexpected:
                problems.append(f"unexpected key(s) {unexpected}")
            raise ValueError(f"state_dict: {' and '.join(problems)} for {self!r} "
                             f"(expected exactly {expected})")
        loaded = {}
        for name in expected:
            value = np.asarray(state_dict[name])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"state_dict[{name!r}]: expected a real numeric array, got dtype {value.dtype}")
            if name == "num_batches_tracked":
                if value.shape != () or value.dtype.kind not in "iu" or value < 0:
                    raise ValueError(f"state_dict['num_batches_tracked']: expected a non-negative integer "
                                     f"of shape (), got {value!r}")
                loaded[name] = int(value)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(f"state_dict[{name!r}]: expected shape ({self.num_features},), "
                                 f"got {value.shape}")
            loaded[name] = value.astype(self.parameter_dtype, copy=True)
        if self._is_on_device():
            loaded = self._moved(loaded, _to_device)
        for name, value in loaded.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ placement

    def _moved(self, arrays, move):
        return {name: (value if name == "num_batches_tracked" else move(value))
                for name, value in arrays.items()}

    def _array_attributes(self):
        return {name: getattr(self, name) for name in (*_PARAMETER_NAMES, *_RUNNING_STAT_NAMES)
                if getattr(self, name) is not None}

    def to_device(self):
        """Copy weight, bias and running statistics to the current CUDA device
        (``numba.cuda.to_device``), so the layer accepts CUDA device arrays; returns self.

        Gradients and the saved forward pass are dropped (they belong to the old place).
        """
        moved = self._moved(self._array_attributes(), _to_device)
        self._replace_arrays(moved)
        return self

    def cpu(self):
        """Copy weight, bias and running statistics back to host NumPy arrays; returns self.

        Gradients and the saved forward pass are dropped (they belong to the old place).
        """
        moved = self._moved(self._array_attributes(), _host_copy)
        self._replace_arrays(moved)
        return self

    def _replace_arrays(self, arrays):
        for name, value in arrays.items():
            setattr(self, name, value)
        self.grad_weight = self.grad_bias = None
        self._saved = None


def _to_device(array):
    from numba import cuda  # only device users need a CUDA-capable numba

    return cuda.to_device(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
