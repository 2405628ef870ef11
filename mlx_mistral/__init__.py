"""mlx-mistral: Mistral Small 3 on MLX."""

__version__ = "0.1.0"

from . import _blas

_blas.preload()  # must precede the first `import mlx.core` in the process

from .generate import chat, chat_completion, generate, stream_chat_completion, stream_generate  # noqa: E402
from .load import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "chat", "chat_completion", "stream_chat_completion",
           "__version__"]
