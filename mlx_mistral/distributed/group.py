"""The ranks of an `mlx.launch` run, and rank 0's messages to the others.

MLX's ring (or JACCL) backend carries everything; there is no transport of ours. A message is
a pickled object that rank 0 puts in a buffer the other ranks fill with zeros: an all_sum of
the buffers is rank 0's bytes on every rank. Small messages (a step's news is tens of bytes)
take one all_sum of MESSAGE_BYTES; a longer one a second, of its exact remainder.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import pickle
import select
import signal
import socket
import struct
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..errors import MistralError, first_line
from . import launched

MESSAGE_BYTES = 4096  # one all_sum carries the length header and a step's usual news
# how long a rank waits for the others to connect (MLX_MISTRAL_CONNECT_TIMEOUT overrides): the
# others may still be starting over ssh and importing; MLX itself gives up connecting after ~30 s
CONNECT_TIMEOUT_S = 60.0
_world = None  # set once by world(): the group of this run, or False outside mlx.launch
_listening = True  # rank 0: whether the other ranks still wait for its messages


class OutOfStep(MistralError):
    """A step failed on some rank: the ranks can no longer pair their collectives, so this
    process must not run another one (it ends, and the others end when its sockets close)."""


_broken: Optional[str] = None  # why this process stopped taking part in collectives


def world() -> Optional[Any]:
    """The group of all ranks when launched by mlx.launch with more than one; else None."""
    global _world
    if _world is None:
        _world = False
        if launched():
            group = _init_within(connect_timeout())
            _world = group if group.size() > 1 else False
            if _world and group.rank() == 0:
                atexit.register(release, group)
            if _world:
                share_cores(group)
    return _world or None


def share_cores(group) -> int:
    """Give the native kernels this rank's share of its host's cores: ranks started on one
    host (mlx.launch -n 2) would each run a thread per core, twice as many threads as cores,
    and a rank waiting in an all_sum would wait for the other's descheduled thread. Returns
    the threads set. Every rank calls it once (one all_sum), right after they connect."""
    from ..kernels import cpu

    host = hashlib.sha256(socket.gethostname().encode()).digest()[:8]
    mine = np.zeros((group.size(), 2), dtype=np.int32)
    mine[group.rank()] = np.frombuffer(host, dtype=np.int32)
    hosts = _sum(mine, group)
    here = int((hosts == hosts[group.rank()]).all(axis=1).sum())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    threads = max(1, (cores or 1) // here)
    cpu.set_threads(threads)
    return threads


def connect_timeout() -> float:
    value = os.environ.get("MLX_MISTRAL_CONNECT_TIMEOUT", "")
    try:
        seconds = float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        raise MistralError(f"MLX_MISTRAL_CONNECT_TIMEOUT must be a number of seconds, not {value!r}") from None
    if not seconds > 0:
        raise MistralError(f"MLX_MISTRAL_CONNECT_TIMEOUT must be above 0 seconds, not {value!r}")
    return seconds


def _ring_addresses() -> str:
    """The ranks' addresses in MLX's ring hostfile (what mlx.launch wrote), for messages."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            ranks = json.load(f)
        return ", ".join(f"rank {r}: {' '.join(map(str, addresses))}" for r, addresses in enumerate(ranks))
    except (KeyError, OSError, ValueError, TypeError):
        return "see MLX_HOSTFILE"


def _init_within(seconds: float):
    """mx.distributed.init, bounded in time. MLX's ring backend waits forever in accept() for a
    rank that never connects, holding the GIL (no thread of ours could run), so a forked
    watchdog says so in one line and kills this rank if init has not returned in time."""
    rank = os.environ.get("MLX_RANK", "?")
    parent = os.getpid()
    line = (f"Error: rank {rank}: the other ranks did not answer within {seconds:g} s ({_ring_addresses()}): "
            "check that every host in the hostfile is up, reachable on those ports and running the same "
            "command (MLX_MISTRAL_CONNECT_TIMEOUT sets the wait)\n").encode()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watchdog: only os calls here (a fork of a threaded process)
        os.close(done_w)
        ready, _, _ = select.select([done_r], [], [], seconds)
        if not ready:
            os.write(2, line)
            os.kill(parent, signal.SIGKILL)
        os._exit(0)
    os.close(done_r)
    try:
        return mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise MistralError(f"rank {rank} cannot reach the other ranks: {_ring_reason(e)} "
                           f"({_ring_addresses()})") from None
    finally:
        os.close(done_w)  # end of file: the watchdog exits
        os.waitpid(pid, 0)


def _ring_reason(e: RuntimeError) -> str:
    message = first_line(e)
    if "bind" in message:  # EADDRNOTAVAIL or EADDRINUSE
        return (f"{message}: this host does not have the address the hostfile gives its rank, "
                "or the port is taken")
    if "connect" in message:
        return f"{message}: nothing listens at another rank's address"
    return f"{message} (run the same mlx version on every host)"


def check_in_step() -> None:
    """Refuses any collective after a failed step (see OutOfStep)."""
    if _broken is not None:
        raise OutOfStep(f"the ranks are out of step since a failed step ({_broken}): restart them")


def break_step(reason: str) -> None:
    """This process takes part in no more collectives; rank 0 sends no parting message."""
    global _broken
    _broken = _broken or reason
    gone()


def _sum(buffer: np.ndarray, group) -> np.ndarray:
    check_in_step()
    try:
        return np.array(mx.distributed.all_sum(mx.array(buffer), group=group))
    except RuntimeError as e:  # a rank ended (its sockets closed) while this one waited
        break_step(first_line(e))
        raise OutOfStep(f"rank {group.rank()} lost the other ranks: {first_line(e)} (another rank "
                        "stopped; see its message)") from None


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
