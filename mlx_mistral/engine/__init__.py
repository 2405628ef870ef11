"""The generation engine: the request object, the scheduler, batched steps, speculation."""

from .request import Constraint, Request, Speculation
from .scheduler import DEFAULT_MAX_BATCH, Engine
from .sequence import Response, Stream
from .steps import DEFAULT_PREFILL_STEP, generate_step, generation_stream, prefill

__all__ = ["Engine", "Request", "Constraint", "Speculation", "Response", "Stream", "DEFAULT_MAX_BATCH",
           "DEFAULT_PREFILL_STEP", "generate_step", "generation_stream", "prefill"]
