"""Running commands as several ranks on loopback (mlx.launch --backend ring), for the tests of
the sharded model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "mlx-mistral"
LAUNCH = shutil.which("mlx.launch")
needs_launch = pytest.mark.skipif(LAUNCH is None or not mx.distributed.is_available(),
                                  reason="mlx.launch and the ring backend are not available")
TIMEOUT = 900  # two ranks on a busy 2-core machine: loading and importing dominate


def launch(*args, n: int = 2, timeout: float = TIMEOUT, hostfile=None, **kw) -> subprocess.CompletedProcess:
    hosts = ["--hostfile", str(hostfile)] if hostfile else ["-n", str(n)]
    cmd = [LAUNCH, *hosts, "--backend", "ring", "--python", sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def error_lines(stderr: str) -> list[str]:
    """The lines a rank wrote for a failure: ours start with "Error:"; MLX's own with "[ring]";
    mlx.launch's with its colour codes or "[WARN]"."""
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ring_hostfile(path: Path, ports: list[int]) -> Path:
    """MLX's ring hostfile (what mlx.launch writes for its ranks): one address per rank."""
    import json

    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return path


def start_rank(rank: int, hostfile: Path, *args, env: dict = None) -> subprocess.Popen:
    """One rank started as mlx.launch starts it (MLX_RANK and MLX_HOSTFILE), without the
    launcher: its own exit status and stderr are seen, and the launcher kills no one."""
    import os

    env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **(env or {}))
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each; any still running at `timeout` is killed and the
    test fails: a rank that hangs is the bug."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def free_port() -> int:
    return free_ports(1)[0]


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    """Until the server at `url` answers /health; fails if `proc` ends first."""
    import time

    import httpx

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the sharded server did not come up")
