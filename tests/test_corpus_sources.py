"""build_corpus's plain-text sources and packaged corpora: paragraphs, chunks, fortunes, the
Bible, man pages, Wikipedia, source selection, and held-out grouping."""

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import build_corpus  # noqa: E402
import pytest  # noqa: E402


def test_text_paragraphs_join_wrapped_lines_and_keep_short_ones():
    text = (
        "Title\n=====\n\n"
        "1 About\n2 Keeping it free\n  2.1 Referring\n\n"
        "A long wrapped paragraph of prose that goes on across the whole width of\n"
        "the text and then continues on the next line because it was wrapped.\n\n"
        "* item one\n* item two, long enough to wrap across the full width of the text\n"
        "  and continue on its second line\n"
        "\x1b[33m-- Someone\x1b[m, in _\bb_\bo_\bl_\bd\n\n"
        "要有礼貌，很难避免遇到与你意见不和，或者难以合作的\n人。请接受这一事实。\n"
    )
    assert build_corpus.text_paragraphs(text) == [
        "Title",
        "1 About",
        "2 Keeping it free",
        "2.1 Referring",
        "A long wrapped paragraph of prose that goes on across the whole width of the text "
        "and then continues on the next line because it was wrapped.",
        "* item one",
        "* item two, long enough to wrap across the full width of the text and continue on "
        "its second line",
        "-- Someone, in bold",
        "要有礼貌，很难避免遇到与你意见不和，或者难以合作的人。请接受这一事实。",
    ]


def test_chunks_cut_between_paragraphs_and_lose_nothing():
    paras = [f"paragraph {i} " + "x" * (i % 7 * 40) for i in range(300)]
    parts = build_corpus.chunks(paras, size=2000)
    assert len(parts) > 5
    assert "\n".join(parts).split("\n") == paras  # every paragraph once, in order
    assert all(len(p) >= 2000 for p in parts[:-1])
    assert all(len(p) < 2000 + 7 * 40 + 20 for p in parts)  # at most one paragraph over


