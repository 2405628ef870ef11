"""Time to first token per chat turn, with and without the conversation's prompt cache.

    python benchmarks/chat_turns.py [--preset small] [--turns 8] [--words 120]

Each turn adds a user message of about --words words and a short reply. Without a cache every
turn prefills the whole history, so its time to first token grows with the turn number; with
a `ConversationCache` only the new tokens are computed. Both runs produce the same tokens (the
tests pin that). Writes JSON and a PNG to benchmarks/results/<backend>/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx_mistral  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import numpy as np
from rich.console import Console

from mlx_mistral import load, stream_generate
from mlx_mistral.cache import ConversationCache
from mlx_mistral.kernels import dispatch
from mlx_mistral.synth import synth

CACHE_DIR = Path.home() / ".cache" / "mlx-mistral-bench"
WORDS = ("the harbour light turned slowly over grey water while gulls argued above the old stone pier "
         "and fishermen counted nets").split()


def ttft(model, tok, messages, cache) -> tuple[float, list[int], int]:
    """(seconds to the first token, the reply's ids, prompt ids reused)."""
    tic = time.perf_counter()
    first, ids, last = None, [], None
    for last in stream_generate(model, tok, messages, max_tokens=8, temperature=0, ignore_eos=True,
                                prompt_cache=cache):
        if first is None:
            first = time.perf_counter() - tic
        if last.token is not None:
            ids.append(last.token)
    return first, ids, last.cached_tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = CACHE_DIR / args.preset
    if not (folder / "config.json").exists():
        synth(folder, args.preset, seed=0, force=True)
    model, tok = load(folder)
    rng = np.random.default_rng(0)
    console = Console()

    rows = []
    conversation = ConversationCache(model)
    messages = [{"role": "system", "content": "You are a patient assistant."}]
    for turn in range(args.turns):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS, size=args.words))})
        prompt_tokens = len(tok.encode_chat(messages))
        fresh_s, fresh_ids, _ = ttft(model, tok, messages, None)
        cached_s, cached_ids, reused = ttft(model, tok, messages, conversation)
        rows.append(dict(turn=turn + 1, prompt_tokens=prompt_tokens, reused_tokens=reused,
                         ttft_fresh_s=fresh_s, ttft_cached_s=cached_s, same_tokens=fresh_ids == cached_ids))
        console.print(f"turn {turn + 1}: {prompt_tokens} prompt tokens ({reused} reused): "
                      f"first token after {fresh_s:.2f} s fresh, {cached_s:.2f} s with the cache")
        messages.append({"role": "assistant", "content": tok.decode(cached_ids)})

    out = args.out or Path(__file__).parent / "results" / ("cpu" if dispatch.backend() == "cpu" else "gpu")
    out.mkdir(parents=True, exist_ok=True)
    results = dict(preset=args.preset, device=f"{platform.machine()} {mx.default_device()}", mlx=mx.__version__,
                   words_per_turn=args.words, rows=rows)
    (out / "chat_turns.json").write_text(json.dumps(results, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    turns = [r["turn"] for r in rows]
    ax.plot(turns, [r["ttft_fresh_s"] for r in rows], marker="o", label="whole history each turn")
    ax.plot(turns, [r["ttft_cached_s"] for r in rows], marker="o", label="ConversationCache")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{args.preset} preset, {results['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "chat_turns.png", dpi=120)
    console.print(f"wrote {out / 'chat_turns.json'} and {out / 'chat_turns.png'}")


if __name__ == "__main__":
    main()
