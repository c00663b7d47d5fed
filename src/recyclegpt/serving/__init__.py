"""`recyclegpt serve`: an OpenAI-compatible HTTP server over `RecycleGPT.generate` (docs/serving.md).

    from recyclegpt.serving import create_app
    app = create_app(lm)            # a FastAPI app; run it with uvicorn

Needs the `serve` extra (fastapi, uvicorn). Requests run in arrival order on one worker thread, greedy requests of
one strategy that wait together as one batch.
"""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
