"""Per-token cost of constrained decoding (forced tool call) against free decoding.

    python benchmarks/constrained_overhead.py [--model DIR | --preset small] [--repeats 3] [--json out.json]

Without --model, a random-weight checkpoint of `--preset` (default small, 4-bit) is written to
/tmp once.
Both runs decode the same number of tokens from the same prompt on the same model; the
constrained one masks every token with the V7 tool-call grammar. Printed: ms/token of each,
the difference, and the host time the constraint adds per token (consuming the sampled id,
llguidance's mask, queuing the masking ops), which the device's forward pass can hide.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx

from mlx_mistral import load
from mlx_mistral.constrain import GrammarProcessor, Limits, plan
from mlx_mistral.generate import stream_generate

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {
              "city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
              "days": {"type": "integer", "minimum": 1, "maximum": 14},
              "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}}},
              "required": ["city", "unit", "days"]}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


def decode_ms_per_token(model, tok, n_tokens: int, processors=None, seed: int = 0) -> tuple[float, int]:
    last = None
    for last in stream_generate(model, tok, MESSAGES, tools=TOOLS, max_tokens=n_tokens, temperature=1.0,
                                seed=seed, logits_processors=processors, ignore_eos=processors is None):
        pass
    return 1000.0 / last.generation_tps, last.generation_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="small", help="synth preset used when --model is not given")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = Path(args.model) if args.model else Path(f"/tmp/mlx-mistral-bench/{args.preset}-q4")
    if not path.exists():
        from mlx_mistral.synth import synth

        print(f"writing the {args.preset} preset (4-bit) to {path} ...")
        synth(path, args.preset, bits=4, group_size=64, seed=0)
    model, tok = load(path)
    limits = Limits(max_string=48, max_items=6, max_calls=4)
    grammar = plan(TOOLS, "required", limits=limits).grammar
    tic = time.perf_counter()
    GrammarProcessor(tok, grammar)  # builds the llguidance tokenizer once (cached on `tok`)
    build_s = time.perf_counter() - tic

    rows = []
    decode_ms_per_token(model, tok, 8)  # warm up
    for r in range(args.repeats):
        proc = GrammarProcessor(tok, grammar)
        c_ms, n = decode_ms_per_token(model, tok, 400, [proc], seed=r)
        f_ms, n_free = decode_ms_per_token(model, tok, n, None, seed=r)
        mask_ms = 1000.0 * proc.mask_seconds / max(proc.masks, 1)
        host_ms = 1000.0 * proc.host_seconds / max(proc.masks, 1)
        rows.append({"tokens": n, "free_ms": f_ms, "constrained_ms": c_ms, "mask_ms": mask_ms, "host_ms": host_ms})
        print(f"run {r}: {n} tokens | free {f_ms:.2f} ms/token | constrained {c_ms:.2f} ms/token | "
              f"overhead {c_ms - f_ms:+.2f} ms/token ({100 * (c_ms / f_ms - 1):+.1f}%) | "
              f"mask compute {mask_ms:.3f} ms/token, host work {host_ms:.3f} ms/token")
    free = sorted(r["free_ms"] for r in rows)[len(rows) // 2]
    cons = sorted(r["constrained_ms"] for r in rows)[len(rows) // 2]
    mask = sorted(r["mask_ms"] for r in rows)[len(rows) // 2]
    host = sorted(r["host_ms"] for r in rows)[len(rows) // 2]
    summary = {"model": str(path), "device": str(mx.default_device()), "machine": platform.processor() or platform.machine(),
               "llg_tokenizer_build_s": build_s, "median_free_ms": free, "median_constrained_ms": cons,
               "median_overhead_ms": cons - free, "median_overhead_pct": 100 * (cons / free - 1),
               "median_mask_ms": mask, "median_host_ms": host, "runs": rows}
    print(f"median: free {free:.2f} ms/token, constrained {cons:.2f} ms/token, overhead {cons - free:+.2f} "
          f"ms/token ({summary['median_overhead_pct']:+.1f}%); host work per token {host:.3f} ms "
          f"(llguidance mask {mask:.3f} ms); "
          f"LLTokenizer build {build_s:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
