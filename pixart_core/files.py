"""Reading weight files safely, and telling users what a file looks like when it is not what they chose."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import mmap
import os
import pickle
import platform
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pth", ".pt", ".ckpt", ".bin")


class WeightFileError(ValueError):
    """A weight file that cannot be used: the message names the file, what is wrong and what to do."""


def check_file(path: str | os.PathLike) -> Path:
    """The path, if it names a non-empty file this process can read; else a WeightFileError saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: file not found. It may have been moved or deleted; refresh the node list.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError as e:
        raise WeightFileError(
            f"{path}: permission denied. The user running ComfyUI cannot read this file: fix its permissions "
            f"(e.g. chmod a+r on it) or its owner."
        ) from e
    except OSError as e:
        raise WeightFileError(f"{path}: cannot read the file ({e.strerror or e}). Check the disk, or copy the file again.") from e
    if path.stat().st_size == 0:
        raise WeightFileError(f"{path.name}: the file is empty (0 bytes). Download it again.")
    return path


def component_folder(path: Path, subfolder: str, what: str) -> Path:
    """The folder holding a model's config.json: a diffusers pipeline's `subfolder`/ (transformer, vae,
    text_encoder), else the folder itself (a bare component or a transformers model folder)."""
    for p in (path / subfolder, path):
        if (p / "config.json").is_file():
            return p
    raise WeightFileError(f"{path}: no config.json here or in {subfolder}/; not a {what} folder.")


def check_folder(folder: Path) -> None:
    """check_file on every config and weight file in a model folder (before any library reads one)."""
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in (".json", *SAFETENSORS_EXT, *PICKLE_EXT) and (f.is_file() or f.is_symlink()):
            check_file(f)


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or (weights-only) .pth/.ckpt/.bin file, on the CPU, or only those named in
    `keys` (names the file lacks are left out); with `dtype`, floating tensors converted to it (integer tensors
    kept as they are). A safetensors file's other tensors are never read."""
    path = check_file(path)
    wanted = None if keys is None else set(keys)
    if path.suffix.lower() in SAFETENSORS_EXT:
        header, start = _check_safetensors_header(path)
        if wanted is not None:
            header = {k: v for k, v in header.items() if k in wanted}
        if dtype is not None and _needs_conversion(header, dtype):
            return _read_safetensors_as(path, header, start, dtype)
        sd = _read_safetensors(path, wanted)
    elif path.suffix.lower() in PICKLE_EXT:
        sd = _read_pickle(path)
        if wanted is not None:
            sd = {k: v for k, v in sd.items() if k in wanted}
    else:
        raise WeightFileError(f"{path.name}: unsupported file type {path.suffix!r}; use .safetensors (or .pth/.ckpt).")
    if dtype is not None:
        for k in list(sd):  # tensor by tensor, freeing each source as it is replaced
            if sd[k].is_floating_point():
                sd[k] = sd[k].to(dtype)
    return sd


# safetensors' dtype names -> torch dtypes (the ones weight files use)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _needs_conversion(header: dict, dtype: torch.dtype) -> bool:
    return any(_ST_DTYPES.get(v["dtype"], dtype).is_floating_point and _ST_DTYPES.get(v["dtype"]) != dtype
               for k, v in header.items() if k != "__metadata__")


