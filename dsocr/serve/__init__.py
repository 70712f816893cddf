"""``dsocr serve``: an OpenAI-compatible HTTP server, a thin adapter over ``dsocr.api`` / ``engine``
/ ``pipeline.convert`` (the same functions the CLI calls). Needs the ``serve`` extra
(fastapi, uvicorn, python-multipart); importing this package does not import them.
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def create_app(*args, **kwargs):
    from dsocr.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    from dsocr.serve.app import serve as _serve

    return _serve(*args, **kwargs)
