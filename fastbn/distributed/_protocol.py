"""What the ranks of a synchronized call exchange: fixed-size byte buffers, no size exchange.

Per call, each rank contributes the float64 vector ``[count, a_0 .. a_C-1, b_0 .. b_C-1]``
(forward: the Moments' mean and M2; backward: sum(dy) and sum(dy * (x - mean))).  One
count stands for every channel: batch norm reduces the same values per channel.

The first allgather has the same size on every rank whatever its arguments:
:data:`FIRST_SLOTS` float64 slots holding a header (protocol, whether this rank's checks
passed, channel count, dtype, layout, count) and the first ``2 * FIRST_CHANNELS`` values.
A rank whose own checks failed sends its error message in the value slots instead.
From the gathered headers every rank decides the same thing: raise (a rank failed, or
the ranks disagree on channels, dtype or layout), or go on.  Only when every rank agrees
on C > :data:`FIRST_CHANNELS` does a second allgather carry the remaining ``2 (C -
FIRST_CHANNELS)`` values, of a size every rank then knows to be the same.  So a call is
ONE collective for up to 64 channels (two beyond), no rank can block in a collective
of another size, and nothing is pickled.  Buffers travel as bytes, so values (NaN
payloads included) arrive bit for bit.
"""

import numpy as np

#: Marks this payload version; a buffer without it (another fastbn release) is refused.
PROTOCOL = 3.0
HEADER = 6  # protocol, ok, channels, dtype code, layout code, count
#: Channels whose values fit the first, fixed-size buffer.
FIRST_CHANNELS = 64
FIRST_SLOTS = HEADER + 2 * FIRST_CHANNELS
DTYPES = ("float16", "float32", "float64")
LAYOUTS = ("NCHW", "NHWC")


def _message_slots(error):
    text = f"{type(error).__name__}: {error}".encode("utf-8")[:8 * (FIRST_SLOTS - HEADER)]
    padded = text + b"\0" * (-len(text) % 8)
    return np.frombuffer(padded, np.float64)


def _message(row):
    return row[HEADER:].tobytes().rstrip(b"\0").decode("utf-8", "replace")


def exchange(engine, what, own, error=None):
    """Every rank's ``(count, first, second)`` (float64 (C,) host vectors, rank order).

    ``own``: this rank's ``(channels, dtype, layout, count, first, second)``, or None
    with ``error`` (the exception its own checks raised).  Collective; raises on every
    rank when any rank failed or the ranks disagree (``what`` names the operation).
    """
    head = np.zeros(FIRST_SLOTS)
    if error is None:
        try:
            channels, dtype, layout, count, first, second = own
            values = np.concatenate([np.asarray(first, np.float64), np.asarray(second, np.float64)])
            inline = min(2 * channels, 2 * FIRST_CHANNELS)
            head[1:HEADER] = 1.0, channels, DTYPES.index(np.dtype(dtype).name), LAYOUTS.index(layout), count
            head[HEADER:HEADER + inline] = values[:inline]
        except Exception as e:  # noqa: BLE001 - this rank still joins the collective, flagged failed
            error = e
            head[:] = 0.0
    if error is not None:
        message = _message_slots(error)
        head[HEADER:HEADER + message.size] = message
    head[0] = PROTOCOL
    heads = engine.allgather_bytes(head.view(np.uint8)).view(np.float64)
    if error is not None:
        raise error
    _agree(engine, heads, what)
    rows = heads[:, HEADER:HEADER + inline]
    if 2 * channels > inline:  # every rank agreed on channels: the same size everywhere
        rest = engine.allgather_bytes(values[inline:].view(np.uint8)).view(np.float64)
        rows = np.concatenate([rows, rest], axis=1)
    # Copies: the gathered buffer is shared, and a merged mean becomes the caller's save_mean.
    return [(np.full(channels, row_head[5]), row[:channels].copy(), row[channels:].copy())
            for row_head, row in zip(heads, rows)]


def _agree(engine, heads, what):
    """Raise on every rank when any rank failed its checks or the ranks disagree."""
    known = heads[:, 0] == PROTOCOL
    failed = [r for r in range(len(heads)) if not (known[r] and heads[r, 1] == 1.0)]
    if failed:
        details = "; ".join(f"rank {r}: {_message(heads[r]) if known[r] else 'protocol mismatch'}" for r in failed)
        raise ValueError(f"{what}: rank(s) {failed} of {engine.size} ({engine.name}) failed their "
                         f"argument checks, so no rank computed ({details})")
    for key, index, names in (("channels", 2, None), ("dtype", 3, DTYPES), ("layout", 4, LAYOUTS)):
        values = heads[:, index]
        if np.any(values != values[0]):
            shown = ", ".join(f"rank {r}: {names[int(v)] if names else int(v)}" for r, v in enumerate(values))
            raise ValueError(f"{what}: expected every rank to pass the same {key} "
                             f"({engine.name}, {engine.size} ranks), got {shown}")


def payload_bytes(num_channels):
    """Bytes each rank sends per call for ``num_channels`` (benchmarks)."""
    return 8 * (FIRST_SLOTS + max(0, 2 * (num_channels - FIRST_CHANNELS)))
