"""Quantize once: the on-disk store of bitsandbytes-quantized T5 encoders (entries, their keys, writing, checking).

Re-quantizing T5-XXL from its 9.5 GB file takes minutes on a CPU at every load. The first 8-bit/nf4 load writes
the quantized weights in bitsandbytes' own serialization (the state dict transformers saves and loads for a
pre-quantized model: int8 matrix + `SCB` scales for 8-bit, packed nf4 + `absmax`/`quant_map`/quant state for 4-bit)
as one safetensors file with the model's config.json (its `quantization_config` included); later loads are
transformers' pre-quantized load of that folder, which memory-maps the file. When to read, quantize and write an
entry is pixart_core.t5's decision (load_t5); this module only keeps the entries.

One entry (a folder) per source x mode x compute dtype; `manifest.json` holds the key the entry was made for
(source path, size and mtime of every source file, mode, dtype, bitsandbytes / transformers / format versions)
and each cache file's size, mtime and sha256. The manifest is written last and the entry is built in a temporary
folder renamed into place, so a crash leaves no entry that looks complete. An entry whose manifest is missing,
unreadable or made for another key (stale source, another file, another mode or version, an older format), or
whose files differ in size or mtime from the manifest or do not parse as complete safetensors files, is rebuilt,
never loaded. (`verify="full"` also re-hashes every byte; the default checks sizes, mtimes and headers, which costs
nothing.)

This module never imports ComfyUI: the caller passes the cache folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from pathlib import Path

import torch

from . import files, t5_spec
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

# Bump when what an entry holds or how its key reads changes. 2: the key names the mode by its id ("8bit", "nf4");
# format 1 keys held the loader's label ("8-bit (bitsandbytes)").
FORMAT = 2
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_LEFTOVER_AGE_S = 3600  # temporary folders of a crashed writer older than this are removed by the next writer


class CacheError(RuntimeError):
    """A cache entry that cannot be used (the message says why); callers rebuild it."""


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"bitsandbytes": version("bitsandbytes"), "transformers": version("transformers")}


def source_files(path: Path) -> list[Path]:
    """The files a T5 is read from: the file itself, or a folder's config and weight files."""
    if path.is_file():
        return [path]
    return sorted(f for f in t5_spec.weights_folder(path).iterdir()
                  if f.is_file() and f.suffix.lower() in (".json", *files.SAFETENSORS_EXT, *files.PICKLE_EXT))


def cache_key(path: str | os.PathLike, quantization: str, dtype: torch.dtype) -> dict:
    """What a cache entry must have been made from: the source (resolved path, and every file's name, size and
    mtime), the mode (t5_spec.QUANT_8BIT / QUANT_NF4), the compute dtype and the versions of the libraries whose
    format the entry is in."""
    _check_mode(quantization)
    path = Path(path).resolve()
    stats = [{"name": f.name, "size": (s := f.stat()).st_size, "mtime_ns": s.st_mtime_ns} for f in source_files(path)]
    return {"format": FORMAT, "source": str(path), "files": stats, "quantization": quantization,
            "dtype": str(dtype).removeprefix("torch."), **_versions()}


def entry_dir(cache_dir: str | os.PathLike, path: str | os.PathLike, quantization: str, dtype: torch.dtype) -> Path:
    """The entry folder of a source x mode x dtype. A changed source rebuilds the same folder (no stale copies)."""
    _check_mode(quantization)
    resolved = str(Path(path).resolve())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved).name)[:60] or "t5"
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{stem}-{quantization}-{str(dtype).removeprefix('torch.')}-{digest}"


def _check_mode(quantization: str) -> None:
    if quantization not in (t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4):
        raise ValueError(f"the T5 cache holds quantized modes only ({t5_spec.QUANT_8BIT}, {t5_spec.QUANT_NF4}), "
                         f"not {quantization!r}.")


# -------------------------------------------------------------------------------------------------- writing


def tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model's state dict (bitsandbytes' serialization), each storage once (the tied embedding)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file one tensor at a time straight from the tensors' memory (no serialized copy of the
    model, as safetensors' save_file makes); returns its sha256. Tensors are ordered as safetensors orders them
    (wider elements first), so every tensor stays aligned."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_NAMES:
            raise CacheError(f"tensor {k} has dtype {t.dtype}, which safetensors cannot hold")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for k in order:
            t = tensors[k]
            if t.numel() == 0:
                continue
            view = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(view)
            digest.update(view)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _file_record(path: Path, sha256: str | None = None) -> dict:
    s = path.stat()
    return {"size": s.st_size, "mtime_ns": s.st_mtime_ns, "sha256": sha256 or _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _remove_leftovers(entry: Path) -> None:
    """Temporary and replaced folders of this entry that an interrupted writer left (older than an hour)."""
    now = time.time()
    for d in entry.parent.glob(f"{entry.name}.*-*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > _LEFTOVER_AGE_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def write(entry: Path, key: dict, config, tensors: dict[str, torch.Tensor], quantized_on: str) -> None:
    """Make `entry` hold these quantized tensors and config (a transformers config with its quantization_config):
    built in a temporary folder, manifest last, renamed into place; an invalid entry in the way is replaced."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    entry.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(entry.parent).free
    if free < need + (256 << 20):
        raise CacheError(f"not enough free disk space in {entry.parent} ({free / 2**30:.1f} GiB free, "
                         f"{need / 2**30:.1f} GiB needed)")
    _remove_leftovers(entry)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        config.save_pretrained(str(tmp))
        sha = _write_safetensors(tmp / WEIGHTS, tensors)
        records = {WEIGHTS: _file_record(tmp / WEIGHTS, sha), "config.json": _file_record(tmp / "config.json")}
        manifest = {"key": key, "files": records, "quantized_on": quantized_on,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        part = tmp / (MANIFEST + ".part")
        part.write_text(json.dumps(manifest, indent=1))
        os.replace(part, tmp / MANIFEST)
        if entry.exists():  # an invalid entry (the caller checked): move it aside, then remove it
            old = entry.with_name(f"{entry.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if check(entry, key) is not None:  # another process finished the same entry first: keep theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -------------------------------------------------------------------------------------------------- checking


def _safetensors_complete(path: Path) -> str | None:
    """None if the file's header parses and its tensors exactly fill the file, else what is wrong."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                return "header length points past the end of the file"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        return f"not a safetensors file ({e})"
    if 8 + n + end != size:
        return f"{size} bytes where its header describes {8 + n + end}"
    return None


def check(entry: Path, key: dict, verify: str = "quick") -> str | None:
    """None if `entry` is a complete cache entry made for `key`, else why not. `verify="full"` re-hashes the files."""
    if not entry.is_dir():
        return "no entry yet"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        made_for, records = manifest["key"], manifest["files"]
    except FileNotFoundError:
        return "no manifest (an interrupted write)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    if made_for != key:
        diff = sorted(k for k in set(key) | set(made_for) if key.get(k) != made_for.get(k))
        return f"made for another source or setting (differs in: {', '.join(diff)})"
    if set(records) != {WEIGHTS, "config.json"}:
        return f"manifest lists {sorted(records)}"
    for name, rec in records.items():
        f = entry / name
        try:
            s = f.stat()
        except OSError:
            return f"{name} is missing"
        if s.st_size != rec["size"]:
            return f"{name} is {s.st_size} bytes, the manifest says {rec['size']} (truncated or replaced)"
        if s.st_mtime_ns != rec["mtime_ns"]:
            return f"{name} was modified after the entry was written"
        if verify == "full" and _sha256(f) != rec["sha256"]:
            return f"{name} does not match its sha256"
    problem = _safetensors_complete(entry / WEIGHTS)
    return problem and f"{WEIGHTS} is not a complete safetensors file: {problem}"


def quantized_on(entry: Path) -> str | None:
    """The device a complete entry was quantized on (its manifest says), or None."""
    try:
        return json.loads((entry / MANIFEST).read_text()).get("quantized_on")
    except (OSError, ValueError):
        return None


def prefetch(entry: Path) -> None:
    """Ask the OS to read the entry's weights ahead (the load maps the file, and pages of a mapping are otherwise
    read a few at a time as they are first touched: measured 1.8x the time of reading the file from a cold disk)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(entry / WEIGHTS, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
