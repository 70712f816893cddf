"""Re-render the bundled sample pages (deterministic: the fonts ship in the package).

    python samples/make_samples.py

austen-sans32.png: the opening of Pride and Prejudice (public domain) on a 512 x 512 page in
DejaVu Sans 32 px, the one style the bundled CPU dsocr-mini was trained on (docs/training.md §4).
"""

from pathlib import Path

from dsocr.render import PageStyle, render_text

HERE = Path(__file__).resolve().parent
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."

style = PageStyle(font="sans", font_size=32, line_height=1.3, margin=24, width=512, height=512)
(page,) = render_text(TEXT, style)
page.image.save(HERE / "austen-sans32.png")
(HERE / "austen-sans32.txt").write_text(TEXT + "\n", encoding="utf-8")
