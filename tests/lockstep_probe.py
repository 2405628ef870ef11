"""Drives the lockstep engine of a sharded model through what tests/test_distributed_launch.py
checks, alone or as one rank under mlx.launch. Each rank writes OUT.RANK (JSON) as it exits.

    conversations  one conversation kept while 12 others come and go: its second turn's ids,
                   and how many conversations each rank still holds at the end
    fail-sample    sampling one reply raises on --rank only: that reply fails, the next works
    fail-step      the third decode step raises on --rank only, in `mlx-mistral generate`:
                   every rank ends, one line each
    fail-serve     the same failure in `mlx-mistral serve --port PORT`, once a request runs
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before MLX)
from mlx_mistral.cache import ConversationCache
from mlx_mistral.distributed.group import world
from mlx_mistral.distributed.lockstep import CONVERSATIONS
from mlx_mistral.engine.backend import Backend
from mlx_mistral.engine.sequence import Sequence
from mlx_mistral.generate import generate, stream_generate
from mlx_mistral.load import load

FAILING_SEED = 7  # the reply whose sampling fails (fail-sample)


def inject(mode: str) -> None:
    """Makes this rank fail as `mode` says."""
    if mode == "fail-sample":
        sample = Sequence.sample

        def failing(self, logits):
            if self.request.sampling.seed == FAILING_SEED:
                raise ValueError("injected sampling failure")
            return sample(self, logits)

        Sequence.sample = failing
    elif mode in ("fail-step", "fail-serve"):
        decode, calls = Backend.decode, []

        def failing(self, tokens, caches):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected forward failure")
            return decode(self, tokens, caches)

        Backend.decode = failing


def conversations(model, tokenizer) -> dict:
    kept = ConversationCache(model)
    first = generate(model, tokenizer, "Hello there", max_tokens=4, prompt_cache=kept)
    for i in range(12):  # each made, used once and let go
        generate(model, tokenizer, f"Question number {i}", max_tokens=2, prompt_cache=ConversationCache(model))
        gc.collect()  # one held in a reference cycle is let go when Python's collector frees it
    second = [r.token for r in stream_generate(model, tokenizer, "Hello there" + first + " and more", max_tokens=6,
                                               prompt_cache=kept) if r.token is not None]
    return {"second": second}


def fail_sample(model, tokenizer) -> dict:
    out = {}
    try:
        generate(model, tokenizer, "Hello", max_tokens=6, temperature=1.0, seed=FAILING_SEED)
    except Exception as e:  # noqa: BLE001  (the probe reports what the API raised)
        out["failed"] = f"{type(e).__name__}: {e}"
    out["next"] = [r.token for r in stream_generate(model, tokenizer, "Hello", max_tokens=6, temperature=1.0, seed=3)
                   if r.token is not None]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", required=True, choices=["conversations", "fail-sample", "fail-step", "fail-serve"])
    parser.add_argument("--rank", type=int, default=0, help="the rank that fails")
    parser.add_argument("--port", type=int, default=8080, help="fail-serve: where rank 0 serves")
    opts = parser.parse_args()
    group = world()
    rank = group.rank() if group else 0
    report = {"rank": rank}
    # followers never return from load(): they report as they exit
    atexit.register(lambda: Path(f"{opts.out}.{rank}").write_text(json.dumps(dict(report, held=len(CONVERSATIONS)))))
    if opts.mode != "conversations" and rank == opts.rank:
        inject(opts.mode)
    if opts.mode == "fail-step":  # the command line's own path, followers included
        from mlx_mistral.cli import main as cli

        return cli(["generate", "--model", opts.model, "--prompt", "Hello", "--max-tokens", "8", "--temp", "0"])
    if opts.mode == "fail-serve":
        from mlx_mistral.cli import main as cli

        return cli(["serve", "--model", opts.model, "--port", str(opts.port), "--no-ui"])
    model, tokenizer = load(opts.model)
    if opts.mode == "conversations":
        report.update(conversations(model, tokenizer))
    else:
        report.update(fail_sample(model, tokenizer))


if __name__ == "__main__":
    main()
