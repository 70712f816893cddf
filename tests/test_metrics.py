"""Hand-worked checks of dsocr.eval.metrics; the arithmetic of each expected value is in a comment."""

import math
import random
import time

import pytest

from dsocr.eval.metrics import (
    _latex_to_text,
    _parse_table,
    _TableNode,
    _tree_edit_distance,
    box_iou,
    cer,
    edit_distance,
    fox_f1,
    fox_precision,
    fox_recall,
    fox_scores,
    fox_tokenize,
    normalized_edit_distance,
    omnidoc_normalize,
    omnidoc_text_edit,
    page_tables,
    reading_order_distance,
    reading_order_edit,
    table_teds,
    teds,
    wer,
)


def _naive_levenshtein(a, b):
    """Textbook O(n m) Wagner-Fischer DP, the oracle for the bit-parallel version."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------------------------
# Levenshtein


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("", "", 0),
        ("abc", "", 3),  # three deletions
        ("", "abc", 3),  # three insertions
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("sitting", "kitten", 3),  # symmetric
        ("flaw", "lawn", 2),  # -f, +n
        ("saturday", "sunday", 3),  # -a, -t, r->n
        ("abc", "xyz", 3),  # three substitutions
        ("a", "b", 1),
        ("ab", "ba", 2),  # no transpositions in Levenshtein: two substitutions
    ],
)
def test_edit_distance_classic(a, b, expected):
    assert edit_distance(a, b) == expected


def test_edit_distance_on_token_lists():
    # ["the","cat","sat"] -> ["the","bat","sat","down"]: cat->bat, +down = 2
    assert edit_distance(["the", "cat", "sat"], ["the", "bat", "sat", "down"]) == 2
    # integer sequences: [0,1,2] -> [1,0,2]: two substitutions
    assert edit_distance([0, 1, 2], [1, 0, 2]) == 2


def test_edit_distance_matches_naive_dp_on_random_strings():
    rng = random.Random(0)
    for _ in range(400):
        # small alphabets make many matches, which exercises the carry logic; lengths cross 64
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 90)))
        assert edit_distance(a, b) == _naive_levenshtein(a, b), (a, b)


def test_normalized_edit_distance():
    assert normalized_edit_distance("", "") == 0.0  # defined as 0 for two empty strings
    assert normalized_edit_distance("abc", "") == 1.0  # 3 / max(3, 0)
    assert normalized_edit_distance("", "abcd") == 1.0  # 4 / 4
    assert normalized_edit_distance("abc", "abc") == 0.0
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)  # 3 / max(6, 7)


def test_edit_distance_speed_3000_chars():
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz     .,"
    a = "".join(rng.choice(alphabet) for _ in range(3000))
    b = "".join(rng.choice(alphabet) for _ in range(3000))
    t0 = time.perf_counter()
    d = edit_distance(a, b)
    elapsed = time.perf_counter() - t0
    assert 0 < d <= 3000
    assert elapsed < 1.0, f"edit_distance of two 3,000-char strings took {elapsed:.2f} s"


# --------------------------------------------------------------------------------------------
# CER / WER


def test_cer():
    assert cer("hello", "hello") == 0.0
    assert cer("helo", "hello") == pytest.approx(1 / 5)  # one deletion / 5 reference chars
    assert cer("", "abcd") == 1.0  # 4 deletions / 4
    assert cer("abcdef", "ab") == pytest.approx(2.0)  # 4 insertions / 2: CER can exceed 1
    assert cer("", "") == 0.0  # empty reference convention
    assert cer("x", "") == 1.0


def test_cer_whitespace_normalisation():
    # raw: "a  b\n" -> "a b" needs 2 deletions (one space, the newline) over 3 reference chars
    assert cer("a  b\n", "a b") == pytest.approx(2 / 3)
    # normalised: both become "a b"
    assert cer("a  b\n", "a b", normalize_whitespace=True) == 0.0
    # "a\tb" -> "a b" after normalisation; "ab" stays "ab": one insertion / 2 reference chars
    assert cer("a\tb", "ab", normalize_whitespace=True) == pytest.approx(1 / 2)


def test_wer():
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "the cat sat down") == pytest.approx(1 / 4)  # one deletion / 4
    # "the bat sat on" vs "the cat sat": bat->cat (sub) + "on" (insertion) = 2 edits / 3 words
    assert wer("the bat sat on", "the cat sat") == pytest.approx(2 / 3)
    assert wer("  the\ncat  ", "the cat") == 0.0  # whitespace runs never matter for words
    assert wer("Hello,", "hello") == 1.0  # case and punctuation are kept: one substitution
    assert wer("", "") == 0.0


# --------------------------------------------------------------------------------------------
# Fox precision


def test_fox_scores_worked_example():
    pred, gt = "the cat sat on the mat", "the cat sat on a mat"
    # pred word set {the, cat, sat, on, mat} (5 types; "the" counts once)
    # gt word set   {the, cat, sat, on, a, mat} (6 types); intersection = 5
    # P = 5/5 = 1.0, R = 5/6, F1 = 2 * 1 * (5/6) / (1 + 5/6) = (10/6) / (11/6) = 10/11
    assert fox_precision(pred, gt) == 1.0
    assert fox_recall(pred, gt) == pytest.approx(5 / 6)
    assert fox_f1(pred, gt) == pytest.approx(10 / 11)
    # character edit distance: "the mat" vs "a mat": t->a, -h, -e = 3 over max(22, 20) = 22
    assert fox_scores(pred, gt)["edit_dist"] == pytest.approx(3 / 22)


def test_fox_precision_partial_and_sets():
    # pred {a, b, c, d}, gt {a, b, x}: 2 hits; P = 2/4, R = 2/3, F1 = 2(1/2)(2/3)/(1/2+2/3) = 4/7
    assert fox_precision("a b c d", "a b x") == pytest.approx(0.5)
    assert fox_recall("a b c d", "a b x") == pytest.approx(2 / 3)
    assert fox_f1("a b c d", "a b x") == pytest.approx(4 / 7)
    # sets, not multisets: a repeated correct word is not penalised (P = |{the}| / |{the}|)
    assert fox_precision("the the the", "the cat") == 1.0
    assert fox_recall("the the the", "the cat") == pytest.approx(1 / 2)
    # word order is ignored entirely
    assert fox_precision("mat the on", "on the mat") == 1.0
    # no overlap: P = R = F1 = 0
    assert fox_scores("x y", "a b")["f1"] == 0.0


def test_fox_empty_conventions():
    assert fox_scores("", "")["precision"] == 1.0
    assert fox_precision("", "some words") == 0.0
    assert fox_recall("some words", "") == 0.0


def test_fox_tokenize():
    assert fox_tokenize("  Hello,  world!\n") == ["Hello,", "world!"]  # == str.split()
    assert fox_tokenize("我爱 NLP models") == ["我", "爱", "NLP", "models"]  # CJK per character


# --------------------------------------------------------------------------------------------
# OmniDocBench text normalisation


def test_omnidoc_whitespace_and_punctuation_vanish():
    # clean_string keeps only \w: spaces, newlines, commas, "!" and "." all go
    assert omnidoc_normalize("Hello,   world!\n\nSecond  para.") == "HelloworldSecondpara"
    assert omnidoc_normalize("line1\nline2") == "line1line2"
    assert omnidoc_text_edit("Hello world", "Hello,\n\n  world!") == 0.0
    # one letter different out of 4 normalised characters: 1/4
    assert omnidoc_text_edit("ab cd", "ab ce") == pytest.approx(1 / 4)
    assert omnidoc_text_edit("", "") == 0.0
    assert omnidoc_text_edit("", "text") == 1.0


def test_omnidoc_markdown_emphasis_headings_images():
    # "*" and "#" are punctuation; "_" is a word character, so _it_ keeps its underscores
    assert omnidoc_normalize("# Title\n\n**Bold** and _it_") == "TitleBoldand_it_"
    assert omnidoc_normalize("![figure](images/0.jpg) caption") == "caption"


def test_omnidoc_display_math_is_removed_either_syntax():
    # display formulas are scored by the formula metric, not the text metric
    assert omnidoc_normalize(r"a \[ x^2 \] b") == "ab"
    assert omnidoc_normalize("a $$x^2$$ b") == "ab"
    assert omnidoc_text_edit(r"see \[ x^2 \] here", "see $$y^3$$ here") == 0.0
    # a paragraph that is a single $...$ formula is an isolated equation too
    assert omnidoc_normalize("before\n\n$E = mc^2$\n\nafter") == "beforeafter"


def test_omnidoc_inline_math_to_unicode():
    # $x^2$ and \(x^2\): markup -> text "x^2" -> clean_string drops "^": "x2"
    assert omnidoc_normalize("area $x^2$ or \\(x^2\\)") == "areax2orx2"
    # \alpha -> α (a word character, kept); "_" is kept as pylatexenc keeps it
    assert omnidoc_normalize(r"angle $\alpha_i$") == "angleα_i"
    # \frac{a}{b} -> "a/b" -> "ab"; plain $5 ... $ has no markup and only loses its "$"
    assert omnidoc_normalize(r"$\frac{a}{b}$ costs $5 and $6") == "abcosts5and6"
    assert _latex_to_text(r"\"{o} \sin x \mathbb{R}") == "ö sin x R"


def test_omnidoc_tables_are_removed():
    html = "Text\n\n<table><tr><td>1</td><td>2</td></tr></table>\n\nMore"
    assert omnidoc_normalize(html) == "TextMore"
    # an inline HTML table inside a paragraph is cut out too
    assert omnidoc_normalize("A <table><tr><td>x</td></tr></table> B") == "AB"
    md = "| a | b |\n|---|---|\n| 1 | 2 |\n\nafter"
    assert omnidoc_normalize(md) == "after"
    assert omnidoc_normalize(r"\begin{tabular}{cc} a & b \\ \end{tabular} z") == "z"
    # pipes without a separator row are not a table: the words stay
    assert omnidoc_normalize("| a | b |\n| c | d |") == "abcd"


def test_omnidoc_latex_wrappers_and_repeats():
    assert omnidoc_normalize(r"\section*{Intro} \text{ hi }") == "Introhi"
    # 6 underscores -> 4 ("_" is \w and stays); 14 dots -> 4 dots -> removed as punctuation
    assert omnidoc_normalize("______ ..............") == "____"
    # non-table HTML tags keep their names, as in OmniDocBench (only "<", "/" and ">" go)
    assert omnidoc_normalize("x<sup>2</sup>") == "xsup2sup"


# --------------------------------------------------------------------------------------------
# TEDS

TWO_CELLS = "<table><tr><td>ab</td><td>cd</td></tr></table>"
TWO_ROWS = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"


def test_teds_identical_is_one():
    assert teds(TWO_CELLS, TWO_CELLS) == 1.0
    assert teds(TWO_ROWS, TWO_ROWS) == 1.0
    assert teds(TWO_ROWS, TWO_ROWS, structure_only=True) == 1.0


def test_teds_one_cell_text_changed():
    pred = "<table><tr><td>ab</td><td>ce</td></tr></table>"
    # nodes below <table>: tr, td, td -> |T| = 3 on both sides
    # only edit: rename td "cd" -> "ce", cost NED("ce", "cd") = 1/2
    # TEDS = 1 - 0.5 / 3 = 5/6
    assert teds(pred, TWO_CELLS) == pytest.approx(5 / 6)
    # structure only ignores cell text entirely
    assert teds(pred, TWO_CELLS, structure_only=True) == 1.0


def test_teds_missing_row():
    pred = "<table><tr><td>a</td><td>b</td></tr></table>"
    # gt has tr,td,td,tr,td,td = 6 nodes; pred has 3; delete one tr and its two tds = 3 edits
    # TEDS = 1 - 3 / max(3, 6) = 0.5
    assert teds(pred, TWO_ROWS) == pytest.approx(0.5)
    assert teds(pred, TWO_ROWS, structure_only=True) == pytest.approx(0.5)


def test_teds_span_mismatch_and_inline_tags():
    pred = "<table><tr><td>ab</td></tr></table>"
    gt = '<table><tr><td colspan="2">ab</td></tr></table>'
    # rename td -> td with different colspan costs 1; |T| = 2 (tr, td): TEDS = 1 - 1/2
    assert teds(pred, gt) == pytest.approx(0.5)
    # in-cell <b> counts as a node (|T| = 3: tr, td, b) and as content tokens:
    # ["x", "<b>", "y", "</b>"] vs ["x", "<b>", "z", "</b>"]: NED = 1/4; TEDS = 1 - 0.25/3
    a = "<table><tr><td>x<b>y</b></td></tr></table>"
    b = "<table><tr><td>x<b>z</b></td></tr></table>"
    assert teds(a, b) == pytest.approx(1 - 0.25 / 3)


def test_page_tables_reads_pipe_and_html_tables_in_page_order():
    page = (
        "# T\n\n<table><tr><td>x</td></tr></table>\n\n"
        "| a | b \\| c |\n|---|:-:|\n| 1 | <2> |\n\nnot | a table\n"
    )
    assert page_tables(page) == [
        "<table><tr><td>x</td></tr></table>",
        "<table><tr><td>a</td><td>b | c</td></tr><tr><td>1</td><td>&lt;2&gt;</td></tr></table>",
    ]
    assert page_tables("a | b\n| c |\n") == []  # no separator row
    # cells as a reader sees them: no code-span backticks, escapes resolved outside code
    md = "| `bool` | a\\*b |\n|---|---|\n| `` x`y `` | `\\*` |\n"
    assert page_tables(md) == [
        "<table><tr><td>bool</td><td>a*b</td></tr><tr><td>x`y</td><td>\\*</td></tr></table>"
    ]


def test_table_teds_matches_each_ground_truth_table_to_its_best_prediction():
    gt = "| a | b |\n|---|---|\n| c | d |\n\ntext\n\n| ab | cd |\n|---|---|\n"
    assert math.isnan(table_teds(TWO_ROWS, "no table here"))
    assert table_teds("plain text only", gt) == 0.0
    # both tables predicted, in the other order and as HTML (thead/tbody ignored)
    pred = f"{TWO_CELLS}\n\n<table><thead><tr><td>a</td><td>b</td></tr></thead>" + (
        "<tbody><tr><td>c</td><td>d</td></tr></tbody></table>"
    )
    assert table_teds(pred, gt) == 1.0
    # one table predicted: it is used once, the other ground-truth table scores 0
    assert table_teds(TWO_ROWS, gt) == pytest.approx(0.5)
    assert table_teds(TWO_ROWS + TWO_ROWS + TWO_CELLS, gt) == 1.0  # extra tables cost nothing


def test_teds_sections_th_and_ignore_tags():
    pred = "<table><thead><tr><th>h</th></tr></thead><tbody><tr><td>v</td></tr></tbody></table>"
    gt = "<table><tr><td>h</td></tr><tr><td>v</td></tr></table>"
    # pred nodes: thead, tr, th, tbody, tr, td = 6; gt: tr, td, tr, td = 4
    # edits: delete thead and tbody (their rows move up); th is a cell like td (rename 0) = 2
    # TEDS = 1 - 2/6 = 2/3
    assert teds(pred, gt) == pytest.approx(2 / 3)
    # stripping thead/tbody as OmniDocBench does makes them equal
    assert teds(pred, gt, ignore_tags=("thead", "tbody")) == 1.0


def test_teds_implied_end_tags_and_no_table():
    # HTML lets </td> and </tr> be omitted; the tree is the same as the explicit form
    implicit = "<table><tr><td>a<td>b<tr><td>c<td>d</table>"
    assert teds(implicit, TWO_ROWS) == 1.0
    assert teds("no table here", TWO_ROWS) == 0.0  # PubTabNet: no <table> -> 0
    # text around the table is ignored
    assert teds("before " + TWO_ROWS + " after", TWO_ROWS) == 1.0


def _tree(label, *children):
    node = _TableNode(label)
    node.children = list(children)
    return node


def test_zhang_shasha_paper_example():
    # Zhang & Shasha (1989) Fig.: f(d(a, c(b)), e) vs f(c(d(a, b)), e) has distance 2
    # (delete c under d, insert c above d)
    t1 = _tree("f", _tree("d", _tree("a"), _tree("c", _tree("b"))), _tree("e"))
    t2 = _tree("f", _tree("c", _tree("d", _tree("a"), _tree("b"))), _tree("e"))

    def unit(a, b):
        return 0.0 if a.tag == b.tag else 1.0

    assert _tree_edit_distance(t1, t2, unit) == 2.0
    assert _tree_edit_distance(t1, t1, unit) == 0.0
    # a leaf x vs the chain x(y(z)): keep x, insert y and z = 2
    assert _tree_edit_distance(_tree("x"), _tree("x", _tree("y", _tree("z"))), unit) == 2.0


# --------------------------------------------------------------------------------------------
# Reading order


def test_reading_order_edit():
    assert reading_order_edit([0, 1, 2], [0, 1, 2]) == 0.0
    assert reading_order_edit([1, 0], [0, 1]) == 1.0  # 2 substitutions / 2
    assert reading_order_edit([2, 1, 0], [0, 1, 2]) == pytest.approx(2 / 3)  # ends swapped
    assert reading_order_edit([], []) == 0.0


BOX_A, BOX_B, BOX_C = (0, 0, 10, 10), (0, 20, 10, 30), (0, 40, 10, 50)


def test_box_iou():
    assert box_iou(BOX_A, BOX_A) == 1.0
    assert box_iou(BOX_A, BOX_B) == 0.0
    # (0,0,10,10) vs (5,0,15,10): intersection 50, union 100 + 100 - 50 = 150
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_reading_order_distance_swapped_pair():
    gt = [BOX_A, BOX_B]
    assert reading_order_distance([BOX_A, BOX_B], gt) == 0.0
    # predicted order B, A -> gt index sequence [1, 0] vs [0, 1]: 2 edits / 2
    assert reading_order_distance([BOX_B, BOX_A], gt) == 1.0
    # three blocks, first two swapped: [1, 0, 2] vs [0, 1, 2]: 2 edits / 3
    shifted = [(x0 + 1, y0, x1 + 1, y1) for x0, y0, x1, y1 in (BOX_B, BOX_A, BOX_C)]  # IoU 9/11
    assert reading_order_distance(shifted, [BOX_A, BOX_B, BOX_C]) == pytest.approx(2 / 3)


def test_reading_order_distance_unmatched_and_text():
    far = (100, 100, 110, 110)
    # pred [A, far]: far matches nothing -> [0, u] vs [0, 1]: 1 substitution / 2
    assert reading_order_distance([BOX_A, far], [BOX_A, BOX_B]) == pytest.approx(0.5)
    # only matched blocks: [0] vs [0]
    assert reading_order_distance([BOX_A, far], [BOX_A, BOX_B], count_unmatched=False) == 0.0
    # text blocks matched by 1 - NED: "helo" ~ "hello" (0.8), "world" == "world"
    assert reading_order_distance(["world", "helo"], ["hello", "world"]) == 1.0
    assert reading_order_distance(["helo", "world"], ["hello", "world"]) == 0.0
    with pytest.raises(ValueError):
        reading_order_distance(["text"], [BOX_A])


# --------------------------------------------------------------------------------------------
# Edge cases found by the audit: Unicode forms, tag case, nested tables


def test_metrics_compare_unicode_nfc_forms_as_equal():
    nfd, nfc = "cafe\u0301 au lait", "café au lait"
    assert cer(nfd, nfc) == 0 and cer(nfd, nfc, normalize_whitespace=True) == 0
    assert wer(nfd, nfc) == 0
    assert fox_precision(nfd, nfc) == 1
    assert omnidoc_normalize(nfd) == omnidoc_normalize(nfc) == "caféaulait"
    assert omnidoc_text_edit(nfd, nfc) == 0
    assert cer("cafe", "café") == 0.25  # a real difference stays one edit in four characters


def test_omnidoc_removes_html_tables_in_any_case():
    assert omnidoc_normalize("a<TABLE><tr><td>x</td></tr></TABLE>b") == "ab"
    assert omnidoc_normalize("a<Table border=1><TR><TD>x</TD></TR></tAbLe>b") == "ab"
    assert omnidoc_normalize("a\n\n<TABLE><tr><td>x</td></tr></TABLE>\n\nb") == "ab"
    # not a table tag, so kept ("/t" goes, as clean_string deletes it everywhere)
    assert omnidoc_normalize("<tablet>x</tablet>") == "tabletxablet"


def test_teds_keeps_a_nested_table_inside_its_cell():
    nested = "<table><tr><td><table><tr><td>x</td></tr></table></td><td>y</td></tr></table>"
    plain = "<table><tr><td>x</td><td>y</td></tr></table>"
    root, n = _parse_table(nested, frozenset())
    (row,) = root.children
    assert [c.tag for c in row.children] == ["td", "td"]  # one row of two cells, not two rows
    assert row.children[0].content == ("<table>", "<tr>", "<td>", "x", "</td>", "</tr>", "</table>")
    assert row.children[1].content == "y"
    assert n == 6  # tr, td, table, tr, td, td: every element below the root (PubTabNet xpath)
    assert teds(nested, nested) == 1.0
    # tr + 2 td in both; the nested cell's 7 tokens vs "x": NED 6/7; |T| = max(6, 3)
    assert teds(nested, plain) == pytest.approx(1 - (6 / 7) / 6)
    # the nested table's own closing tags do not close the outer cell or row
    after = nested.replace("</table></td><td>y", "</table>z</td><td>y")
    (row,) = _parse_table(after, frozenset())[0].children
    assert row.children[0].content[-1] == "z" and row.children[1].content == "y"
