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
