"""The CPU decode kernels of ``fewrow.cpp``, built with the host's C++ compiler on first use.

``linear_into(x2, weight, y, o0, o1, threads)`` writes ``y[:, o0:o1] = x2 @ weight[o0:o1].T`` for
1 to ``MAX_ROWS`` fp32 rows, with the GIL released (ctypes does that), split over ``threads``
OpenMP threads: torch's own, since the library links the libgomp that torch has loaded (a Python
thread pool's dispatch costs ~300 us here, more than the product of a 6.5 MB weight).
``decode_attention`` is the one-query attention of a decode step over the KV cache, in one pass
per head. ``language.decoder`` uses both inside ``decode_threads``; nothing else in dsocr does.

Gotchas:
- It needs a C++ compiler with OpenMP (``$CXX``, else ``c++``/``g++``/``clang++``, with
  ``-fopenmp``). Without one, or when the build fails, ``available()`` is False and the decoder
  keeps torch's kernels; the reason is logged once at INFO and kept in ``status()``.
- The library is built with ``-march=native`` into ``$DSOCR_CACHE/kernels`` (default
  ``$XDG_CACHE_HOME/dsocr`` or ``~/.cache/dsocr``) under a name hashed from the source, the
  compiler command and this CPU's flags, so a cache shared between machines never loads a
  library built for another CPU (where that folder cannot be written: the temporary folder). It
  is written to a temporary file and renamed.
- ``DSOCR_FEWROW=0`` turns it off.
- Like torch's own OpenMP kernels, it hangs in a child forked after the parent used OpenMP
  (libgomp's threads do not survive fork): use spawned processes, as dsocr does.
- Sums run in another order than MKL's or oneDNN's: results match them to float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 8
SOURCE = Path(__file__).with_name("fewrow.cpp")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-fopenmp"]

_lock = threading.Lock()
_fn = None  # the ctypes function, once loaded
_attn = None  # dsocr_decode_attention
_status: str | None = None  # None: not tried yet; "ok" or the reason it is off


def cache_dir() -> Path:
    root = os.environ.get("DSOCR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsocr"
    )
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str) -> Path:
    """Compile (or find in the cache) the shared library; returns its path."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, cxx.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    name = f"fewrow-{platform.machine()}-{key}.so"
    out = cache_dir() / name
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(out.parent)
    except OSError:  # a read-only home: build into the temporary folder instead
        out = Path(tempfile.gettempdir()) / f"dsocr-kernels-{os.getuid()}" / name
        out.parent.mkdir(mode=0o700, exist_ok=True)
        st = out.parent.stat()  # a shared folder: load nothing another user could have put there
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise PermissionError(f"{out.parent} is not this user's alone") from None
        if out.exists():
            return out
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run(
            [cxx, *FLAGS, str(SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        last = ((e.stderr or "").strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{cxx} failed: {last}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> bool:
    """Build and load the kernel once per process; True when it is usable."""
    global _fn, _attn, _status
    if _status is not None:
        return _fn is not None
    with _lock:
        if _status is not None:
            return _fn is not None
        reason = None
        if os.environ.get("DSOCR_FEWROW", "1") == "0":
            reason = "off (DSOCR_FEWROW=0)"
        elif (cxx := _compiler()) is None:
            reason = "off: no C++ compiler found ($CXX, c++, g++, clang++)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cxx)))
                fn = lib.dsocr_fewrow
                fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
                fn.argtypes += [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
                fn.argtypes += [ctypes.c_int]
                fn.restype = ctypes.c_int
                attn = lib.dsocr_decode_attention
                attn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 4
                attn.argtypes += [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
                attn.restype = ctypes.c_int
                if lib.dsocr_fewrow_threaded():
                    _fn, _attn = fn, attn
                else:
                    reason = "off: built without OpenMP (it would run on one thread)"
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                reason = f"off: build failed ({e})"
        _status = reason or "ok"
        if reason:
            log.info("fewrow kernel %s; decode uses torch's kernels", reason)
    return _fn is not None


def available() -> bool:
    return load()


def status() -> str:
    """ "ok", or why the kernel is off (builds it first if not yet tried)."""
    load()
    return _status or "not tried"


def usable(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether ``linear_into`` takes this product: 1..MAX_ROWS rows, fp32 CPU tensors, a
    contiguous weight, and a loaded kernel."""
    return (
        1 <= rows <= MAX_ROWS
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and load()
    )


def linear_into(
    x2: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, o0: int, o1: int, threads: int = 1
):
    """``y[:, o0:o1] = x2 @ weight[o0:o1].T`` on up to ``threads`` OpenMP threads (torch's); x2
    (R, K) and y (R, O) contiguous fp32, weight (O, K) contiguous fp32 (see ``usable``)."""
    if _fn is None and not load():
        raise RuntimeError(f"fewrow kernel {status()}")
    R, K = x2.shape
    rc = _fn(x2.data_ptr(), R, K, weight.data_ptr(), o0, o1, y.data_ptr(), y.shape[1], threads)
    if rc:
        raise ValueError(f"fewrow: {R} rows is outside 1..{MAX_ROWS}")


def attention_usable(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes these: fp32 CPU, one query, contiguous (B, H, S_max, D)
    buffers, D a multiple of 16 up to 256, and a loaded kernel."""
    D = q.shape[-1]
    return (
        q.dim() == 4
        and q.shape[2] == 1
        and q.dtype == k_buf.dtype == v_buf.dtype == torch.float32
        and q.device.type == "cpu"
        and k_buf.is_contiguous()
        and v_buf.is_contiguous()
        and k_buf.shape == v_buf.shape
        and D % 16 == 0
        and D <= 256
        and load()
    )


def decode_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, lengths: torch.Tensor, threads: int
) -> torch.Tensor:
    """Single-query attention over cached keys: q (B, H, 1, D); k_buf, v_buf (B, H, S_max, D);
    row b attends to its first ``lengths[b]`` slots (the engine's causal mask at one query).
    Returns (B, H, 1, D). One pass over the cache per head, on ``threads`` OpenMP threads: about
    2x torch's sdpa at 1,100 keys here (see ``attention_usable`` for what it takes)."""
    B, H, _, D = q.shape
    q = q.contiguous()
    lengths = lengths.to(torch.long).contiguous()
    out = torch.empty_like(q)
    rc = _attn(
        q.data_ptr(),
        k_buf.data_ptr(),
        v_buf.data_ptr(),
        lengths.data_ptr(),
        B,
        H,
        D,
        k_buf.shape[2],
        D**-0.5,
        out.data_ptr(),
        threads,
    )
    if rc:
        raise ValueError(f"decode_attention: head size {D} is not a multiple of 16 up to 256")
    return out
