"""The ranks of an `mlx.launch` run, and rank 0's messages to the others.

MLX's ring (or JACCL) backend carries everything; there is no transport of ours. A message is
a pickled object that rank 0 puts in a buffer the other ranks fill with zeros: an all_sum of
the buffers is rank 0's bytes on every rank. Small messages (a step's news is tens of bytes)
take one all_sum of MESSAGE_BYTES; a longer one a second, of its exact remainder.
"""

from __future__ import annotations

import atexit
import pickle
import struct
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..errors import MistralError, first_line
from . import launched

MESSAGE_BYTES = 4096  # one all_sum carries the length header and a step's usual news
_world = None  # set once by world(): the group of this run, or False outside mlx.launch
_listening = True  # rank 0: whether the other ranks still wait for its messages


def world() -> Optional[Any]:
    """The group of all ranks when launched by mlx.launch with more than one; else None."""
    global _world
    if _world is None:
        _world = False
        if launched():
            try:
                group = mx.distributed.init(strict=True)
            except RuntimeError as e:
                raise MistralError(f"cannot reach the other ranks: {first_line(e)} "
                                   "(check the hosts in the hostfile answer and run the same mlx version)") from e
            _world = group if group.size() > 1 else False
            if _world and group.rank() == 0:
                atexit.register(release, group)
    return _world or None


def _sum(buffer: np.ndarray, group) -> np.ndarray:
    out = mx.distributed.all_sum(mx.array(buffer), group=group)
    return np.array(out)


def broadcast(obj: Any, group) -> Any:
    """Rank 0's `obj` on every rank (the others pass anything; it is ignored)."""
    leader = group.rank() == 0
    data = pickle.dumps(obj) if leader else b""
    head = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
    if leader:
        first = struct.pack("<Q", len(data)) + data[: MESSAGE_BYTES - 8]
        head[: len(first)] = np.frombuffer(first, dtype=np.uint8)
    head = _sum(head, group)
    (size,) = struct.unpack("<Q", head[:8].tobytes())
    body = head[8: 8 + size].tobytes()
    rest = size - len(body)
    if rest > 0:
        tail = np.frombuffer(data[len(body):], dtype=np.uint8) if leader else np.zeros(rest, dtype=np.uint8)
        body += _sum(tail, group).tobytes()
    return pickle.loads(body)


def agree(flag: bool, group) -> list[bool]:
    """Every rank's `flag`, in rank order, on every rank."""
    mine = np.zeros(group.size(), dtype=np.int32)
    mine[group.rank()] = int(flag)
    return [bool(v) for v in _sum(mine, group)]


def release(group) -> None:
    """Rank 0's last message (at exit, also after an error): the other ranks exit too."""
    global _listening
    if _listening:
        _listening = False
        broadcast(("exit",), group)


def gone() -> None:
    """Rank 0: the other ranks stopped listening (they failed as rank 0 did)."""
    global _listening
    _listening = False
