"""The OpenAI-compatible server: `create_app` (the ASGI app over one model) and `serve`.

app.py assembles the app; routes.py holds the endpoints, schemas.py the request models,
errors.py and auth.py the refusals, replies.py the response shapes, metrics.py the Prometheus
metrics and worker.py the generation worker.
"""

from .app import Settings, create_app, serve, served_name
from .errors import OpenAIError, error_location
from .metrics import Metrics
from .replies import ReplyAssembler
from .schemas import ChatRequest, CompletionRequest, SamplingRequest
from .worker import Failed, Finished, Job, Worker

__all__ = [
    "ChatRequest", "CompletionRequest", "Worker", "Failed", "Finished", "Job", "Metrics", "OpenAIError",
    "ReplyAssembler", "SamplingRequest", "Settings", "create_app", "error_location", "serve", "served_name",
]