def _fake_sources(tmp_path, monkeypatch):
    fort = tmp_path / "fortunes"
    (fort / "de").mkdir(parents=True)
    (fort / "ru").mkdir()
    entries = [f"Fortune number {i} is a short saying.\n\t-- Author {i}" for i in range(400)]
    (fort / "wisdom").write_text("\n%\n".join(entries) + "\n%\n")
    (fort / "wisdom.dat").write_bytes(b"\0binary index")
    (fort / "wisdom.u8").symlink_to("wisdom")
    (fort / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n" * 50)
    (fort / "chinese").write_text("\n%\n".join(["要有礼貌，请接受这一事实。" * 10] * 30))
    (fort / "de" / "zitate").write_text("\n%\n".join(["Ein deutsches Zitat, lang genug."] * 30))
    manual = tmp_path / "manual.txt.gz"
    paras = [f"Section {i} explains one thing about packages in some detail." for i in range(900)]
    manual.write_bytes(gzip.compress("\n\n".join(paras).encode()))
    bible = tmp_path / "bin" / "bible"
    bible.parent.mkdir()
    verses = "".join(
        f"{b}{c}:{v} Verse {v} of chapter {c} of {b}, and it came to pass.\n"
        for b in ("Ge", "1Sa", "Rev")
        for c in (1, 2)
        for v in range(1, 40)
    )
    (tmp_path / "verses.txt").write_text(verses)
    bible.write_text(f"#!/bin/sh\ncat {tmp_path / 'verses.txt'}\n")
    bible.chmod(0o755)
    (tmp_path / "bible.data").write_bytes(b"x")
    monkeypatch.setattr(build_corpus, "FORTUNES", fort)
    monkeypatch.setattr(build_corpus, "TEXT_DOCS", (("debian-faq", "faq", "en", str(manual)),))
    monkeypatch.setattr(build_corpus, "BIBLE_DATA", tmp_path / "bible.data")
    monkeypatch.setattr(build_corpus, "_html_sources", lambda: iter(()))
    monkeypatch.setattr(build_corpus, "MAN_PACKAGES", ())  # not the machine's man pages
    monkeypatch.setattr(build_corpus, "_wiki_folder", lambda: None)  # nor its Wikipedia
    monkeypatch.setenv("PATH", f"{bible.parent}{os.pathsep}{os.environ['PATH']}")


def test_plain_text_and_packaged_sources_build_a_split_corpus(tmp_path, monkeypatch):
    _fake_sources(tmp_path, monkeypatch)
    docs = list(build_corpus.sources())
    by_source = {}
    for doc, group, lang, source, text in docs:
        assert isinstance(text, str) and text
        by_source.setdefault(source, []).append((doc, group, lang))
    assert set(by_source) == {"debian-faq", "fortunes", "bible-kjv"}
    faq = by_source["debian-faq"]
    assert len(faq) > 1 and all(d == g for d, g, _ in faq)  # a manual's chunks: one group each
    fortunes = {d: (g, lang) for d, g, lang in by_source["fortunes"]}
    assert not any("ascii-art" in d or ".dat" in d or ".u8" in d for d in fortunes)
    assert fortunes["fortunes/zh/chinese/0"] == ("fortunes/zh/chinese", "zh")
    assert fortunes["fortunes/de/zitate/0"] == ("fortunes/de/zitate", "de")
    wisdom = [d for d in fortunes if d.startswith("fortunes/en/wisdom/")]
    assert len(wisdom) > 1 and {fortunes[d][0] for d in wisdom} == {"fortunes/en/wisdom"}
    text = "\n".join(t for d, _, _, _, t in docs if d.startswith("fortunes/en/wisdom/"))
    assert text.split("\n")[:2] == ["Fortune number 0 is a short saying.", "-- Author 0"]
    books = {g for _, g, _ in by_source["bible-kjv"]}
    assert books == {"bible-kjv/Ge", "bible-kjv/1Sa", "bible-kjv/Rev"}
    bible = [t for d, _, _, s, t in docs if s == "bible-kjv" and d.startswith("bible-kjv/1Sa/")]
    assert bible[0].split("\n")[0] == "Verse 1 of chapter 1 of 1Sa, and it came to pass."

    manifest = build_corpus.build(tmp_path / "corpus", min_chars=100)
    rows = []
    for split in ("train", "heldout"):
        for line in (tmp_path / "corpus" / f"{split}.jsonl").read_text().splitlines():
            rows.append((split, json.loads(line)))
    # every document of a group lands in one split, the one its group hashes to
    for split, r in rows:
        assert (split == "heldout") == build_corpus.is_heldout(r["group"])
    assert sum(manifest["documents_by_source"].values()) == len(rows)
    assert manifest["sources_requested"] == sorted(build_corpus.SOURCES)


def test_sources_option_keeps_only_the_named_sources(tmp_path, monkeypatch, capsys):
    _fake_sources(tmp_path, monkeypatch)
    assert {d[3] for d in build_corpus.sources(only=["fortunes"])} == {"fortunes"}
    monkeypatch.setattr(build_corpus, "_bible_sources", None)  # not even started when unwanted
    monkeypatch.setattr(build_corpus, "_man_sources", None)
    monkeypatch.setattr(build_corpus, "_wiki_sources", None)
    assert {d[3] for d in build_corpus.sources(only=["debian-faq"])} == {"debian-faq"}
    out = tmp_path / "corpus"
    assert (
        build_corpus.main(["--out", str(out), "--sources", "debian-faq", "--min-chars", "50"]) == 0
    )
    assert build_corpus.main(["--out", str(out), "--sources", "debian-faq,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["documents_by_source"]) == {"debian-faq"}


def test_corpus_identity_names_the_heldout_file_its_digest_and_sources(tmp_path, monkeypatch):
    import hashlib

    from dsocr.train.data import corpus_identity

    _fake_sources(tmp_path, monkeypatch)
    out = tmp_path / "corpus"
    build_corpus.build(out, min_chars=100, only=["fortunes", "bible-kjv"])
    digest = hashlib.sha256((out / "heldout.jsonl").read_bytes()).hexdigest()[:12]
    held = json.loads((out / "manifest.json").read_text())["documents"]["heldout"]
    assert corpus_identity(out, tmp_path) == corpus_identity(out / "heldout.jsonl", tmp_path)
    assert corpus_identity(out, tmp_path) == (
        f"`corpus/heldout.jsonl` (sha256 {digest}, {held} documents; sources bible-kjv, fortunes)"
    )
    (out / "manifest.json").unlink()  # a bare file: its digest only
    assert corpus_identity(out, tmp_path) == f"`corpus/heldout.jsonl` (sha256 {digest})"


MAN_PAGE = r""".\" A comment line before the page
.TH DEMO 1 "2024-01-02" "demo 1.5" "User Commands"
.SH NAME
demo \(em show a demonstration
.SH DESCRIPTION
.B demo
shows a \fIdemonstration\fR of something that takes a long sentence to describe, so that
this paragraph wraps across several lines of the rendered page without hyphenation of its
words: internationalization, characterization and responsibilities.
"""


def _fake_man(tmp_path, monkeypatch):
    """A man tree like /usr/share/man: an en, a de and a zh_CN page, a .so alias, a symbolic
    link, a broken gzip file, a page groff fails on, a long page, and a page of another package;
    a fake dpkg-query lists the files of ``manpages``, ``manpages-de`` and ``manpages-zh``."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    man = tmp_path / "man"
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)
    (man / "zh_CN" / "man1").mkdir(parents=True)
    (man / "man1" / "demo.1.gz").write_bytes(gzip.compress(MAN_PAGE.encode()))
    (man / "de" / "man1" / "demo.1").write_text(
        MAN_PAGE.replace("NAME", "BEZEICHNUNG").replace("shows a", "zeigt über"),
        encoding="utf-8",
    )
    (man / "zh_CN" / "man1" / "demo.1").write_text(
        MAN_PAGE.replace("NAME", "名称"), encoding="utf-8"
    )
    (man / "man1" / "alias.1").write_text(f'.\\" an alias\n.so {man / "man1" / "other.1"}\n')
    (man / "man1" / "link.1.gz").symlink_to("demo.1.gz")
    (man / "man1" / "broken.1.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    (man / "man1" / "aborts.1").write_text(".TH ABORTS 1\n.SH NAME\nx\n.ab this page aborts\n")
    long = [".TH LONG 1", ".SH NAME", "long \\- a long page"]
    long += [f".PP\nParagraph {i} of a long page: ".ljust(90, "x") for i in range(400)]
    (man / "man1" / "long.1").write_text("\n".join(long) + "\n")
    (man / "man1" / "other.1").write_text(MAN_PAGE)  # another package's page
    lists = {
        "manpages": [man, man / "man1", *(man / "man1" / f for f in ("demo.1.gz", "alias.1"))],
        "manpages-de": [man / "de" / "man1", man / "de" / "man1" / "demo.1"],
        "manpages-zh": [man / "zh_CN" / "man1" / "demo.1"],
    }
    lists["manpages"] += [
        man / "man1" / f for f in ("link.1.gz", "broken.1.gz", "aborts.1", "long.1")
    ]
    dpkg = tmp_path / "bin" / "dpkg-query"
    dpkg.parent.mkdir()
    cases = "".join(f"{p}) printf '%s\\n' {' '.join(map(str, f))};; " for p, f in lists.items())
    dpkg.write_text(f'#!/bin/sh\ncase "$2" in {cases}*) exit 1;; esac\n')
    dpkg.chmod(0o755)
    monkeypatch.setattr(build_corpus, "MAN_ROOT", man)
    monkeypatch.setenv("PATH", f"{dpkg.parent}{os.pathsep}{os.environ['PATH']}")


def test_man_pages_render_without_aliases_titles_or_footers(tmp_path, monkeypatch, capsys):
    _fake_man(tmp_path, monkeypatch)
    skipped = {}
    docs = list(build_corpus.sources(only=["manpages"], skipped=skipped))
    by_id = {d: (g, lang, text) for d, g, lang, _, text in docs}
    long = [d for d in by_id if d.startswith("manpages/en/man1/long/")]
    demo = {f"manpages/{x}/man1/demo" for x in ("en", "de", "zh_CN")}
    assert set(by_id) - set(long) == demo  # no alias, link, broken page, other package's page
    assert not any("DEMO(1)" in t or "demo 1.5" in t for _, _, t in by_id.values())  # title, footer
    # one page, one held-out group in every language
    assert by_id["manpages/en/man1/demo"][:2] == ("manpages/man1/demo", "en")
    assert by_id["manpages/de/man1/demo"][:2] == ("manpages/man1/demo", "de")
    assert by_id["manpages/zh_CN/man1/demo"][:2] == ("manpages/man1/demo", "zh")
    assert by_id["manpages/en/man1/demo"][2].split("\n") == [
        "NAME",
        "demo \u2014 show a demonstration",
        "DESCRIPTION",
        "demo shows a demonstration of something that takes a long sentence to describe, so "
        "that this paragraph wraps across several lines of the rendered page without "
        "hyphenation of its words: internationalization, characterization and "
        "responsibilities.",
    ]
    assert by_id["manpages/de/man1/demo"][2].startswith("BEZEICHNUNG\ndemo \u2014 show")
    assert "demo zeigt über demonstration of" in by_id["manpages/de/man1/demo"][2]
    # a long page: cut into chunks, one group
    assert len(long) > 1 and {by_id[d][0] for d in long} == {"manpages/man1/long"}
    assert "Paragraph 399 of a long page" in by_id[long[-1]][2]
    assert skipped == {"unreadable": 2}
    err = capsys.readouterr().err
    assert "skipped manpages/en/man1/broken: cannot read" in err
    assert "skipped manpages/en/man1/aborts: cannot read" in err
    assert "groff exit status 1: this page aborts" in err
    monkeypatch.setattr(build_corpus, "MAN_JOBS", 1)  # the same output from one process
    assert list(build_corpus.sources(only=["manpages"])) == docs


def test_wikipedia_summaries_are_chunked_in_title_order_one_group_per_chunk(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    arts = {
        f"Topic {i:03d}": {
            "title": f"Topic {i:03d}",
            "extract": f"Topic {i:03d} is a thing.\n  It   has a second paragraph {i}.\n\n",
            "description": "d",
        }
        for i in range(300)
    }
    arts["Empty"] = {"title": "Empty", "extract": None}
    (data / "summaries_en-us.json").write_text(json.dumps(dict(reversed(arts.items()))))
    (data / "summaries_fr-fr.json").write_text("{not json")
    skipped = {"unreadable": 0}
    chunks = build_corpus.chunks
    monkeypatch.setattr(build_corpus, "chunks", lambda paras: chunks(paras, size=2000))
    docs = list(build_corpus._wiki_sources(skipped, folder=data))
    assert skipped["unreadable"] == 1  # the broken fr file, named on stderr; es is absent
    assert {(lang, src) for _, _, lang, src, _ in docs} == {("en", "wikipedia")}
    assert len(docs) > 3 and all(d == g for d, g, _, _, _ in docs)  # a chunk is its own group
    lines = "\n".join(t for *_, t in docs).split("\n")
    assert lines[:3] == [
        "Topic 000 is a thing.",
        "It has a second paragraph 0.",
        "Topic 001 is a thing.",
    ]
    assert len(lines) == 600


def test_wikipedia_folder_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / build_corpus.WIKI_PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('its runtime dependencies are missing')")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_corpus._wiki_folder() == pkg / "data"
    monkeypatch.setattr(build_corpus, "WIKI_PACKAGE", "no_such_package_here")
    assert build_corpus._wiki_folder() is None
