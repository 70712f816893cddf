"""Optical memory: a dialogue history whose older turns are kept as page images at decaying resolution.

Paper §5 / Fig. 12 (arXiv 2510.18234; spec §9.6, the "forgetting mechanism"): the last k rounds
stay as text; older rounds are rendered to images (≈10x fewer tokens) and, as they age, re-rendered
at lower resolution modes, so they cost fewer vision tokens and grow blurrier, like fading memory.

    mem = OpticalMemory("chat/", keep_text_turns=4, token_budget=4000)
    mem.add("user", "..."); mem.add("assistant", "...")
    ctx = mem.context()            # interleaved TextItem / ImageItem, ctx.total_tokens
    ids, embeds = ctx.prompt_inputs(ocr, "user: what did I say first?")   # ready for the decoder
    mem.recall(0, ocr)             # decode turn 0 back to text
    mem = OpticalMemory.load("chat/")

Decay policy (``plan``):
1. A turn's age is how many turns came after it. Age < ``keep_text_turns``: text.
2. Older turns: r = age - keep_text_turns; the mode is ``schedule[j]`` for the last j with
   ``age_steps[j] <= r`` (default steps 0, 2, 4, 8, 16: Gundam for 2 turns, Large for 2, Base for
   4, Small for 8, then Tiny for good).
3. ``token_budget`` (decoder tokens: text tokens + ``<image>`` placeholders, the real context
   cost): while over budget, the *oldest* image turn not yet at the schedule's last mode steps
   down one mode; when every image turn is at the last mode, the oldest image turns are dropped
   from the context (still on disk; ``recall`` still reads them). Text turns are never touched:
   if they alone exceed the budget the context stays over it (``MemoryReport.over_budget``).
4. ``text_when_cheaper`` (off by default): an old turn whose text costs no more tokens than its
   pages' placeholders at its planned mode stays text (exact, and cheaper: a one-line turn is ~10
   text tokens but 73 placeholders as a Tiny page). Such turns still step down and are dropped
   under the budget like image turns; recent turns are never touched. Compare like with like by
   giving the model's ``tokenizer`` (else text is counted with the DeepSeek-V3 tokenizer).
The plan is a pure function of the turn list and the config, so it is never stored.

Text tokens use the model's tokenizer when one is given, else the DeepSeek-V3 count the paper
uses. Each image turn is rendered with ``default_style(mode, style)``: one layout scaled to the
mode's page (the reference ``style`` is for a 640 px page), so a lower mode is the same page
downscaled. Characters no shipped font has are drawn as "?" (the journal keeps the original).

On disk (``folder``):
- ``turns.jsonl``: append-only journal, one JSON line per turn ``{"turn", "role", "text",
  "sha256"}``; each ``add`` appends, flushes and fsyncs.
- ``memory.json``: config + committed turn count + journal length, written atomically (temp +
  fsync + rename) by ``save`` (``add`` calls it).
- ``config.json``: a copy of the config alone, rewritten (atomically) only when the config
  changes, so a damaged ``memory.json`` can be rebuilt with the right settings.
- ``pages/t<turn>/<mode>/page_NNNN.png`` + ``index.json``: the render cache, one render per
  (turn, mode). The index (file sha256s, text sha256, token counts) is written last, atomically,
  so an entry without a complete index is known to be unfinished.
Recovery (``load``): a torn last journal line, a bad line, or lines past a truncation are cut off
to the last consistent turn with a ``MemoryRecoveryWarning`` (the cut bytes are kept in
``turns.jsonl.discarded``); a missing, empty, truncated or otherwise unreadable ``memory.json``
beside a journal is rebuilt from the journal, with the config from ``config.json`` (else the
defaults), with a warning naming the file; a cache entry with a missing or changed page, or a
missing or unreadable index, is deleted with a warning and re-rendered on demand from the journal's
text. Nothing is repaired silently.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dsocr.compress.accounting import grid_image_tokens, model_token_count
from dsocr.compress.codec import (
    _PAGE_FILE,
    REFERENCE_STYLE,
    _joiners,
    decode_images,
    default_max_new_tokens,
    default_style,
    join_pages,
    merge_blank_pages,
    mode_from_json,
    mode_to_json,
    png_bytes,
    style_from_json,
)
from dsocr.configs import Mode, get_mode
from dsocr.fileio import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_bytes, sha256_text
from dsocr.language.tokenizer import IMAGE_TOKEN, PROMPTS, count_text_tokens
from dsocr.render import PageStyle, missing_chars, render_text
from dsocr.vision.preprocess import count_image_tokens

FORMAT = "dsocr-memory/1"
JOURNAL = "turns.jsonl"
MANIFEST = "memory.json"
CONFIG = "config.json"
PAGES = "pages"
DEFAULT_SCHEDULE = ("gundam", "large", "base", "small", "tiny")
DEFAULT_AGE_STEPS = (0, 2, 4, 8, 16)


class MemoryRecoveryWarning(UserWarning):
    """A memory folder was inconsistent (torn write) and was cut back to a consistent state."""


@dataclass(frozen=True)
class Turn:
    id: int
    role: str
    text: str


@dataclass
class TextItem:
    turn: int
    role: str
    text: str
    tokens: int


@dataclass
class ImageItem:
    """One turn as page images. ``vision_tokens`` is the paper's grid count; ``placeholder_tokens``
    what the decoder consumes (``count_image_tokens``), the unit of ``Context.total_tokens``."""

    turn: int
    role: str
    mode: Mode
    pages: list[Image.Image]
    vision_tokens: int
    placeholder_tokens: int


@dataclass
class Context:
    """The history ready for the decoder: items in turn order, and their token totals."""

    items: list[TextItem | ImageItem]
    total_tokens: int  # text tokens + <image> placeholders
    text_tokens: int
    placeholder_tokens: int
    vision_tokens: int  # grid tokens (paper count) of the image items
    dropped: list[int] = field(default_factory=list)  # turns left out to meet the budget

    def prompt(self) -> str:
        """``role: text`` lines, an image turn as ``role: <image><image>...`` (one per page)."""
        lines = []
        for it in self.items:
            if isinstance(it, TextItem):
                lines.append(f"{it.role}: {it.text.replace(IMAGE_TOKEN, '<image >')}")
            else:
                lines.append(f"{it.role}: {IMAGE_TOKEN * len(it.pages)}")
        return "\n".join(lines)

    def images(self) -> list[tuple[Image.Image, Mode]]:
        """Page images in prompt order, each with the mode to preprocess it in."""
        return [(p, it.mode) for it in self.items if isinstance(it, ImageItem) for p in it.pages]

    def prompt_inputs(self, ocr, question: str = "") -> tuple[list[int], object]:
        """(prompt ids, (N, C) image embeddings) for ``ocr.model``: the pages are preprocessed in
        their modes and encoded once; ``question`` is appended after the history."""
        from dsocr.language.tokenizer import build_prompt_ids

        question = question.replace(IMAGE_TOKEN, "<image >")  # as in text turns: no stray markers
        prompt = self.prompt() + ("\n" + question if question else "")
        inputs = [ocr.preprocess(im, mode) for im, mode in self.images()]
        ids = build_prompt_ids(ocr.tokenizer, prompt, [x.num_tokens for x in inputs])
        if not inputs:
            return ids, None
        import torch

        return ids, torch.cat(ocr.model.encode_images(inputs))


@dataclass(frozen=True)
class MemoryReport:
    turns: int
    text_turns: int
    image_turns: dict[str, int]  # mode name -> turns
    dropped: int
    plain_tokens: int  # the whole history as text
    context_tokens: int  # text + placeholders actually in the context
    vision_tokens: int  # grid tokens (paper count) of the image turns
    tokens_saved: int
    over_budget: bool

    @property
    def ratio(self) -> float:
        return self.plain_tokens / self.context_tokens if self.context_tokens else float("inf")


@dataclass
class _Render:
    """A cached (turn, mode) render: page files, accounting, and lazily loaded images."""

    folder: Path
    files: list[str]
    joiners: list[str]
    placeholder_tokens: int
    vision_tokens: int
    images: list[Image.Image] | None = None

    def load_images(self) -> list[Image.Image]:
        if self.images is None:
            out = []
            for f in self.files:
                im = Image.open(io.BytesIO((self.folder / f).read_bytes()))
                im.load()
                out.append(im)
            self.images = out
        return self.images


def _config_kwargs(cfg: dict) -> dict:
    """Constructor keywords from a saved ``config()`` (KeyError/TypeError/ValueError if bad)."""
    return dict(
        keep_text_turns=cfg["keep_text_turns"],
        schedule=tuple(mode_from_json(m) for m in cfg["schedule"]),
        age_steps=tuple(cfg["age_steps"]),
        token_budget=cfg["token_budget"],
        style=style_from_json(cfg["style"]),
        text_when_cheaper=cfg.get("text_when_cheaper", False),  # absent before it existed
    )


def _stored_style(style: dict, text: str) -> dict:
    """A cached render's style with the ``PageStyle`` fields added since filled in with what
    renders did before them: ``direction`` "auto" lays out text without right-to-left letters
    exactly as before, so such renders stay valid; one with RTL letters was laid out unmirrored
    and does not match (re-rendered)."""
    style = dict(style)
    if "direction" not in style and not any(
        unicodedata.bidirectional(ch) in ("R", "AL") for ch in text
    ):
        style["direction"] = "auto"
    return style


class OpticalMemory:
    """A dialogue history with optical decay (see the module docstring for policy and layout)."""

    def __init__(
        self,
        folder: str | Path,
        keep_text_turns: int = 4,
        schedule: tuple[str | Mode, ...] = DEFAULT_SCHEDULE,
        age_steps: tuple[int, ...] | None = None,
        token_budget: int | None = None,
        style: PageStyle | None = None,
        tokenizer=None,
        *,
        text_when_cheaper: bool = False,
        _create: bool = True,
    ):
        self.folder = Path(folder)
        self.keep_text_turns = int(keep_text_turns)
        self.schedule = tuple(get_mode(m) for m in schedule)
        if age_steps is None:
            age_steps = DEFAULT_AGE_STEPS[: len(self.schedule)]
            while len(age_steps) < len(self.schedule):
                age_steps = (*age_steps, 2 * age_steps[-1])
        self.age_steps = tuple(int(a) for a in age_steps)
        self.token_budget = token_budget
        self.style = style or REFERENCE_STYLE
        self.text_when_cheaper = bool(text_when_cheaper)
        self.tokenizer = tokenizer
        self._saved_config: dict | None = None
        self.turns: list[Turn] = []
        self._tokens: list[int] = []  # text tokens per turn
        self._cache: dict[tuple[int, str], _Render] = {}
        self._journal_bytes = 0
        if self.keep_text_turns < 0:
            raise ValueError(f"keep_text_turns must be >= 0, got {keep_text_turns}")
        if not self.schedule:
            raise ValueError("schedule needs at least one mode")
        if len(self.age_steps) != len(self.schedule) or self.age_steps[0] != 0:
            raise ValueError(
                f"age_steps {self.age_steps} must start at 0 and have one entry per schedule mode "
                f"({len(self.schedule)})"
            )
        if any(b <= a for a, b in zip(self.age_steps, self.age_steps[1:])):
            raise ValueError(f"age_steps must increase strictly, got {self.age_steps}")
        if token_budget is not None and token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        if _create:
            if (self.folder / MANIFEST).exists() or (self.folder / JOURNAL).exists():
                raise FileExistsError(
                    f"{self.folder}: already holds an optical memory; use OpticalMemory.load()"
                )
            (self.folder / PAGES).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.folder / JOURNAL, b"")
            self.save()

    # ------------------------------------------------------------------ turns and persistence
    def add(self, role: str, text: str) -> int:
        """Append a turn (journal line fsynced, then the manifest); returns its id."""
        turn = Turn(len(self.turns), str(role), str(text))
        line = json.dumps(
            {"turn": turn.id, "role": turn.role, "text": turn.text, "sha256": sha256_text(text)},
            ensure_ascii=False,
        )
        data = (line + "\n").encode("utf-8")
        with open(self.folder / JOURNAL, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._journal_bytes += len(data)
        self._append(turn)
        self.save()
        return turn.id

    def _append(self, turn: Turn) -> None:
        self.turns.append(turn)
        self._tokens.append(self._count(turn.text))

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return model_token_count(self.tokenizer, text)
        return count_text_tokens(text)

    def config(self) -> dict:
        return {
            "keep_text_turns": self.keep_text_turns,
            "schedule": [mode_to_json(m) for m in self.schedule],
            "age_steps": list(self.age_steps),
            "token_budget": self.token_budget,
            "style": dataclasses.asdict(self.style),
            "text_when_cheaper": self.text_when_cheaper,
        }

    def save(self) -> None:
        """Write ``memory.json`` atomically (config, committed turns, journal length), and
        ``config.json`` when the config changed since it was last written."""
        config = self.config()
        if config != self._saved_config:
            atomic_write_json(self.folder / CONFIG, {"format": FORMAT, "config": config})
            self._saved_config = config
        atomic_write_json(
            self.folder / MANIFEST,
            {
                "format": FORMAT,
                "config": config,
                "turns": len(self.turns),
                "journal_bytes": self._journal_bytes,
            },
        )

    @staticmethod
    def _read_config_file(path: Path) -> tuple[dict | None, str | None]:
        """(parsed file, None) or (None, why it is unusable). A file of another format raises."""
        if not path.is_file():
            return None, "is missing"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return None, f"is unreadable ({e})"
        if not isinstance(d, dict):
            return None, f"is damaged (a JSON {type(d).__name__}, not an object)"
        fmt = d.get("format")
        if isinstance(fmt, str) and fmt != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {fmt!r})")
        if fmt is None or not isinstance(d.get("config"), dict):
            return None, "is damaged (no format or config)"
        return d, None

    @classmethod
    def load(cls, folder: str | Path, tokenizer=None) -> OpticalMemory:
        """Open a memory folder, recovering a torn write to the last consistent state (warns).

        A missing or damaged ``memory.json`` beside a journal is rebuilt from the journal (config
        from ``config.json``, else the defaults), with a ``MemoryRecoveryWarning`` naming it.
        """
        folder = Path(folder)
        path = folder / MANIFEST
        manifest, why = cls._read_config_file(path)
        committed = None
        if manifest is not None:
            committed = manifest.get("turns")
            if not isinstance(committed, int) or committed < 0:
                manifest, why = None, f"is damaged (turns = {committed!r})"
        if manifest is None and not (folder / JOURNAL).is_file():
            if not path.exists():
                raise FileNotFoundError(f"{folder}: no {MANIFEST} (not an optical memory folder)")
            raise ValueError(f"{path}: {why}, and there is no {JOURNAL} to rebuild it from")
        mem = None
        if manifest is not None:
            try:
                mem = cls(
                    folder, tokenizer=tokenizer, _create=False, **_config_kwargs(manifest["config"])
                )
            except (KeyError, TypeError, ValueError) as e:
                why, committed = f"has a bad config ({type(e).__name__}: {e})", None
        if mem is None:
            backup, used = cls._read_config_file(folder / CONFIG)
            if backup is not None:
                try:
                    kwargs = _config_kwargs(backup["config"])
                    mem = cls(folder, tokenizer=tokenizer, _create=False, **kwargs)
                    used = f"the config from {CONFIG}"
                except (KeyError, TypeError, ValueError) as e:
                    used = f"has a bad config ({type(e).__name__}: {e})"
            if mem is None:
                mem = cls(folder, tokenizer=tokenizer, _create=False)
                used = f"the default config ({CONFIG} {used})"
            warnings.warn(
                f"{path}: {why}; rebuilding it from {JOURNAL}, with {used}",
                MemoryRecoveryWarning,
                stacklevel=2,
            )
        mem._recover_journal(committed)
        mem._recover_cache()
        mem.save()
        return mem

    def _recover_journal(self, committed: int | None) -> None:
        path = self.folder / JOURNAL
        data = path.read_bytes() if path.is_file() else b""
        good, pos, problem = [], 0, None
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                problem = f"a partial last line ({len(data) - pos} bytes, no newline)"
                break
            try:
                row = json.loads(data[pos:nl].decode("utf-8"))
                ok = (
                    row["turn"] == len(good)
                    and isinstance(row["role"], str)
                    and isinstance(row["text"], str)
                    and row["sha256"] == sha256_text(row["text"])
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                problem = f"a damaged line at byte {pos} (turn {len(good)})"
                break
            good.append(Turn(row["turn"], row["role"], row["text"]))
            pos = nl + 1
        if problem is not None:
            discarded = path.with_name(JOURNAL + ".discarded")
            with open(discarded, "ab") as f:
                f.write(data[pos:])
                f.flush()
                os.fsync(f.fileno())
            atomic_write_bytes(path, data[:pos])
            warnings.warn(
                f"{path}: {problem}; kept the first {len(good)} turns, moved {len(data) - pos} "
                f"bytes to {discarded.name}",
                MemoryRecoveryWarning,
                stacklevel=3,
            )
        if not path.is_file():
            atomic_write_bytes(path, b"")
        if committed is not None and len(good) < committed:
            warnings.warn(
                f"{self.folder}: {MANIFEST} recorded {committed} turns but the journal holds "
                f"{len(good)}; turns {len(good)}..{committed - 1} were lost",
                MemoryRecoveryWarning,
                stacklevel=3,
            )
        self._journal_bytes = pos
        for t in good:
            self._append(t)

    def _recover_cache(self) -> None:
        """Index every complete, verified render; delete (with a warning) anything else."""
        root = self.folder / PAGES
        root.mkdir(exist_ok=True)
        for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
            for mdir in sorted(p for p in tdir.iterdir() if p.is_dir()):
                why = self._check_render(tdir, mdir)
                if why is not None:
                    warnings.warn(
                        f"{mdir}: {why}; deleted the cached render (re-rendered when needed)",
                        MemoryRecoveryWarning,
                        stacklevel=3,
                    )
                    shutil.rmtree(mdir)
            if tdir.is_dir() and not any(tdir.iterdir()):
                tdir.rmdir()

    def _check_render(self, tdir: Path, mdir: Path) -> str | None:
        index_path = mdir / "index.json"
        if not index_path.is_file():
            return "no index.json (render interrupted)"
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            turn = int(index["turn"])
            text_sha, style = index["text_sha256"], index["style"]
            files, digests = list(index["files"]), list(index["png_sha256"])
            joiners = list(index["joiners"])
            render = _Render(
                mdir, files, joiners, int(index["placeholder_tokens"]), int(index["vision_tokens"])
            )
            mode = mode_from_json(index["mode"])
        except KeyError as e:
            return f"unreadable index.json (no {e} field)"
        except (ValueError, TypeError, AttributeError) as e:
            return f"unreadable index.json ({type(e).__name__}: {e})"
        if not (len(files) == len(digests) == len(joiners)) or not all(
            isinstance(f, str) and _PAGE_FILE.fullmatch(f) for f in files
        ):
            return "unreadable index.json (bad files / png_sha256 / joiners lists)"
        if tdir.name != f"t{turn:06d}" or turn >= len(self.turns):
            return f"render of turn {turn}, which the journal does not hold"
        if mdir.name != mode.name:
            return f"index.json names mode {mode.name}, not {mdir.name}"
        if text_sha != sha256_text(self.turns[turn].text):
            return f"rendered from other text than turn {turn}"
        if _stored_style(style, self.turns[turn].text) != dataclasses.asdict(self.style):
            return "rendered with another style"
        for f, digest in zip(files, digests):
            p = mdir / f
            if not p.is_file():
                return f"page file {f} is missing"
            if sha256_bytes(p.read_bytes()) != digest:
                return f"page file {f} differs from its index sha256"
        self._cache[(turn, mode.name)] = render
        return None

    # ------------------------------------------------------------------ rendering (cached)
    def _render(self, turn: int, mode: Mode) -> _Render:
        """Pages of ``turn`` at ``mode``: from the cache, else rendered once and written to disk."""
        key = (turn, mode.name)
        if key in self._cache:
            return self._cache[key]
        text = self.turns[turn].text
        bad = set(missing_chars(text, self.style.font))
        drawable = "".join("?" if c in bad else c for c in text) if bad else text
        pages = merge_blank_pages(render_text(drawable, default_style(mode, self.style)))
        mdir = self.folder / PAGES / f"t{turn:06d}" / mode.name
        mdir.mkdir(parents=True, exist_ok=True)
        files, digests, placeholder, grid = [], [], 0, 0
        for k, page in enumerate(pages):
            data = png_bytes(page.image)
            files.append(f"page_{k + 1:04d}.png")
            digests.append(sha256_bytes(data))
            atomic_write_bytes(mdir / files[-1], data)
            placeholder += count_image_tokens(*page.image.size, mode)
            grid += grid_image_tokens(*page.image.size, mode)
        joiners = _joiners([p.text for p in pages])
        atomic_write_json(
            mdir / "index.json",
            {
                "turn": turn,
                "mode": mode_to_json(mode),
                "text_sha256": sha256_text(text),
                "style": dataclasses.asdict(self.style),
                "files": files,
                "png_sha256": digests,
                "joiners": joiners,
                "replaced_chars": sorted(bad),
                "placeholder_tokens": placeholder,
                "vision_tokens": grid,
            },
        )
        fsync_dir(mdir.parent)
        entry = _Render(mdir, files, joiners, placeholder, grid, [p.image for p in pages])
        self._cache[key] = entry
        return entry

    # ------------------------------------------------------------------ decay plan
    def scheduled_level(self, turn: int) -> int | None:
        """Schedule index for ``turn`` by age alone (None: kept as text)."""
        age = len(self.turns) - 1 - turn
        if age < self.keep_text_turns:
            return None
        r = age - self.keep_text_turns
        return max(j for j, a in enumerate(self.age_steps) if a <= r)

    def plan(self) -> dict[int, Mode | str]:
        """Turn id -> ``"text"``, a ``Mode``, or ``"dropped"`` after age decay and the budget."""
        levels = {t.id: self.scheduled_level(t.id) for t in self.turns}
        dropped: set[int] = set()

        def as_text(tid: int) -> bool:
            lv = levels[tid]
            return lv is None or (
                self.text_when_cheaper
                and self._tokens[tid] <= self._render(tid, self.schedule[lv]).placeholder_tokens
            )

        def cost(tid: int) -> int:
            if as_text(tid):
                return self._tokens[tid]
            return self._render(tid, self.schedule[levels[tid]]).placeholder_tokens

        if self.token_budget is not None:
            last = len(self.schedule) - 1

            total = sum(cost(t) for t in levels)
            while total > self.token_budget:
                images = [
                    t for t, lv in sorted(levels.items()) if lv is not None and t not in dropped
                ]
                movable = [t for t in images if levels[t] < last]
                if movable:  # the oldest image turn steps down one mode
                    t = movable[0]
                    total -= cost(t)
                    levels[t] += 1
                    total += cost(t)
                elif images:  # all at the last mode: forget the oldest
                    dropped.add(images[0])
                    total -= cost(images[0])
                else:
                    break  # only text turns left: the budget cannot be met
        return {
            tid: "dropped" if tid in dropped else ("text" if as_text(tid) else self.schedule[lv])
            for tid, lv in levels.items()
        }

    # ------------------------------------------------------------------ outputs
    def context(self) -> Context:
        """The history as the decoder should see it (plan applied), oldest first."""
        items: list[TextItem | ImageItem] = []
        dropped, text_n, ph_n, grid_n = [], 0, 0, 0
        for tid, what in self.plan().items():
            turn = self.turns[tid]
            if what == "dropped":
                dropped.append(tid)
            elif what == "text":
                items.append(TextItem(tid, turn.role, turn.text, self._tokens[tid]))
                text_n += self._tokens[tid]
            else:
                r = self._render(tid, what)
                items.append(
                    ImageItem(
                        tid, turn.role, what, r.load_images(), r.vision_tokens, r.placeholder_tokens
                    )
                )
                ph_n += r.placeholder_tokens
                grid_n += r.vision_tokens
        return Context(items, text_n + ph_n, text_n, ph_n, grid_n, dropped)

    def recall(
        self,
        turn: int,
        ocr,
        mode: str | Mode | None = None,
        prompt: str = PROMPTS["free"],
        max_new_tokens: int | None = None,
    ) -> str:
        """Decode ``turn``'s pages back to text with ``ocr.generate``.

        ``mode`` defaults to the turn's mode in the current plan (the schedule's last mode for a
        dropped turn). A turn still kept as text is returned as is unless ``mode`` is given.
        """
        if not 0 <= turn < len(self.turns):
            raise IndexError(f"turn {turn} out of range (0..{len(self.turns) - 1})")
        if mode is None:
            what = self.plan()[turn]
            if what == "text":
                return self.turns[turn].text
            mode = self.schedule[-1] if what == "dropped" else what
        mode = get_mode(mode)
        r = self._render(turn, mode)
        per_page = self._tokens[turn] // max(1, len(r.files)) + 1
        limit = max_new_tokens or default_max_new_tokens(
            ocr, per_page, r.placeholder_tokens // max(1, len(r.files))
        )
        texts = decode_images(ocr, r.load_images(), mode, prompt, limit)
        return join_pages(texts, r.joiners)

    def report(self) -> MemoryReport:
        ctx = self.context()
        plan = self.plan()
        by_mode: dict[str, int] = {}
        for what in plan.values():
            if isinstance(what, Mode):
                by_mode[what.name] = by_mode.get(what.name, 0) + 1
        plain = sum(self._tokens)
        return MemoryReport(
            turns=len(self.turns),
            text_turns=sum(1 for w in plan.values() if w == "text"),
            image_turns=by_mode,
            dropped=len(ctx.dropped),
            plain_tokens=plain,
            context_tokens=ctx.total_tokens,
            vision_tokens=ctx.vision_tokens,
            tokens_saved=plain - ctx.total_tokens,
            over_budget=self.token_budget is not None and ctx.total_tokens > self.token_budget,
        )

    def tokens_saved(self) -> int:
        """Plain-text history tokens minus the context's tokens (negative: images cost more)."""
        return self.report().tokens_saved

    def __len__(self) -> int:
        return len(self.turns)
