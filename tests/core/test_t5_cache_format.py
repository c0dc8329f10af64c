"""A quantize-once cache entry made for another key is rebuilt by the current code, never read: an entry in the
previous format (format 1: its key named the mode by the loader's label, "8-bit (bitsandbytes)"), and an entry
whose key differs from the current one in any single field (format, source path, a source file's size or mtime,
mode, compute dtype, bitsandbytes' or transformers' version).

The entries are written here the way the code writes them (the folder name, the manifest, transformers'
serialization of a quantized T5), with the keys written out by hand. They hold another T5's weights, so that
reading one would show in the embeddings; a control run with the current key shows that such an entry is
otherwise complete and readable, so a rebuild is due to the key alone. Expected weights and embeddings come from
transformers' own bitsandbytes load of the source folder.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from harness import models as tiny
from pixart_core import t5 as ct5
from pixart_core import t5_spec

PROMPT = "a lighthouse on a cliff above a stormy sea"
# (mode id, the loader label format 1 keys held, the folder-name part both formats use)
MODES = [(t5_spec.QUANT_8BIT, "8-bit (bitsandbytes)", "8bit"), (t5_spec.QUANT_NF4, "4-bit nf4 (bitsandbytes)", "nf4")]


def _bnb(label: str):
    from transformers import BitsAndBytesConfig

    if label.startswith("8-bit"):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=False)


def _quantized(folder: Path, label: str):
    """transformers' quantized load of a T5 folder, on the CPU."""
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(folder), dtype=torch.float32, quantization_config=_bnb(label),
                                          device_map={"": "cpu"}).eval()


def _embeds(model, tok) -> torch.Tensor:
    ids = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).last_hidden_state.float()


def _record(path: Path) -> dict:
    s = path.stat()
    return {"size": s.st_size, "mtime_ns": s.st_mtime_ns, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _write_entry(cache: Path, source: Path, folder_mode: str, model, key: dict) -> Path:
    """An entry as the code lays it out (format 1 did too): <name>-<mode>-<dtype>-<sha256(path)[:12]>/ with
    config.json, model.safetensors and manifest.json (written last) holding `key` and each file's size, mtime and
    sha256."""
    resolved = str(source.resolve())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved).name)[:60]
    entry = cache / f"{stem}-{folder_mode}-float32-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
    model.save_pretrained(str(entry))
    records = {name: _record(entry / name) for name in ("model.safetensors", "config.json")}
    (entry / "manifest.json").write_text(json.dumps({"key": key, "files": records, "quantized_on": "cpu",
                                                     "created": "2026-12-01T00:00:00Z"}))
    return entry


def _key(source: Path, fmt: int, mode: str) -> dict:
    """The key of a cache entry as the code of format `fmt` writes it: the resolved source, every file of its
    folder (name, size, mtime), the mode, the compute dtype and the library versions."""
    files = sorted(f for f in source.iterdir() if f.suffix in (".json", ".safetensors"))
    stats = [{"name": f.name, "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    return {"format": fmt, "source": str(source.resolve()), "files": stats, "quantization": mode, "dtype": "float32",
            "bitsandbytes": version("bitsandbytes"), "transformers": version("transformers")}


@pytest.mark.parametrize("mode,label,folder_mode", MODES, ids=["8bit", "nf4"])
def test_an_entry_of_the_previous_format_is_rebuilt_never_read(tmp_path, tokenizer, mode, label, folder_mode):
    tok = tokenizer
    source, other = tmp_path / "t5", tmp_path / "other"
    tiny.make_t5(seed=0).half().save_pretrained(source, safe_serialization=True)
    tiny.make_t5(seed=1).half().save_pretrained(other, safe_serialization=True)
    want, foreign = _embeds(_quantized(source, label), tok), _embeds(_quantized(other, label), tok)
    assert not torch.equal(want, foreign)

    # control: the same entry under a key in the current form is read (and is the other T5's, on purpose)
    control = tmp_path / "control"
    _write_entry(control, source, folder_mode, _quantized(other, label), _key(source, 2, mode))
    misread = ct5.load_t5(source, mode, torch.float32, cache_dir=control)
    assert misread.cache.hit and torch.equal(_embeds(misread.model, tok), foreign)

    cache = tmp_path / "cache"
    entry = _write_entry(cache, source, folder_mode, _quantized(other, label), _key(source, 1, label))
    loaded = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert not loaded.cache.hit and loaded.cache.written and loaded.cache.entry == entry
    assert "format" in loaded.cache.reason and "quantization" in loaded.cache.reason, loaded.cache.reason
    assert torch.equal(_embeds(loaded.model, tok), want)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert (manifest["key"]["format"], manifest["key"]["quantization"]) == (2, folder_mode)
    again = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert again.cache.hit and torch.equal(_embeds(again.model, tok), want)


def _other_files(key: dict, change: dict) -> dict:
    """The key with the first source file's record changed (its size or mtime)."""
    return {**key, "files": [{**key["files"][0], **change}, *key["files"][1:]]}


# One field of the current key changed, as an entry made before that change holds it; the field check() names.
FIELDS = {
    "format": (lambda key, mode: {**key, "format": 1}, "format"),
    "source path": (lambda key, mode: {**key, "source": key["source"] + "_moved"}, "source"),
    "source size": (lambda key, mode: _other_files(key, {"size": key["files"][0]["size"] + 8}), "files"),
    "source mtime": (lambda key, mode: _other_files(key, {"mtime_ns": key["files"][0]["mtime_ns"] - 10**9}), "files"),
    "mode": (lambda key, mode: {**key, "quantization": next(m for m, _, _ in MODES if m != mode)}, "quantization"),
    "dtype": (lambda key, mode: {**key, "dtype": "bfloat16"}, "dtype"),
    "bitsandbytes": (lambda key, mode: {**key, "bitsandbytes": "0.0.1"}, "bitsandbytes"),
    "transformers": (lambda key, mode: {**key, "transformers": "4.0.0"}, "transformers"),
}


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("mode,label,folder_mode", MODES, ids=["8bit", "nf4"])
def test_an_entry_made_for_another_key_field_is_rebuilt_never_read(tmp_path, tokenizer, mode, label, folder_mode,
                                                                   field):
    source, other = tmp_path / "t5", tmp_path / "other"
    tiny.make_t5(seed=0).half().save_pretrained(source, safe_serialization=True)
    tiny.make_t5(seed=1).half().save_pretrained(other, safe_serialization=True)
    fresh = _quantized(source, label)
    want_state = {k: v.clone() for k, v in fresh.state_dict().items()}  # before any forward (nf4 repacks then)
    want = _embeds(fresh, tokenizer)
    changed, named = FIELDS[field]
    key = _key(source, 2, mode)
    stale = changed(key, mode)
    assert [k for k in key if key[k] != stale[k]] == [named]
    cache = tmp_path / "cache"
    entry = _write_entry(cache, source, folder_mode, _quantized(other, label), stale)
    loaded = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert not loaded.cache.hit and loaded.cache.written and loaded.cache.entry == entry
    assert loaded.cache.reason == f"made for another source or setting (differs in: {named})"
    got_state = loaded.model.state_dict()
    assert set(got_state) == set(want_state)
    for k, v in want_state.items():
        assert got_state[k].dtype == v.dtype and torch.equal(got_state[k], v), k
    assert torch.equal(_embeds(loaded.model, tokenizer), want)
    assert json.loads((entry / "manifest.json").read_text())["key"] == key
    again = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert again.cache.hit and torch.equal(_embeds(again.model, tokenizer), want)
