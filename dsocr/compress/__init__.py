"""Optical context compression (paper §4.1 Table 2, §5 "forgetting"): text as page images.

- accounting.py: ``compression_stats`` / ``CompressionStats`` (text tokens vs vision tokens).
- codec.py: ``compress`` (text -> pages + manifest), ``decompress`` (pages -> text, precision),
  vision-embedding files, ``densest_layout`` (the densest layout a model still reads).
- memory.py: ``OpticalMemory``, a dialogue history whose old turns decay to lower-resolution pages.

Depends on render, vision/preprocess and the tokenizer; a model enters only as an ``OCR`` object
passed in (``dsocr.api``), never imported here.
"""

from dsocr.compress.accounting import CompressionStats, compression_stats, grid_image_tokens
from dsocr.compress.codec import (
    Decompressed,
    LayoutCandidates,
    LayoutChoice,
    Manifest,
    compress,
    decompress,
    default_style,
    densest_layout,
    embeddings_prompt,
    load_manifest,
    load_vision_embeddings,
    page_size_for_mode,
    save_vision_embeddings,
    word_precision,
    word_recall,
)
from dsocr.compress.memory import (
    Context,
    ImageItem,
    MemoryRecoveryWarning,
    MemoryReport,
    OpticalMemory,
    TextItem,
)

__all__ = [
    "CompressionStats",
    "Context",
    "Decompressed",
    "ImageItem",
    "LayoutCandidates",
    "LayoutChoice",
    "Manifest",
    "MemoryRecoveryWarning",
    "MemoryReport",
    "OpticalMemory",
    "TextItem",
    "compress",
    "compression_stats",
    "decompress",
    "default_style",
    "densest_layout",
    "embeddings_prompt",
    "grid_image_tokens",
    "load_manifest",
    "load_vision_embeddings",
    "page_size_for_mode",
    "save_vision_embeddings",
    "word_precision",
    "word_recall",
]
