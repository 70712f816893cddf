"""OCR engines compared by ``dsocr eval``: dsocr itself and two offline peers.

A peer is anything with ``name``, ``available() -> (ok, reason)`` and ``ocr(image) -> str``.
Peers import their engine lazily, so this module is cheap and a missing engine surfaces as
``available() == (False, "<why>")`` instead of an ImportError at import time.

- :class:`TesseractPeer`: tesserocr (whose manylinux wheel bundles libtesseract 5.x) with the
  Debian traineddata (``apt-get install tesseract-ocr tesseract-ocr-eng``, plus
  ``tesseract-ocr-deu`` etc. for other languages). Its language is fixed (``lang="deu+eng"``) or,
  by default, follows each page set's manifest ``lang`` (:data:`TESSERACT_LANGS`); a missing
  language pack makes the peer unavailable for that set, with the package to install.
  ``OMP_THREAD_LIMIT=1`` is set before the first import: the default OpenMP setting thrashes on
  few cores.
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

# Page-set language (manifest "lang") -> Tesseract language string. English is added second to
# the others: the translated Debian manuals keep commands, file names and untranslated
# paragraphs in English.
TESSERACT_LANGS = {
    "en": "eng",
    "de": "deu+eng",
    "fr": "fra+eng",
    "ja": "jpn+eng",
    "zh-cn": "chi_sim+eng",
    "zh": "chi_sim+eng",
}


@runtime_checkable
class Peer(Protocol):
    name: str

    def available(self) -> tuple[bool, str]: ...

    def ocr(self, image: Image.Image) -> str: ...


def _tessdata_dirs() -> list[str]:
    candidates = [os.environ.get("TESSDATA_PREFIX", "")]
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tessdata"]
    return [c for c in candidates if c and os.path.isdir(c)]


def _find_tessdata(lang: str = "eng") -> tuple[str | None, str]:
    """(folder holding every ``<code>.traineddata`` of ``lang``, "") or (None, one-line reason):
    $TESSDATA_PREFIX first, then Debian's locations."""
    codes = [c for c in lang.split("+") if c]
    if not codes or any(not c.replace("_", "").replace("-", "").isalnum() for c in codes):
        return None, f"bad Tesseract language {lang!r} (e.g. eng, deu+eng)"
    dirs = _tessdata_dirs()
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, f"{c}.traineddata")) for c in codes):
            return d, ""
    where = dirs[0] if dirs else "no tessdata folder"
    missing = [
        c
        for c in codes
        if not any(os.path.isfile(os.path.join(d, f"{c}.traineddata")) for d in dirs)
    ]
    missing = missing or codes
    packages = " ".join(f"tesseract-ocr-{c.replace('_', '-').lower()}" for c in missing)
    return None, (
        f"no {', '.join(c + '.traineddata' for c in missing)} ({where}); "
        f"apt-get install tesseract-ocr {packages}"
    )


def tesseract_lang(dataset_lang: str) -> str:
    """Manifest language ("de") -> Tesseract language string ("deu+eng"); "eng" when unknown."""
    return TESSERACT_LANGS.get(dataset_lang.lower(), "eng") if dataset_lang else "eng"


class TesseractPeer:
    """Tesseract through tesserocr.

    ``lang`` is a Tesseract language string, e.g. "deu+eng", used for every page set; None (the
    default) picks it per set from the manifest's ``lang`` (:func:`tesseract_lang`). ``evaluate``
    calls :meth:`use_language` before each set.
    """

    def __init__(self, lang: str | None = None, psm: int | None = None):
        self.name = "tesseract"
        self.lang = lang
        self.psm = psm
        self._apis: dict[str, object] = {}
        self._api = None
        self.current_lang = lang or "eng"

    def use_language(self, dataset_lang: str) -> tuple[bool, str]:
        """Switch to the set's language (a fixed ``lang`` wins); (False, why) when its
        traineddata is missing."""
        self.current_lang = self.lang or tesseract_lang(dataset_lang)
        return self.available()

    def available(self) -> tuple[bool, str]:
        lang = self.current_lang
        if lang in self._apis:
            self._api = self._apis[lang]
            return True, ""
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")
        try:
            import tesserocr
        except ImportError as e:
            return False, f"tesserocr not installed ({e}); pip install tesserocr"
        path, why = _find_tessdata(lang)
        if path is None:
            return False, why
        try:
            kwargs = {"path": path, "lang": lang}
            if self.psm is not None:
                kwargs["psm"] = self.psm
            api = tesserocr.PyTessBaseAPI(**kwargs)
        except RuntimeError as e:  # unreadable language pack, bad path
            return False, f"tesseract init failed for {lang}: {' '.join(str(e).split())}"
        self._apis[lang] = self._api = api
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


def make_peers(names: str | list[str], tesseract_lang: str | None = None) -> list[Peer]:
    """``"tesseract,rapidocr"`` -> peer objects (unknown or repeated names raise ValueError).

    ``tesseract_lang`` fixes Tesseract's language ("deu+eng"); None follows each page set."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    table = {"tesseract": lambda: TesseractPeer(lang=tesseract_lang), "rapidocr": RapidOCRPeer}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {sorted(table)}")
    if len(set(names)) != len(names):
        raise ValueError(f"peer named twice in {','.join(names)}")
    if tesseract_lang is not None:
        _, why = _find_tessdata(tesseract_lang)
        if why.startswith("bad"):
            raise ValueError(f"--tesseract-lang: {why}")
    return [table[n]() for n in names]
