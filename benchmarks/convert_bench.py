"""Conversion benchmark: `mlx-mistral convert` vs `mlx_lm convert` on the same checkpoint.

Both convert one random-weight `synth --preset small` checkpoint (bf16, ~0.5 GB) to MLX 4-bit
g64, each in its own process; we record wall seconds and that process's peak RSS (os.wait4), and
check the two outputs hold the same tensors. Writes benchmarks/results/<backend>/convert_bench.json.

    python benchmarks/convert_bench.py [--preset small] [--bits 4] [--group-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS of one child process.

    Linux starts a child's ru_maxrss at the RSS its parent had when it forked, so this process
    imports nothing heavy (MLX included) until every measurement is taken."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss * scale / 1e6, 1)}


def import_baseline(module: str) -> dict:
    """What importing the tool alone costs, so the conversion's own share is visible."""
    return measure([sys.executable, "-c", f"import {module}"])


def _mlx():
    import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx.core)
    import mlx.core as mx

    return mx


def tensors(folder: Path) -> dict:
    mx = _mlx()
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}


def same_tensors(a: Path, b: Path) -> bool:
    mx = _mlx()

    ta, tb = tensors(a), tensors(b)
    return sorted(ta) == sorted(tb) and all(
        ta[k].dtype == tb[k].dtype and mx.array_equal(ta[k], tb[k]).item() for k in ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        subprocess.run([sys.executable, "-m", "mlx_mistral.cli", "synth", str(src), "--preset", a.preset],
                       check=True, stdout=subprocess.DEVNULL)
        src_bytes = sum(f.stat().st_size for f in src.glob("model*.safetensors"))
        q = ["--bits", str(a.bits), "--group-size", str(a.group_size)]
        runs = {
            "mlx-mistral": measure([sys.executable, "-m", "mlx_mistral.cli", "convert", str(src), str(tmp / "ours"), *q]),
            "mlx-lm": measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                               str(tmp / "mlx-lm"), "-q", "--q-bits", str(a.bits), "--q-group-size", str(a.group_size)]),
        }
        runs["mlx-mistral"]["import_only"] = import_baseline("mlx_mistral.cli")
        runs["mlx-lm"]["import_only"] = import_baseline("mlx_lm.convert")
        identical = same_tensors(tmp / "ours", tmp / "mlx-lm")

    mx = _mlx()
    from mlx_mistral.kernels.dispatch import backend as which_backend

    backend = which_backend()
    result = {
        "benchmark": "convert", "preset": a.preset, "checkpoint_mb": round(src_bytes / 1e6, 1),
        "bits": a.bits, "group_size": a.group_size, "runs": runs, "identical_tensors": identical,
        "speedup": round(runs["mlx-lm"]["seconds"] / runs["mlx-mistral"]["seconds"], 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "backend": backend, "mlx": mx.__version__},
    }
    out = RESULTS / backend / "convert_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"convert {a.preset} ({result['checkpoint_mb']:.0f} MB bf16) -> {a.bits}-bit g{a.group_size}")
    for col in ("tool", "seconds", "peak RSS MB", "import-only s", "import-only RSS MB"):
        table.add_column(col, justify="right")
    for tool, r in runs.items():
        table.add_row(tool, f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['import_only']['seconds']:.1f}",
                      f"{r['import_only']['peak_rss_mb']:.0f}")
    Console().print(table)
    print(f"identical output tensors: {identical}; mlx-lm time / ours: {result['speedup']}x; wrote {out}")


if __name__ == "__main__":
    main()