def _read_safetensors_as(path: Path, header: dict, start: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A safetensors file read one tensor at a time, each floating tensor converted to `dtype` as it is read: peak
    memory is the converted model plus the tensors being converted. `header` and `start` (where the tensor data
    begins) come from _check_safetensors_header.

    The file is memory-mapped and each tensor converted straight from the map (no copy through a read buffer);
    its source pages leave the process's mapping once converted, so the file is never counted in the process's
    memory beside the converted model. Where the platform cannot drop mapped pages, plain reads do the same."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    for name, info in items:
        if info["dtype"] not in _ST_DTYPES:
            raise WeightFileError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which this loader does not read.")
    if not _DROPS_MAPPED_PAGES:
        return _read_plain_as(path, items, start, dtype)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and writable: torch.frombuffer takes it
    try:
        with _one_thread_per_op(), ThreadPoolExecutor(_CONVERT_WORKERS) as pool:
            tensors = list(pool.map(lambda item: _convert_mapped(m, start, item[1], dtype), items))
    finally:
        try:
            m.close()
        except BufferError:  # a view still alive (none should be): the map goes when it does
            pass
    return {name: t for (name, _), t in zip(items, tensors)}


_DROPS_MAPPED_PAGES = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # not on Windows
# Conversions in flight: one per core, each on one thread (a torch op split over threads waits at its end for the
# slowest thread, which costs most where other processes share the cores; whole tensors per thread do not wait).
_CONVERT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def _convert_mapped(m: mmap.mmap, start: int, info: dict, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a mapped safetensors file, converted to `dtype` when floating (else copied), its source
    pages then dropped from the mapping (the page cache keeps them)."""
    src = _ST_DTYPES[info["dtype"]]
    begin, end = start + info["data_offsets"][0], start + info["data_offsets"][1]
    target = dtype if src.is_floating_point else src
    if end == begin:
        return torch.empty(info["shape"], dtype=target)
    view = torch.frombuffer(m, dtype=src, count=(end - begin) // src.itemsize, offset=begin).reshape(info["shape"])
    t = _new_tensor(info["shape"], target)
    t.copy_(view)  # converted as .to() converts
    del view
    first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:  # whole pages only: a page shared with a neighbour goes with the map
        m.madvise(mmap.MADV_DONTNEED, first, last - first)
    return t


# Linux's MADV_POPULATE_WRITE (kernel 5.14+; 23 in the generic madvise numbering these machines use) faults a range
# in with one call. New memory is most of a converting read's cost (each first write of a page faults): faulted in
# at once, the bench's DiT and T5 reads take ~20% less CPU. Elsewhere, or on older kernels, the copy faults it in.
_POPULATE_WRITE = 23
_PREFAULT_MIN = 1 << 20  # smaller tensors: not worth a system call


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise where MADV_POPULATE_WRITE has the generic number, else None."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64", "ppc64le", "riscv64",
                                                                         "s390x"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _new_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor whose whole pages are already in memory (one system call, not one fault per page)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if nbytes >= _PREFAULT_MIN else None
    if madvise is not None:
        first = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (t.data_ptr() + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            madvise(first, last - first, _POPULATE_WRITE)  # fails harmlessly (EINVAL) on kernels without it
    return t


@contextlib.contextmanager
def _one_thread_per_op() -> Iterator[None]:
    """torch ops started meanwhile (also from new threads) run on one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_plain_as(path: Path, items: list, start: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """_read_safetensors_as with plain reads into a buffer per tensor (where mapped pages cannot be dropped)."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, info in items:
            src = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise WeightFileError(f"{path.name}: the file is truncated (tensor {name}). Download it again.")
            t = (torch.frombuffer(buf, dtype=src) if buf else torch.empty(0, dtype=src)).reshape(info["shape"])
            out[name] = t.to(dtype) if src.is_floating_point and src != dtype else t
    return out


def _read_safetensors(path: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:  # the header was checked (read_state_dict)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightFileError(
            f"{path.name}: cannot read this safetensors file ({e}). It is probably truncated or corrupt: download it again."
        ) from e


def _check_safetensors_header(path: Path) -> tuple[dict, int]:
    """Check that the header parses and the data the header promises is in the file (a truncated download fails
    here); returns the header and the offset where the tensor data begins."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightFileError(
            f"{path.name}: not a valid safetensors file ({e}). It is truncated, corrupt, or not a safetensors file: download it again."
        ) from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightFileError(
            f"{path.name}: the file is truncated ({size} bytes, its header needs {8 + n + end}). Download it again."
        )
    return header, 8 + n


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, from its header only (no tensor data is read)."""
    from safetensors import safe_open

    path = check_file(path)
    if path.suffix.lower() not in SAFETENSORS_EXT:
        raise WeightFileError(f"{path.name}: expected a .safetensors file.")
    _check_safetensors_header(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_EXT:
        return {}
    from safetensors import safe_open

    check_file(path)
    _check_safetensors_header(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            f"{path.name}: refused to load. This pickle file contains code or objects other than tensors, "
            f"and running it could harm your computer; it was not executed. Use a .safetensors version of the model. ({e})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightFileError(f"{path.name}: cannot read this file ({e}). It is probably truncated or corrupt.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{path.name}: this file holds no state dict of tensors.")
    return obj


def describe(keys: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """What kind of model a state dict's keys look like, in words a user recognizes."""
    keys = list(keys)
    shapes = shapes or {}

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if not keys:
        return "an empty file with no tensors"
    if has("conditioner.embedders") or has("label_emb.0.0"):
        return "a Stable Diffusion XL checkpoint (UNet)"
    if has("input_blocks.0.0.weight") or has("down_blocks.0.attentions.0.transformer_blocks"):
        return "a Stable Diffusion (SD1.x/SD2/SDXL) UNet checkpoint"
    if has("double_blocks.") or has("single_transformer_blocks."):
        return "a Flux transformer"
    if has("joint_blocks.") or has("context_embedder") and has("x_embedder"):
        return "a Stable Diffusion 3 (MMDiT) transformer"
    if has("blocks.0.attn.qkv") and has("y_embedder"):
        return "a PixArt transformer in the original key layout"
    if has("transformer_blocks.0.attn1.to_q") and has("caption_projection"):
        return "a PixArt transformer in the diffusers layout"
    if has("text_model.encoder.layers") or has("text_projection"):
        return "a CLIP text encoder"
    if has("SelfAttention.relative_attention_bias") or has("block.0.layer.0.SelfAttention"):
        vocab = next((s[0] for k, s in shapes.items() if k.endswith(("shared.weight", "embed_tokens.weight"))), None)
        if vocab == 256384:
            return "a umT5 text encoder (256384-token vocabulary; PixArt needs T5-v1.1-XXL with 32128 tokens)"
        return "a T5 text encoder"
    if (has("encoder.down.0.block") or has("encoder.down_blocks.0.resnets")) and has("decoder."):
        return "a VAE (autoencoder)"
    if has("first_stage_model.") and has("model.diffusion_model."):
        return "a Stable Diffusion checkpoint"
    return f"an unknown model (first keys: {', '.join(sorted(keys)[:3])})"


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def strip_prefix(sd: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Drop whatever prefix ('model.diffusion_model.', 'text_encoders.t5xxl.transformer.', ...) stands before `anchor` keys."""
    hit = next((k for k in sd if k.endswith(anchor)), None)
    if hit is None:
        return sd
    prefix = hit[: len(hit) - len(anchor)]
    if not prefix:
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def check_keys(
    path_name: str, got: Iterable[str], expected: Iterable[str], what: str
) -> None:
    """Fail naming missing and unexpected keys; never load with strict=False silently."""
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise WeightFileError(f"{path_name}: the weights do not match {what}: {'; '.join(parts)}.")


def check_shapes(path_name: str, got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Fail naming the first tensor whose shape differs (shapes, not tensors: headers suffice)."""
    bad = [(k, tuple(got[k]), s) for k, s in expected.items() if k in got and tuple(got[k]) != tuple(s)]
    if bad:
        k, got, want = bad[0]
        raise WeightFileError(
            f"{path_name}: {len(bad)} tensor shape(s) do not match {what}, e.g. {k} is {list(got)}, expected {list(want)}."
        )
