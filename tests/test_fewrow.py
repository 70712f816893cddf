"""The few-row CPU kernel (language/fewrow.cpp): values, ranges, when it applies, its build."""

import os
import threading

import pytest
import torch

from dsocr.language import fewrow


def _kernel():
    """The built kernel; a compiler exists on every machine we test on, so a failed build is a
    failure here, not a silent fallback."""
    assert fewrow._compiler() is not None, "no C++ compiler: the decode kernel cannot be built"
    assert fewrow.available(), fewrow.status()


@pytest.mark.parametrize("rows", range(1, fewrow.MAX_ROWS + 1))
def test_matches_matmul_on_any_range(rows):
    """Every row count, inner sizes with and without a vector tail, output counts that do and do
    not fill the kernel's blocks, split ranges; outside [o0, o1) nothing is written."""
    _kernel()
    g = torch.Generator().manual_seed(rows)
    for K, O in [(32, 1), (45, 7), (1280, 53), (17, 96)]:
        x, w = torch.randn(rows, K, generator=g), torch.randn(O, K, generator=g)
        ref = x @ w.T
        y = torch.full((rows, O), float("nan"))
        fewrow.linear_into(x, w, y, 0, O)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        a, b = O // 3, O - O // 4
        y = torch.full((rows, O), float("nan"))
        fewrow.linear_into(x, w, y, a, b)
        torch.testing.assert_close(y[:, a:b], ref[:, a:b], rtol=1e-5, atol=1e-4)
        outside = torch.cat([y[:, :a], y[:, b:]], 1)
        assert outside.isnan().all()


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threaded_matches_one_thread(threads):
    """Split over OpenMP threads: the values of one thread, bit for bit (each output is summed by
    one thread in the same order), for ranges that split into fewer parts than threads."""
    _kernel()
    g = torch.Generator().manual_seed(threads)
    for rows, K, O in [(1, 1280, 896), (8, 64, 1000), (3, 33, 30), (2, 16, 5)]:
        x, w = torch.randn(rows, K, generator=g), torch.randn(O, K, generator=g)
        one, many = torch.full((rows, O), float("nan")), torch.full((rows, O), float("nan"))
        fewrow.linear_into(x, w, one, 1, O, threads=1)
        fewrow.linear_into(x, w, many, 1, O, threads=threads)
        assert torch.equal(many[:, 1:], one[:, 1:]) and many[:, 0].isnan().all()


def test_concurrent_callers_get_their_own_results():
    """Python threads calling at once (the server's engine beside another): each call gets its
    own OpenMP team, and every result is right."""
    _kernel()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g)
    xs = [torch.randn(1 + i % 8, 256, generator=g) for i in range(8)]
    refs = [x @ w.T for x in xs]
    bad = []

    def work(i):
        y = torch.empty(xs[i].shape[0], 512)
        for _ in range(200):
            fewrow.linear_into(xs[i], w, y, 0, 512, threads=2)
            if not torch.allclose(y, refs[i], rtol=1e-5, atol=1e-4):
                bad.append(i)
                return

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts) and not bad


def test_usable_only_where_it_applies():
    _kernel()
    x, w = torch.randn(4, 32), torch.randn(48, 32)
    assert fewrow.usable(x, w, 4)
    assert not fewrow.usable(x, w, 0) and not fewrow.usable(x, w, fewrow.MAX_ROWS + 1)
    assert not fewrow.usable(x.bfloat16(), w.bfloat16(), 4)
    assert not fewrow.usable(x, torch.randn(32, 48).T, 4)  # not contiguous
    with pytest.raises(ValueError, match="rows"):
        fewrow.linear_into(torch.randn(9, 32), w, torch.empty(9, 48), 0, 48)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("DSOCR_CACHE", str(tmp_path))
    cxx = fewrow._compiler()
    assert cxx is not None
    path = fewrow._build(cxx)
    assert path.parent == tmp_path / "kernels" and path.suffix == ".so"
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert fewrow._build(cxx) == path and path.stat().st_mtime_ns == mtime  # not rebuilt


def test_unwritable_cache_builds_in_the_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DSOCR_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(fewrow.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = fewrow._build(fewrow._compiler())
    assert path.parent == tmp_path / "tmp" / f"dsocr-kernels-{os.getuid()}" and path.exists()
    path.parent.chmod(0o777)  # others could plant a library there: refuse to use it
    with pytest.raises(PermissionError, match="not this user's"):
        fewrow._build(fewrow._compiler())


def _fresh(monkeypatch):
    monkeypatch.setattr(fewrow, "_fn", None)
    monkeypatch.setattr(fewrow, "_attn", None)
    monkeypatch.setattr(fewrow, "_status", None)


def test_off_switch_and_missing_compiler_fall_back(monkeypatch):
    _fresh(monkeypatch)
    monkeypatch.setenv("DSOCR_FEWROW", "0")
    assert not fewrow.available() and "DSOCR_FEWROW=0" in fewrow.status()
    assert not fewrow.usable(torch.randn(2, 32), torch.randn(48, 32), 2)
    _fresh(monkeypatch)
    monkeypatch.delenv("DSOCR_FEWROW")
    monkeypatch.setattr(fewrow, "_compiler", lambda: None)
    assert not fewrow.available() and "no C++ compiler" in fewrow.status()


def test_failed_build_is_one_line_and_falls_back(tmp_path, monkeypatch):
    _fresh(monkeypatch)
    bad = tmp_path / "fewrow.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(fewrow, "SOURCE", bad)
    monkeypatch.setenv("DSOCR_CACHE", str(tmp_path / "cache"))
    assert not fewrow.available()
    assert fewrow.status().startswith("off: build failed") and "\n" not in fewrow.status()
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "cache" / "kernels").iterdir())


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa(threads):
    """One query per row over its own number of cached slots (the engine's causal mask), head
    sizes of the tiny, mini and official configs; slots past a row's length never matter."""
    import torch.nn.functional as F

    _kernel()
    g = torch.Generator().manual_seed(threads)
    for B, H, D, S_max in [(3, 4, 16, 9), (2, 6, 64, 40), (4, 10, 128, 300)]:
        q = torch.randn(B, H, 1, D, generator=g)
        k, v = torch.randn(B, H, S_max, D, generator=g), torch.randn(B, H, S_max, D, generator=g)
        lengths = torch.tensor([1, S_max, *range(2, 2 + B - 2)][:B])
        mask = (torch.arange(S_max)[None, :] < lengths[:, None])[:, None, None, :]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = fewrow.decode_attention(q, k, v, lengths, threads)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        k2, v2 = k.clone(), v.clone()
        for b, n in enumerate(lengths.tolist()):
            k2[b, :, n:], v2[b, :, n:] = 1e4, float("nan")  # past the length: ignored
        assert torch.equal(fewrow.decode_attention(q, k2, v2, lengths, threads), got)


def test_decode_attention_usable_only_where_it_applies():
    _kernel()
    q, kv = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 8, 16)
    assert fewrow.attention_usable(q, kv, kv)
    assert not fewrow.attention_usable(torch.randn(2, 4, 2, 16), kv, kv)  # two queries
    assert not fewrow.attention_usable(q[..., :8], kv[..., :8], kv[..., :8])  # head size 8
    assert not fewrow.attention_usable(q, kv[:, :, :4], kv[:, :, :4])  # a non-contiguous slice
    assert not fewrow.attention_usable(q.bfloat16(), kv.bfloat16(), kv.bfloat16())
