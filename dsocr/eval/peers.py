"""OCR engines compared by ``dsocr eval``: dsocr itself and two offline peers.

A peer is anything with ``name``, ``available() -> (ok, reason)`` and ``ocr(image) -> str``.
Peers import their engine lazily, so this module is cheap and a missing engine surfaces as
``available() == (False, "<why>")`` instead of an ImportError at import time.

- :class:`TesseractPeer`: tesserocr (whose manylinux wheel bundles libtesseract 5.x) with the
  Debian traineddata (``apt-get install tesseract-ocr tesseract-ocr-eng``). ``OMP_THREAD_LIMIT=1``
  is set before the first import: the default OpenMP setting thrashes on few cores.
- :class:`RapidOCRPeer`: rapidocr + onnxruntime with the default models its wheel ships (runs
  offline; any non-default model would be downloaded at run time, so none is asked for).
- :class:`DsocrPeer`: a loaded :class:`dsocr.api.OCR` with a mode and prompt.

Timing is done by the caller (``run.evaluate``) around ``ocr``; engine set-up happens in
``available()`` / the first call, and ``run.evaluate`` calls ``available()`` before timing.
"""

from __future__ import annotations

import glob
import os
from typing import Protocol, runtime_checkable

from PIL import Image

from dsocr.vision.preprocess import valid_image_tokens

PEER_NAMES = ("tesseract", "rapidocr")


@runtime_checkable
class Peer(Protocol):
    name: str

    def available(self) -> tuple[bool, str]: ...

    def ocr(self, image: Image.Image) -> str: ...


def _find_tessdata() -> str | None:
    """The folder holding eng.traineddata: $TESSDATA_PREFIX, then Debian's locations."""
    candidates = [os.environ.get("TESSDATA_PREFIX", "")]
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tessdata"]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "eng.traineddata")):
            return c
    return None


class TesseractPeer:
    """Tesseract through tesserocr; ``lang`` is a Tesseract language string, e.g. "eng+deu"."""

    def __init__(self, lang: str = "eng", psm: int | None = None):
        self.name = "tesseract"
        self.lang = lang
        self.psm = psm
        self._api = None

    def available(self) -> tuple[bool, str]:
        if self._api is not None:
            return True, ""
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")
        try:
            import tesserocr
        except ImportError as e:
            return False, f"tesserocr not installed ({e}); pip install tesserocr"
        path = _find_tessdata()
        if path is None:
            return False, "no eng.traineddata; apt-get install tesseract-ocr tesseract-ocr-eng"
        try:
            kwargs = {"path": path, "lang": self.lang}
            if self.psm is not None:
                kwargs["psm"] = self.psm
            self._api = tesserocr.PyTessBaseAPI(**kwargs)
        except RuntimeError as e:  # missing language pack, bad path
            return False, f"tesseract init failed: {e}"
        self.version = tesserocr.tesseract_version().splitlines()[0]
        return True, ""

    def ocr(self, image: Image.Image) -> str:
        ok, why = self.available()
        if not ok:
            raise RuntimeError(why)
        self._api.SetImage(image.convert("RGB"))
        return self._api.GetUTF8Text().strip()


class RapidOCRPeer:
    """RapidOCR (PP-OCR det + rec ONNX models from the wheel); lines joined top-to-bottom."""

    def __init__(self):
        self.name = "rapidocr"
        self._engine = None

    def available(self) -> tuple[bool, str]:
        if self._engine is not None:
            return True, ""
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            return False, f"rapidocr not installed ({e}); pip install rapidocr onnxruntime"
        try:
            self._engine = RapidOCR()
        except Exception as e:  # noqa: BLE001 - any engine set-up failure means "not available"
            return False, f"rapidocr init failed: {type(e).__name__}: {e}"
        return True, ""

    def ocr(self, image: Image.Image) -> str:
        import numpy as np

        ok, why = self.available()
        if not ok:
            raise RuntimeError(why)
        out = self._engine(np.asarray(image.convert("RGB")))
        boxes, txts = getattr(out, "boxes", None), getattr(out, "txts", None)
        if boxes is None or txts is None:
            return ""
        return join_lines(boxes, txts)


def join_lines(boxes, texts) -> str:
    """Detected text boxes (4 corner points each) -> lines, top-to-bottom, left-to-right.

    Boxes whose vertical centres lie within half a box height of a line's first box are put
    on that line (detectors often split one printed line into several boxes).
    """
    items = []
    for box, text in zip(boxes, texts):
        ys = [float(p[1]) for p in box]
        xs = [float(p[0]) for p in box]
        items.append(((min(ys) + max(ys)) / 2, max(ys) - min(ys), min(xs), text))
    items.sort(key=lambda t: (t[0], t[2]))
    lines: list[list[tuple]] = []
    for it in items:
        if lines and abs(it[0] - lines[-1][0][0]) <= max(lines[-1][0][1], it[1]) / 2:
            lines[-1].append(it)
        else:
            lines.append([it])
    return "\n".join(" ".join(t[3] for t in sorted(line, key=lambda t: t[2])) for line in lines)


class DsocrPeer:
    """A loaded dsocr model (``dsocr.load_model(...)``) as a peer."""

    def __init__(
        self,
        ocr,
        mode: str = "base",
        prompt: str = "<image>\nFree OCR.",
        max_new_tokens: int = 2048,
        name: str | None = None,
    ):
        self.model = ocr
        self.mode = mode
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.name = name or f"dsocr-{mode}"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def ocr(self, image: Image.Image) -> str:
        return self.model.generate(image, self.prompt, self.mode, self.max_new_tokens)

    def vision_tokens(self, image: Image.Image) -> int:
        """Valid vision tokens this page costs in this mode (the spec's count, padding excluded)."""
        return valid_image_tokens(image.width, image.height, self.mode)


def make_peers(names: str | list[str]) -> list[Peer]:
    """``"tesseract,rapidocr"`` -> peer objects (unknown names raise ValueError)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    table = {"tesseract": TesseractPeer, "rapidocr": RapidOCRPeer}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]
