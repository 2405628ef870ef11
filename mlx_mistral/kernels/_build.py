"""Compile cpu_qmm.c into a shared library with the C compiler at hand.

Used twice: by setup.py at `pip install` time (into the package), and at first use when that
build is missing or stale (into a cache folder). Imports nothing but the standard library so
setup.py can load it before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("cpu_qmm.c")
HEADERS = [Path(__file__).with_name(n) for n in ("cpu_pool.h", "cpu_q8.h", "cpu_q8w.h", "cpu_attn.h", "cpu_model.h")]  # included by SOURCE
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread"]


def source_hash() -> str:
    """Names a build of this exact source (the library reports it back, so stale builds are skipped)."""
    digest = hashlib.sha256()
    for path in (SOURCE, *HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_library(out: Path) -> Optional[str]:
    """Build the library at `out` (atomically); returns None on success, else why it failed."""
    cc = compiler()
    if cc is None:
        return "no C compiler found (set CC or install gcc/clang)"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".cpu_qmm.", suffix=".so")
    os.close(fd)
    cmd = [cc, *FLAGS, f'-DMM_SOURCE_HASH="{source_hash()}"', str(SOURCE), "-o", tmp, "-lm"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode == 0:
        os.replace(tmp, out)
        return None
    os.unlink(tmp)
    return f"{Path(cc).name} failed: " + (run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")


if __name__ == "__main__":  # python -m mlx_mistral.kernels._build OUT
    failure = compile_library(Path(sys.argv[1]))
    print(failure or "built", file=sys.stderr)
    sys.exit(1 if failure else 0)
