"""Evaluation: pure metrics (``metrics.py``) for OCR output against ground truth.

Import from the submodule, e.g. ``from dsocr.eval.metrics import omnidoc_text_edit``; this package
file imports nothing so that ``dsocr.eval`` stays cheap and free of upward dependencies.
"""
