"""What the ranks of a synchronized call exchange: one compact payload per rank.

A payload is a tuple ``(PROTOCOL, True, channels, dtype, layout, data)``: the header the
ranks must agree on, and ``data``, the bytes of a float64 vector ``[count, a_0 .. a_C-1,
b_0 .. b_C-1]`` (forward: the Moments' mean and M2; backward: sum(dy) and
sum(dy * (x - mean))).  One count stands for every channel: batch norm reduces the same
values per channel.  A rank whose own arguments failed sends ``(PROTOCOL, False,
message)`` instead, so it still takes part in the collective and the others learn why.

Raw float64 bytes round-trip exactly, and the tuple pickles with a few dozen bytes of
framing (the engines' object allgathers carry payloads of different lengths, so ranks
that disagree on the channel count are told so instead of truncating or blocking a
fixed-size buffer collective).
"""

import numpy as np

#: Version of the payload; ranks running fastbn releases with other payloads disagree on it.
PROTOCOL = 2


def pack(channels, dtype, layout, count, first, second):
    """The payload of a rank whose checks passed: header, then count and two (C,) vectors."""
    data = np.empty(1 + 2 * channels)
    data[0] = count
    data[1:1 + channels] = first
    data[1 + channels:] = second
    return (PROTOCOL, True, int(channels), np.dtype(dtype).str, layout, data.tobytes())


def failure(error):
    """The payload of a rank whose own arguments are invalid."""
    return (PROTOCOL, False, f"{type(error).__name__}: {error}")


def _is_current(payload):
    return isinstance(payload, tuple) and len(payload) >= 3 and payload[0] == PROTOCOL


def agree(engine, gathered, own_error, what):
    """Raise on every rank when any rank failed its checks or the ranks disagree on the
    header; else return every rank's (count, first, second), float64, in rank order."""
    if own_error is not None:
        raise own_error
    failed = [r for r, p in enumerate(gathered) if not (_is_current(p) and p[1])]
    if failed:
        details = "; ".join(f"rank {r}: {gathered[r][2] if _is_current(gathered[r]) else 'protocol mismatch'}"
                            for r in failed)
        raise ValueError(f"{what}: rank(s) {failed} of {engine.size} ({engine.name}) failed their "
                         f"argument checks, so no rank computed ({details})")
    for key, index in (("channels", 2), ("dtype", 3), ("layout", 4)):
        values = [p[index] for p in gathered]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {np.dtype(v) if key == 'dtype' else v}" for r, v in enumerate(values))
            raise ValueError(f"{what}: expected every rank to pass the same {key} "
                             f"({engine.name}, {engine.size} ranks), got {shown}")
    channels = gathered[0][2]
    parts = []
    for p in gathered:
        data = np.frombuffer(p[5], np.float64)
        # Copies: the gathered bytes are read-only, and a merged mean becomes save_mean.
        parts.append((np.full(channels, data[0]), data[1:1 + channels].copy(), data[1 + channels:].copy()))
    return parts


def payload_bytes(num_channels):
    """Bytes of one rank's pickled payload for ``num_channels`` (benchmarks)."""
    import pickle

    payload = pack(num_channels, np.float32, "NCHW", 0.0, np.zeros(num_channels), np.zeros(num_channels))
    return len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
