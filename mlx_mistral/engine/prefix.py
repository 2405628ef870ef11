"""Conversations kept between requests, so a follow-up turn computes only its new ids.

Each kept conversation is a `ConversationCache` (its K/V and the ids they hold). A new request
takes the one sharing the longest prefix with its prompt (trimmed to that prefix); a request
sharing nothing starts a fresh cache, so an unrelated request never evicts a conversation it
could not use. When a reply ends, its conversation goes back to the pool as the most recent;
past `capacity` the least recently used is dropped.
"""

from __future__ import annotations

import copy
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_map

from ..cache import ConversationCache, KVSettings, common_prefix_length


class PrefixPool:
    def __init__(self, model, capacity: int):
        self.model = model
        self.capacity = capacity
        self.kept: list[ConversationCache] = []  # least recently used first
        self.lent: list[ConversationCache] = []  # in use by running sequences

    def take(self, ids: Sequence[int], settings: KVSettings) -> ConversationCache:
        """The kept conversation with the longest common prefix with `ids`, or a fresh one."""
        best, best_n = None, 0
        for conversation in self.kept:
            if conversation.settings != settings:
                continue
            n = common_prefix_length(conversation.tokens, ids)
            if n > best_n:
                best, best_n = conversation, n
        if best is not None:
            self.kept.remove(best)
        else:
            best = ConversationCache(self.model, kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
                                     max_kv_size=settings.max_kv_size)
        self.lent.append(best)
        return best

    def give(self, conversation: ConversationCache) -> None:
        """A reply ended: keep its conversation for the next turn (if the pool keeps any)."""
        self.lent.remove(conversation)
        if self.capacity <= 0 or not len(conversation):
            return
        self.kept.append(conversation)
        while len(self.kept) > self.capacity:
            self.kept.pop(0)

    def reset(self) -> None:
        self.kept.clear()
        self.lent.clear()


def fork(cache: list) -> list:
    """A copy of one sequence's per-layer caches that grows on its own (n > 1 replies to one
    prompt share its prefill). The copies are new arrays: a later write to either side, in place
    by the native decoder or through MLX, cannot reach the other."""
    out = []
    for layer in cache:
        twin = copy.copy(layer)
        twin.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, layer.state)
        mx.eval(twin.state)
        out.append(twin)
    return out
