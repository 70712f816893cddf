"""Shared fixtures: the tiny config with seeded random weights, and small test-only modes."""

from pathlib import Path

import pytest
import torch

from dsocr.configs import CONFIGS, Mode
from dsocr.model import build_model

torch.set_num_threads(2)

# Modes scaled for the tiny config: same rules as the real ones, smaller pixels.
TEST_BASE = Mode("test-base", 128, 128)
TEST_SMALL = Mode("test-small", 64, 64)
TEST_GUNDAM = Mode("test-gundam", 128, 64, crop_mode=True, crop_threshold=64)


def small_recipe(**kw):
    """A fast data recipe for tests: short Tiny pages of 40 px sans text, no scan effects."""
    from dsocr.train.data import DataRecipe

    base = dict(
        modes=("tiny",),
        min_chars=8,
        max_chars=24,
        font_sizes=(40,),
        fonts=("sans",),
        scan_prob=0.0,
        page_size=128,
    )
    return DataRecipe(**(base | kw))


@pytest.fixture(scope="session")
def tiny_cfg():
    return CONFIGS["tiny"]


@pytest.fixture()
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg, seed=0).eval()


def text_pdf(
    path: Path,
    pages: list[str | list[str]],
    font_size: int = 24,
    leading: int | None = None,
    top: int = 700,
) -> Path:
    """A minimal hand-written PDF with a real text layer and a correct xref: one Letter page per
    entry of ``pages``, a string or a list of lines (Helvetica ``font_size`` pt, lines ``leading``
    pt apart, the first at ``top`` pt)."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    tl = f" {leading} TL" if leading is not None else ""
    for i, lines in enumerate(pages):
        body = " T* ".join(f"({x}) Tj" for x in ([lines] if isinstance(lines, str) else lines))
        stream = f"BT /F1 {font_size} Tf{tl} 72 {top} Td {body} ET".encode()
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for k, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))
    return path
