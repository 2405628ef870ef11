"""Speculation inside a batch: does one speculating reply help or hurt the replies beside it?

A speculating reply runs its own draft-and-verify pass each step, beside the batch's one
decode pass over the other replies. Measured on SmolLM2 4-bit with prompts a reply copies (the
case prompt lookup is made for): `--batch` replies alone (no speculation), then the same with
reply 0 speculating by prompt lookup. Reports tokens/s of reply 0, of the others, and of all,
and writes JSON under benchmarks/results/<device>/.

    python benchmarks/batch_speculation.py --batch 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_mistral  # noqa: F401,E402  (loads OpenBLAS before mlx.core)
from server_load import smollm2_folder  # noqa: E402

from mlx_mistral import load  # noqa: E402
from mlx_mistral.bench import device_slug  # noqa: E402
from mlx_mistral.engine import Engine, Request, Speculation  # noqa: E402

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk, lit the lamp, wound the clock, "
        "and wrote the weather in the log. ")


def run(model, tok, prompts, max_tokens: int, speculate_first: bool) -> dict:
    engine = Engine(model, tok, max_batch=len(prompts))
    requests = [Request(tuple(p), max_tokens, ignore_eos=True,
                        speculation=Speculation("lookup" if (i == 0 and speculate_first) else "none"))
                for i, p in enumerate(prompts)]
    streams = [engine.submit(r) for r in requests]
    done_at = [None] * len(streams)
    tic = time.perf_counter()
    while engine.busy:
        engine.step()
        for i, s in enumerate(streams):
            if done_at[i] is None and s.done:
                done_at[i] = time.perf_counter() - tic
    wall = time.perf_counter() - tic
    return {"wall_s": wall, "first_tokens_per_s": max_tokens / done_at[0],
            "others_tokens_per_s": (len(prompts) - 1) * max_tokens / max(done_at[1:]),
            "all_tokens_per_s": len(prompts) * max_tokens / wall, "steps": engine.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model, tok = load(smollm2_folder())
    prompts = [tok.encode_chat([{"role": "user", "content": f"Repeat this text exactly ({i}): " + TEXT * 3}])
               for i in range(args.batch)]
    run(model, tok, prompts, 4, False)  # warm-up
    report = {"benchmark": "batch_speculation", "device": device_slug(), "batch": args.batch,
              "max_tokens": args.max_tokens,
              "none": run(model, tok, prompts, args.max_tokens, False),
              "first_lookup": run(model, tok, prompts, args.max_tokens, True)}
    out = Path(__file__).parent / "results" / device_slug() / "batch_speculation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
