"""A quantize-once cache entry in the previous format (format 1: its key named the mode by the loader's label,
"8-bit (bitsandbytes)") is rebuilt by the current code, never read.

The old entry is written here the way the previous code wrote it (its folder name, its manifest, transformers'
serialization of a quantized T5), with the previous code's key written out by hand. It holds another T5's weights,
so that reading it would show in the embeddings; a control run with a key in the current form (also written out
here) shows that the entry is otherwise complete and readable, so the rebuild is due to the format alone.
Expected embeddings come from transformers' own bitsandbytes load of the source folder.
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


def _write_old_entry(cache: Path, source: Path, folder_mode: str, model, key: dict) -> Path:
    """An entry as the previous code laid it out: <name>-<mode>-<dtype>-<sha256(path)[:12]>/ with config.json,
    model.safetensors and manifest.json (written last) holding `key` and each file's size, mtime and sha256."""
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
    _write_old_entry(control, source, folder_mode, _quantized(other, label), _key(source, 2, mode))
    misread = ct5.load_t5(source, mode, torch.float32, cache_dir=control)
    assert misread.cache.hit and torch.equal(_embeds(misread.model, tok), foreign)

    cache = tmp_path / "cache"
    entry = _write_old_entry(cache, source, folder_mode, _quantized(other, label), _key(source, 1, label))
    loaded = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert not loaded.cache.hit and loaded.cache.written and loaded.cache.entry == entry
    assert "format" in loaded.cache.reason and "quantization" in loaded.cache.reason, loaded.cache.reason
    assert torch.equal(_embeds(loaded.model, tok), want)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert (manifest["key"]["format"], manifest["key"]["quantization"]) == (2, folder_mode)
    again = ct5.load_t5(source, mode, torch.float32, cache_dir=cache)
    assert again.cache.hit and torch.equal(_embeds(again.model, tok), want)
