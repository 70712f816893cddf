"""dsocr: DeepSeek-OCR ("Contexts Optical Compression") in plain PyTorch.

Public API (imports are lazy, so ``import dsocr`` stays cheap)::

    ocr = dsocr.load_model("path/to/DeepSeek-OCR")    # or "tiny", or nothing for dsocr-mini
    text = ocr.generate("page.png", "<image>\\nFree OCR.", mode="base")
"""

__version__ = "0.1.0"

__all__ = ["OCR", "load_model", "convert", "count_image_tokens", "CONFIGS", "MODES"]


def __getattr__(name):
    if name in ("OCR", "load_model"):
        from dsocr import api

        return getattr(api, name)
    if name == "convert":
        from dsocr.pipeline.convert import convert

        return convert
    if name == "count_image_tokens":
        from dsocr.vision.preprocess import count_image_tokens

        return count_image_tokens
    if name in ("CONFIGS", "MODES"):
        from dsocr import configs

        return getattr(configs, name)
    raise AttributeError(f"module 'dsocr' has no attribute {name!r}")
