"""`mmlm serve`: an OpenAI-compatible HTTP API (chat, embeddings, zero-shot, image generation) and a web page, for one
model.

    from mmlm.serve import create_app, serve, ServeConfig
    app = create_app("runs/llava", ServeConfig(max_queue=32))   # a FastAPI app (needs the `serve` extra)
    serve("runs/llava", host="127.0.0.1", port=8000)             # uvicorn, until interrupted
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve", "ServeConfig"]


def __getattr__(name: str) -> Any:  # fastapi is imported only when the server is used
    if name in __all__:
        from . import app, service

        return {"create_app": app.create_app, "serve": app.serve, "ServeConfig": service.ServeConfig}[name]
    raise AttributeError(name)
