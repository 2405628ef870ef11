"""The engine in lockstep on every rank of a sharded model.

Every rank runs the same `Engine` over its shard; each forward pass's all_sums need every rank
to run the same steps over the same sequences. Rank 0 alone takes requests (the terminal, the
HTTP socket, the Python API): at the start of each step it broadcasts what arrived and what was
cancelled since the last one, and every rank applies exactly that before stepping. Everything
else an engine decides (admission, prefill chunks, batching, retirement) follows from the same
inputs, so it comes out the same. The sampled ids are rank 0's, summed into every rank
(`_agree`), so temperature sampling and its random state live on rank 0 alone.

Rank 0's streams keep the caller's cancellation apart (`asked`) from the flag the engine reads
(`cancelled`), which only the step's broadcast sets: a server thread cancelling mid-step cannot
make rank 0 drop a sequence the other ranks still step.

Failures: a reply whose sampling fails on one rank fails on every rank (the failure flags travel
with the sampled ids). A step that raises on one rank cannot be finished by the others (they wait
in a collective it never joins), so that rank stops taking part in collectives (`OutOfStep`) and
ends; the others' collectives then fail as its sockets close, and they end too, one line each.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import mlx.core as mx

from ..cache import ConversationCache
from ..engine import Engine, Request, Speculation
from ..engine.sequence import Stream
from ..errors import MistralError, first_line
from .group import OutOfStep, break_step, broadcast, check_in_step

KEPT_ENGINES = 4  # followers keep the latest few engines (one per API call, one per server)


class Conversations:
    """The conversations rank 0 passed to an engine, under the same ids on every rank.

    The caller owns a conversation (the chat REPL, an API user's `prompt_cache`), so rank 0 holds
    weak references: once the caller drops one, the next step's broadcast names it and the other
    ranks drop their copies. Every rank holds exactly the conversations rank 0's caller holds,
    however many come and go, and a conversation kept for long is never dropped on one rank only.
    """

    def __init__(self):
        self.lock = threading.Lock()  # a weakref callback may run on any thread
        self.ids = itertools.count()
        self.lead: dict[int, weakref.ref] = {}  # rank 0: id -> the caller's cache
        self.copies: dict[int, ConversationCache] = {}  # other ranks: id -> this rank's copy
        self.dropped: list[int] = []  # rank 0: ids whose caches were freed since the last step

    def find(self, cache: ConversationCache) -> Optional[int]:
        with self.lock:
            return next((cid for cid, ref in self.lead.items() if ref() is cache), None)

    def register(self, cache: ConversationCache) -> int:
        """Rank 0: the id of `cache`, given now if it has none."""
        cid = self.find(cache)
        if cid is None:
            with self.lock:
                cid = next(self.ids)
                self.lead[cid] = weakref.ref(cache, lambda _, cid=cid: self._freed(cid))
        return cid

    def _freed(self, cid: int) -> None:
        with self.lock:
            self.lead.pop(cid, None)
            self.dropped.append(cid)

    def take_dropped(self) -> list[int]:
        with self.lock:
            dropped, self.dropped = self.dropped, []
        return dropped

    def copy(self, cid: int, model, settings) -> ConversationCache:
        """A follower's copy of conversation `cid` (empty the first time rank 0 passes it)."""
        if cid not in self.copies:
            self.copies[cid] = ConversationCache(model, kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
                                                 max_kv_size=settings.max_kv_size)
        return self.copies[cid]

    def drop(self, cids: list[int]) -> None:
        for cid in cids:
            self.copies.pop(cid, None)

    def __len__(self) -> int:
        with self.lock:
            return len(self.lead) + len(self.copies)


# conversations outlive engines (the chat REPL makes an engine per turn): one registry per process
CONVERSATIONS = Conversations()
_engine_ids = itertools.count()


class LockstepStream(Stream):
    """A stream whose engine-visible cancellation arrives with a step's broadcast."""

    def __init__(self, request: Request, conversation: Optional[ConversationCache] = None):
        super().__init__(request)
        self.asked = False
        self.conversation = conversation  # rank 0: the caller's; the other ranks use their copy

    def cancel(self) -> None:
        self.asked = True


class LockstepEngine(Engine):
    """An Engine whose steps rank 0 leads and the other ranks follow."""

    def __init__(self, model, tokenizer, *, eid: Optional[int] = None, **options):
        super().__init__(model, tokenizer, **options)
        self.group = model.group
        self.leader = self.group.rank() == 0
        self.inbox: list[tuple[LockstepStream, Optional[ConversationCache]]] = []
        self.streams: dict[int, LockstepStream] = {}  # the same ids on every rank
        self._ids = itertools.count()
        if self.leader:
            eid = next(_engine_ids)
            broadcast(("engine", eid, options), self.group)
        self.eid = eid

    def submit(self, request: Request, cache: Optional[ConversationCache] = None) -> Stream:
        if not self.leader:
            raise MistralError("only rank 0 takes requests on a sharded model")
        if request.logits_processors:
            raise MistralError("custom logits processors run in one process: a sharded model cannot take them")
        if request.speculation.mode not in (None, "none") or request.speculation.draft_model is not None:
            raise MistralError("speculative decoding does not run on a sharded model")
        if cache is not None and not isinstance(cache, ConversationCache):
            raise MistralError("a sharded model's engine takes a ConversationCache, not a list of caches")
        if cache is not None and cache.tokens and CONVERSATIONS.find(cache) is None:
            # the other ranks would start from an empty copy: a cache file holds one rank's KV
            raise MistralError("a prompt cache made outside this engine cannot be used on a sharded model")
        request = dataclasses.replace(request, speculation=Speculation("none"))
        self.check(request, cache)
        stream = LockstepStream(request, cache)
        with self.wake:
            self.inbox.append((stream, cache))
            self.wake.notify()
        return stream

    @property
    def busy(self) -> bool:
        return super().busy or bool(self.inbox)

    def step(self) -> None:
        check_in_step()
        try:
            if self.leader:
                self._lead()
            super().step()
        except OutOfStep:
            raise
        except Exception as e:  # noqa: BLE001  (a collective of this step may wait for this rank forever)
            break_step(f"rank {self.group.rank()}: {type(e).__name__}: {first_line(e)}")
            raise OutOfStep(f"rank {self.group.rank()}: a step of the sharded model failed: "
                            f"{type(e).__name__}: {first_line(e)}") from e
        for sid, stream in list(self.streams.items()):
            if not self.leader:
                stream.events.clear()  # nobody reads a follower's text
            if stream.done:
                del self.streams[sid]

    def _lead(self) -> None:
        """Broadcast the requests and cancellations since the last step, then apply them."""
        with self.lock:
            arrived, self.inbox = self.inbox, []
        news = []
        for stream, cache in arrived:
            sid = next(self._ids)
            self.streams[sid] = stream
            news.append((sid, stream.request, self._conversation_ref(cache)))
        cancels = [sid for sid, s in self.streams.items() if s.asked and not s.cancelled]
        dropped = CONVERSATIONS.take_dropped()
        broadcast(("step", self.eid, news, cancels, dropped), self.group)
        self.apply(news, cancels, dropped)

    def _conversation_ref(self, cache: Optional[ConversationCache]):
        """How the followers find their copy of rank 0's conversation: (id, KV settings, the ids
        it holds now; a caller may have reset it, as the chat REPL's /reset does)."""
        if cache is None:
            return None
        return CONVERSATIONS.register(cache), cache.settings, tuple(cache.tokens)

    def apply(self, news: list, cancels: list[int], dropped: list[int]) -> None:
        """Queue the broadcast requests, mark the broadcast cancellations and drop the copies of
        the conversations rank 0's caller let go of (every rank)."""
        if not self.leader:
            CONVERSATIONS.drop(dropped)
        for sid, request, ref in news:
            stream = self.streams.setdefault(sid, LockstepStream(request))
            cache = None
            if ref is not None:
                cid, settings, held = ref
                cache = CONVERSATIONS.copy(cid, self.model, settings) if not self.leader else stream.conversation
                if not self.leader:  # trim this copy to what rank 0's holds (-1: no id, keeps all)
                    cache.reuse(list(held) + [-1])
            with self.lock:
                self.waiting.append((stream, cache))
        for sid in cancels:
            if sid in self.streams:
                self.streams[sid].cancelled = True

    def _agree(self, tokens: mx.array, failed: list[bool]) -> tuple[mx.array, list[bool]]:
        # on the step's own stream, after this rank's forward: collectives on two streams could
        # pair one rank's token sum with another's layer sum. One sum carries rank 0's ids and
        # every rank's failures: a reply that failed anywhere fails everywhere.
        mine = mx.stack([tokens if self.leader else tokens * 0, mx.array(failed, dtype=tokens.dtype)])  # (2, B)
        both = mx.distributed.all_sum(mine, group=self.group)
        return both[0], [bool(v) for v in both[1].tolist()]


def engine_for(model, tokenizer, **options) -> Engine:
    """The engine for `model`: in lockstep across the ranks when it is sharded."""
    if getattr(model, "group", None) is None:  # also models other than ours (mlx-lm style)
        return Engine(model, tokenizer, **options)
    return LockstepEngine(model, tokenizer, **options)


def follow(model, tokenizer, group) -> None:
    """A follower's life: make the engines rank 0 makes, step when it steps, until it exits."""
    # a signal could stop a follower between two collectives of a step and leave rank 0 waiting
    # forever; rank 0 handles Ctrl-C and SIGTERM (the server drains) and then releases everyone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engines: OrderedDict[int, LockstepEngine] = OrderedDict()
    while True:
        message = broadcast(None, group)
        if message[0] == "exit":
            return
        if message[0] == "engine":
            _, eid, options = message
            engines[eid] = LockstepEngine(model, tokenizer, eid=eid, **options)
            while len(engines) > KEPT_ENGINES:
                engines.popitem(last=False)
        elif message[0] == "step":
            _, eid, news, cancels, dropped = message
            engine = engines[eid]
            engine.apply(news, cancels, dropped)
            engine.step()

