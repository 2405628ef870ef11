"""Tensor parallel over mx.distributed: a model sharded across the ranks of an `mlx.launch` run.

group.py finds the ranks and carries rank 0's messages; shard.py says which slice of each
tensor a rank holds and puts the all_sums in; slices.py reads those slices from safetensors
files; load.py loads a rank's shard; lockstep.py runs the engine on every rank in step.
Everything here is imported when first used: outside mlx.launch none of it runs.
"""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether mlx.launch started this process as one of several ranks."""
    return int(os.environ.get("MLX_WORLD_SIZE", "1")) > 1 or "MLX_HOSTFILE" in os.environ


def follower_main() -> bool:
    """Under mlx.launch, on a rank other than 0: load what rank 0 loads and follow its engine
    until it exits (then exit); True is never returned there. Elsewhere: False at once."""
    if not launched():
        return False
    from .group import world

    group = world()
    if group is None or group.rank() == 0:
        return False
    from .load import load

    load(None, group)  # exits when rank 0 does
    return True
