"""Checkpoint folders in the official Hugging Face layout: strict loading and atomic saving.

A folder holds ``config.json`` plus either ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` (its ``weight_map``), and
optionally ``tokenizer.json`` and a dsocr ``meta.json``. Key names are the official ones (spec §8),
so no mapping table is needed: the model's own ``state_dict`` names are the checkpoint's.

Loading builds the model on the meta device and assigns the (memory-mapped) tensors, so a 3.3B
checkpoint costs no init time and no second copy. Loading is strict: every missing, unknown,
mis-shaped or non-float tensor is reported by name. The one allowed difference is CLIP's unused
``patch_embedding``, which may be absent from a checkpoint (it is then zero-filled). config.json is
checked when read (``configs.config_from_json``), and an index may name only files inside the
folder. Every problem is a one-line ``CheckpointError`` naming the file and the reason.

Gotcha: safetensors cannot store tensors that share memory; we save contiguous clones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsocr.configs import (
    CheckpointError,
    DeepseekOCRConfig,
    config_to_json,
    load_config,
    read_json,
)
from dsocr.fileio import atomic_write_json, atomic_write_with
from dsocr.model import DeepseekOCRForCausalLM, build_model

OPTIONAL_KEYS = ("model.vision_model.embeddings.patch_embedding.weight",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


__all__ = [
    "CheckpointError",  # defined in dsocr.configs (config.json is read there), raised here too
    "check_state_dict",
    "checkpoint_files",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
]


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def _read_index(path: Path) -> list[str]:
    """The shard file names of an index (its ``weight_map`` values), checked: a JSON object
    whose ``weight_map`` maps tensor names to plain file names inside the folder."""
    index = read_json(path, lambda e: f"unreadable index ({e})")
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f'{path}: unreadable index (no "weight_map" object)')
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{path}: "weight_map" must be a non-empty object of name: file')
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: weight_map[{key!r}] is not a file name: {name!r}")
        # Shards live in the folder itself: no sub-folders, no "..", no absolute paths.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(
                f"{path}: weight_map[{key!r}] = {name!r} points outside the checkpoint folder"
            )
        names.add(name)
    return sorted(names)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when sharded."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_dir():
        raise CheckpointError(f"{index}: is a folder, not a file")
    if index.exists():
        files = [folder / f for f in _read_index(index)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: index names missing shard(s) {', '.join(missing)}")
        folders = [f.name for f in files if not f.is_file()]
        if folders:
            raise CheckpointError(f"{folder}: shard(s) {', '.join(folders)} are not files")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    if single.exists():
        raise CheckpointError(f"{single}: is a folder, not a safetensors file")
    found = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if found:
        return [folder / f for f in found]
    raise CheckpointError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")


def read_state_dict(folder: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (memory-mapped on CPU); duplicate names are an error."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(Path(folder)):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    if k in out:
                        raise CheckpointError(f"{folder}: tensor {k!r} appears in two shards")
                    out[k] = sf.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f}: {_unreadable_reason(f, e)}") from None
    return out


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why safetensors could not read ``path``: "truncated" with the byte counts when the file is
    shorter than its header says (an interrupted download or copy), else safetensors' reason."""
    reason = f"not a readable safetensors file ({error})"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")  # the header's length
            if size < 8:
                return f"too short to be a safetensors file ({size} bytes)"
            if n > 100_000_000:  # not a header length: not safetensors at all
                return reason
            if 8 + n > size:
                return f"truncated: {size:,} bytes, but its header alone needs {8 + n:,}"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        need = 8 + n + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return reason
    if need > size:
        return (
            f"truncated: {size:,} bytes of the {need:,} its header describes "
            "(an interrupted download or copy?)"
        )
    return reason


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected, mis-shaped or non-float tensor.

    Every tensor of the model is a float weight; an integer or boolean tensor of the right shape
    would be cast to float silently and give garbage, so it is refused by name.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd and k not in OPTIONAL_KEYS]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    dtypes = [
        f"{k}: {str(sd[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in sd and not sd[k].is_floating_point()
    ]
    problems = []
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", shapes),
        ("non-float", dtypes),
    ):
        if items:
            shown = "; ".join(items[:5]) + (
                f"; ... ({len(items)} in all)" if len(items) > 5 else ""
            )
            problems.append(f"{title} tensor(s): {shown}")
    if problems:
        raise CheckpointError(
            f"{where}: checkpoint does not match the model: " + " | ".join(problems)
        )


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a model runs in unless told: bfloat16 on a CUDA GPU with native bf16 (compute
    capability 8.0 and up, as the official inference), float32 everywhere else: this project's
    CPUs have no bf16 units (a bf16 matmul is about 100x slower than fp32), and on older GPUs
    (T4, V100) bf16 is emulated and float16 can overflow the decoder's activations."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return torch.float32
    if torch.version.hip:  # ROCm: capability numbers mean something else
        return torch.bfloat16 if torch.cuda.is_bf16_supported(False) else torch.float32
    native = torch.cuda.get_device_capability(dev) >= (8, 0)
    return torch.bfloat16 if native else torch.float32


def load_checkpoint(
    source: str | Path | DeepseekOCRConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DeepseekOCRForCausalLM:
    """A model from a checkpoint folder (strict), or random weights for a config / variant name.

    ``dtype=None``: :func:`default_dtype` (float32 on CPU, bfloat16 on GPUs that have it).
    """
    if dtype is None:
        dtype = default_dtype(device)
    if isinstance(source, DeepseekOCRConfig):
        return build_model(source, device=device, dtype=dtype).eval()
    folder = Path(source)
    if not folder.exists():
        from dsocr.configs import CONFIGS

        if str(source) in CONFIGS:
            return build_model(CONFIGS[str(source)], device=device, dtype=dtype).eval()
        raise FileNotFoundError(f"{source}: no such checkpoint folder or variant name")
    cfg = load_config(folder)  # checked: a bad config.json is a CheckpointError naming the key
    model = build_model(cfg, device="meta")
    sd = read_state_dict(folder)
    check_state_dict(model, sd, str(folder))
    for k in OPTIONAL_KEYS:
        if k not in sd:
            sd[k] = torch.zeros(model.state_dict()[k].shape)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    model: DeepseekOCRForCausalLM,
    folder: str | Path,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    meta: dict | None = None,
) -> Path:
    """Write ``model`` to ``folder`` in the official layout; shards when over ``max_shard_bytes``.

    Every file is written atomically. ``tokenizer`` (a ``dsocr.language.tokenizer.Tokenizer``) and
    ``meta`` (a JSON-able dict) are saved beside the weights when given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().to(dtype or v.dtype).contiguous().cpu().clone()
        for k, v in model.state_dict().items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    fmt = {"format": "pt"}
    stale = [*folder.glob("model*.safetensors"), folder / INDEX_FILE]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        atomic_write_with(folder / name, lambda t, s=shard: save_file(s, t, metadata=fmt))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        atomic_write_json(
            folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    for p in stale:
        if p.name not in names and p.name != (INDEX_FILE if len(shards) > 1 else None):
            p.unlink(missing_ok=True)
    atomic_write_json(folder / "config.json", config_to_json(model.config))
    if tokenizer is not None:
        tokenizer.save(folder)
    if meta is not None:
        atomic_write_json(folder / "meta.json", meta)
    return folder
