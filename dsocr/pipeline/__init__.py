"""Document pipeline: input files -> page images -> model output -> Markdown and figures.

- ``providers``: PDFs and images to RGB page images (pypdfium2, Pillow), input discovery, safe
  output names, one ``InputError`` type for bad inputs.
- ``postprocess``: grounded output (``<|ref|>…<|/ref|><|det|>[[…]]<|/det|>``) to blocks,
  Markdown, figure crops and layout drawings; page-health flags. Pure text + PIL, no torch.

Neither module imports torch or the model; the converter stages build on them.
"""

from dsocr.pipeline.postprocess import (
    EOS,
    PAGE_SPLIT,
    Block,
    crop_figures,
    draw_layout,
    figure_links,
    is_repetition_loop,
    join_pages,
    page_flags,
    parse_grounded,
    to_markdown,
)
from dsocr.pipeline.providers import (
    DEFAULT_DPI,
    InputError,
    PageImage,
    count_pages,
    discover_inputs,
    iter_pages,
    parse_page_ranges,
    safe_stem,
    unique_stems,
)

__all__ = [
    "DEFAULT_DPI",
    "EOS",
    "PAGE_SPLIT",
    "Block",
    "InputError",
    "PageImage",
    "count_pages",
    "crop_figures",
    "discover_inputs",
    "draw_layout",
    "figure_links",
    "is_repetition_loop",
    "iter_pages",
    "join_pages",
    "page_flags",
    "parse_grounded",
    "parse_page_ranges",
    "safe_stem",
    "to_markdown",
    "unique_stems",
]

# --- conversion (issue 3): output layout and batch workspace are light (no torch); the converter
# imports the engine and model code, so its names load on first use. The batch function is
# ``dsocr.pipeline.convert.convert`` (the package attribute ``convert`` is that submodule).
from dsocr.pipeline.output import write_document  # noqa: E402
from dsocr.pipeline.workspace import BatchSummary, OutputError, Workspace  # noqa: E402

_CONVERT_NAMES = ("ConvertOptions", "Converter", "Document", "PageResult", "convert_file")

__all__ += ["BatchSummary", "OutputError", "Workspace", "write_document", *_CONVERT_NAMES]


def __getattr__(name):
    if name in _CONVERT_NAMES:
        import importlib

        return getattr(importlib.import_module("dsocr.pipeline.convert"), name)
    raise AttributeError(f"module 'dsocr.pipeline' has no attribute {name!r}")
