"""Inference engine: KV cache, sampling, continuous batching and streaming, on token ids."""

from dsocr.engine.generate import (
    Engine,
    EngineStats,
    GenerationParams,
    Request,
    Result,
    StreamEvent,
    default_dtype,
    generate_greedy,
)
from dsocr.engine.kv_cache import KVCache
from dsocr.engine.sampling import (
    OFFICIAL_NGRAM_SETTINGS,
    OFFICIAL_NGRAM_WHITELIST,
    ngram_whitelist_for,
)

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationParams",
    "KVCache",
    "OFFICIAL_NGRAM_SETTINGS",
    "OFFICIAL_NGRAM_WHITELIST",
    "Request",
    "Result",
    "StreamEvent",
    "default_dtype",
    "generate_greedy",
    "ngram_whitelist_for",
]
