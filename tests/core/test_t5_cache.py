"""The quantized-T5 cache (quantize once) and per-tensor quantization on the load device.

Expected values come from transformers + bitsandbytes: transformers' own quantized load of the same weights
(T5EncoderModel.from_pretrained with a BitsAndBytesConfig written out here, not the pack's) is the reference for
every cached, rebuilt or per-tensor-quantized model, byte for byte, and for its embeddings; safetensors' own reader
is the reference for the files the cache writes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness import models as tiny
from pixart_core import t5 as ct5
from pixart_core import t5_cache, t5_quantize, t5_spec

CPU = torch.device("cpu")
Q8, NF4 = t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4
PROMPT = "a lighthouse on a cliff above a stormy sea"


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The shared tokenizer (conftest), under this file's short name."""
    return tokenizer


def write_t5(path, seed=0):
    save_file(tiny.t5_single_file_sd(tiny.make_t5(seed=seed)), str(path))
    return path


def forward(model, tok) -> torch.Tensor:
    """transformers' T5 forward of PROMPT: the last hidden state."""
    with torch.no_grad():
        return model(**tok([PROMPT], return_tensors="pt")).last_hidden_state.float()


def embeds(loaded, tok):
    return forward(loaded.model, tok)


def bnb(quant: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for 8-bit, or nf4 computing in `dtype` without double quantization."""
    from transformers import BitsAndBytesConfig

    if quant == Q8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=False)


def _transformers_folder(src: Path) -> Path:
    """The T5 in `src` as a folder transformers loads: a folder as it is (a pipeline's text_encoder/), a single file
    beside it as config.json (the tiny T5's config: harness.models.T5_CONFIG, what made the weights) and
    model.safetensors with the file's tensors, its key prefix dropped and a scaled-fp8 file's weights
    dequantized as ComfyUI does (comfy/ops.py convert_weight: fp8 · scale_weight in float32)."""
    from transformers import T5Config

    if src.is_dir():
        return src / "text_encoder" if (src / "text_encoder").is_dir() else src
    folder = src.with_name(src.name + ".transformers")
    folder.mkdir(exist_ok=True)
    T5Config(**tiny.T5_CONFIG).save_pretrained(folder)
    sd = load_file(str(src))
    prefix = next(k for k in sd if k.endswith("shared.weight"))[: -len("shared.weight")]
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith(".scale_weight"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight")
        out[k[len(prefix):]] = v.to(torch.float32) * scale.to(torch.float32) if scale is not None else v
    save_file(out, str(folder / "model.safetensors"))
    return folder


def transformers_load(src: Path, quant: str, dtype: torch.dtype):
    """transformers' own bitsandbytes load of the T5 in `src`, on the CPU."""
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(_transformers_folder(Path(src))), dtype=dtype,
                                          quantization_config=bnb(quant, dtype), device_map={"": "cpu"}).eval()


def reference(path, quant, dtype, tok):
    """The embeddings of transformers' own quantized load of the source: what every cached load must equal."""
    return forward(transformers_load(path, quant, dtype), tok)


def reference_state(path, quant, dtype) -> dict:
    """The state dict of transformers' own quantized load of the source (before any forward: on CPUs with
    AVX512-BF16, bitsandbytes repacks nf4 weights at the first forward)."""
    return transformers_load(path, quant, dtype).state_dict()


def state(model):
    return model.state_dict()


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_second_load_reads_the_cache_and_equals_transformers_quantized_load(tmp_path, tok, quant, dtype):
    src = write_t5(tmp_path / "t5xxl_fp16.safetensors")
    cache = tmp_path / "cache"
    first = ct5.load_t5(src, quant, dtype, cache_dir=cache)
    assert (first.cache.hit, first.cache.written) == (False, True)
    second = ct5.load_t5(src, quant, dtype, cache_dir=cache)
    assert (second.cache.hit, second.cache.written) == (True, False)
    assert second.cache.entry == first.cache.entry and second.cache.entry.parent == cache
    # bitsandbytes' serialization round-trips: the cached model's quantized tensors are transformers' bytes
    # (before any forward: on CPUs with AVX512-BF16, bitsandbytes repacks nf4 weights at the first forward)
    cached = state(second.model)
    assert_same_tensors(cached, reference_state(src, quant, dtype))
    # the cache file is a plain safetensors file that safetensors' own reader reads as the model's state dict
    with safe_open(str(second.cache.entry / t5_cache.WEIGHTS), framework="pt") as f:
        assert_same_tensors({k: f.get_tensor(k) for k in f.keys()},
                            {k: v for k, v in cached.items() if k != "encoder.embed_tokens.weight"})  # tied: shared
    expected = reference(src, quant, dtype, tok)
    assert torch.equal(embeds(first, tok), expected)
    assert torch.equal(embeds(second, tok), expected)


def test_cached_8bit_layers_keep_one_int8_copy(tmp_path, tok):
    from pixart_core.quant import int8_copies

    src = write_t5(tmp_path / "t5.safetensors")
    ct5.load_t5(src, Q8, torch.float32, cache_dir=tmp_path / "c")
    cached = ct5.load_t5(src, Q8, torch.float32, cache_dir=tmp_path / "c")
    assert cached.cache.hit
    embeds(cached, tok)
    counts = int8_copies(cached.model)
    assert counts and set(counts) == {1}


def _load(src, cache, quant=Q8, dtype=torch.float32):
    return ct5.load_t5(src, quant, dtype, cache_dir=cache)


def _rebuilt(loaded, why: str):
    assert not loaded.cache.hit and loaded.cache.written, loaded.cache
    assert why in loaded.cache.reason, loaded.cache.reason


def test_stale_source_is_rebuilt_never_loaded(tmp_path, tok):
    """The user replaces the T5 file by another one under the same name: the entry made from the old file is not
    read (its embeddings would be the old model's); the new file is quantized and cached in the same entry."""
    src, cache = write_t5(tmp_path / "t5.safetensors", seed=0), tmp_path / "cache"
    old = _load(src, cache)
    old_embeds = embeds(old, tok)
    write_t5(src, seed=1)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    new = _load(src, cache)
    _rebuilt(new, "another source")
    assert new.cache.entry == old.cache.entry  # one entry per source and mode: the stale one is replaced
    expected = reference(src, Q8, torch.float32, tok)
    assert torch.equal(embeds(new, tok), expected) and not torch.equal(expected, old_embeds)
    assert _load(src, cache).cache.hit


def test_touched_source_alone_invalidates(tmp_path):
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    _load(src, cache)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    _rebuilt(_load(src, cache), "files")


def test_resized_source_with_its_old_mtime_is_rebuilt(tmp_path, tok):
    """The source replaced by another T5 of another size whose mtime was kept (copied with its times, a restored
    backup): its size alone tells, and the entry is rebuilt from the new file."""
    src, cache = write_t5(tmp_path / "t5.safetensors", seed=0), tmp_path / "cache"
    _load(src, cache)
    st = src.stat()
    save_file(tiny.t5_single_file_sd(tiny.make_t5(seed=1), torch.float32), str(src))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size != st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    new = _load(src, cache)
    _rebuilt(new, "differs in: files")
    assert_same_tensors(state(new.model), reference_state(src, Q8, torch.float32))
    assert torch.equal(embeds(new, tok), reference(src, Q8, torch.float32, tok))


def test_same_file_at_another_path_is_not_read_from_the_first_ones_entry(tmp_path, tok):
    """Two sources alike in name, size and mtime at different paths: an entry made for one, put where the other's
    belongs, is rebuilt for the other (the resolved path is part of the key), never read."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write_t5(tmp_path / "a" / "t5.safetensors", seed=0), write_t5(tmp_path / "b" / "t5.safetensors", seed=1)
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert (b.stat().st_size, b.stat().st_mtime_ns) == (a.stat().st_size, a.stat().st_mtime_ns)
    cache = tmp_path / "cache"
    made = _load(a, cache).cache.entry
    want = t5_cache.entry_dir(cache, b, Q8, torch.float32)
    shutil.copytree(made, want, copy_function=shutil.copy2)
    loaded = _load(b, cache)
    _rebuilt(loaded, "differs in: source)")
    assert torch.equal(embeds(loaded, tok), reference(b, Q8, torch.float32, tok))


def test_truncated_cache_file_is_rebuilt(tmp_path, tok):
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    entry = _load(src, cache).cache.entry
    weights = entry / t5_cache.WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    again = _load(src, cache)
    _rebuilt(again, "truncated")  # the manifest's size
    assert torch.equal(embeds(again, tok), reference(src, Q8, torch.float32, tok))


def test_garbage_cache_file_is_rebuilt_even_with_the_manifest_size_and_mtime(tmp_path, tok):
    """Random bytes in place of the cache file, with the size and mtime the manifest expects (the cheap checks
    pass): its safetensors header does not parse, so the entry is rebuilt."""
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    entry = _load(src, cache).cache.entry
    weights = entry / t5_cache.WEIGHTS
    st = weights.stat()
    weights.write_bytes(os.urandom(st.st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _load(src, cache)
    _rebuilt(again, "not a complete safetensors file")
    assert torch.equal(embeds(again, tok), reference(src, Q8, torch.float32, tok))


def test_changed_tensor_bytes_are_caught_by_full_verification(tmp_path):
    """Bytes changed inside the tensor data with size and mtime kept: only the sha256 sees it (verify="full");
    the default check (sizes, mtimes, headers) does not read the data."""
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    loaded = _load(src, cache)
    entry, key = loaded.cache.entry, t5_cache.cache_key(src, Q8, torch.float32)
    weights = entry / t5_cache.WEIGHTS
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(st.st_size - 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert t5_cache.check(entry, key) is None
    assert "sha256" in t5_cache.check(entry, key, verify="full")


def test_modified_cache_file_is_rebuilt(tmp_path):
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    weights = _load(src, cache).cache.entry / t5_cache.WEIGHTS
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _rebuilt(_load(src, cache), "modified")


@pytest.mark.parametrize("foreign", ["other file", "other mode", "other dtype", "other bitsandbytes"])
def test_foreign_entry_is_rebuilt_never_loaded(tmp_path, tok, foreign):
    """An entry made for another source file, mode, dtype or bitsandbytes version, placed where this one belongs
    (copied by hand, or a version upgrade), is rebuilt: the loaded model is this source's, in this mode."""
    a, b = write_t5(tmp_path / "a.safetensors", seed=0), write_t5(tmp_path / "b.safetensors", seed=1)
    cache = tmp_path / "cache"
    want = t5_cache.entry_dir(cache, b, Q8, torch.float32)
    if foreign == "other bitsandbytes":
        made = _load(b, cache).cache.entry
        manifest = json.loads((made / t5_cache.MANIFEST).read_text())
        manifest["key"]["bitsandbytes"] = "0.0.1"
        (made / t5_cache.MANIFEST).write_text(json.dumps(manifest))
    else:
        other = {"other file": (a, Q8, torch.float32), "other mode": (b, NF4, torch.float32),
                 "other dtype": (b, Q8, torch.bfloat16)}[foreign]
        made = ct5.load_t5(*other, cache_dir=cache).cache.entry
        assert made != want
        shutil.copytree(made, want, copy_function=shutil.copy2)
    loaded = _load(b, cache)
    _rebuilt(loaded, "another source or setting")
    assert loaded.cache.entry == want
    assert_same_tensors(state(loaded.model), reference_state(b, Q8, torch.float32))
    assert torch.equal(embeds(loaded, tok), reference(b, Q8, torch.float32, tok))


@pytest.mark.parametrize("damage", ["no manifest", "garbage manifest", "no weights", "garbage config"])
def test_incomplete_entry_is_rebuilt(tmp_path, tok, damage):
    """An interrupted write (no manifest: it is written last), a garbage manifest, a missing weights file, or a
    config that transformers cannot read: rebuilt from the source."""
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    entry = _load(src, cache).cache.entry
    if damage == "no manifest":
        (entry / t5_cache.MANIFEST).unlink()
    elif damage == "garbage manifest":
        (entry / t5_cache.MANIFEST).write_bytes(os.urandom(300))
    elif damage == "no weights":
        (entry / t5_cache.WEIGHTS).unlink()
    else:
        cfg = entry / "config.json"
        st = cfg.stat()
        cfg.write_text("{" + " " * (st.st_size - 1))
        os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _load(src, cache)
    assert not again.cache.hit and again.cache.written
    assert torch.equal(embeds(again, tok), reference(src, Q8, torch.float32, tok))
    assert _load(src, cache).cache.hit


def test_folder_source_is_cached_and_invalidated_by_any_of_its_files(tmp_path, tok):
    folder = tmp_path / "PixArt-Sigma" / "text_encoder"
    tiny.make_t5().half().save_pretrained(folder, safe_serialization=True)
    src, cache = tmp_path / "PixArt-Sigma", tmp_path / "cache"
    first = _load(src, cache, NF4)
    assert first.cache.written
    assert _load(src, cache, NF4).cache.hit
    cfg = folder / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    _rebuilt(_load(src, cache, NF4), "another source")
    assert torch.equal(embeds(_load(src, cache, NF4), tok), reference(src, NF4, torch.float32, tok))


def test_unwritable_cache_still_loads_and_says_so(tmp_path, tok, caplog):
    src = write_t5(tmp_path / "t5.safetensors")
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        loaded = _load(src, blocked)
    assert not loaded.cache.written and not loaded.cache.hit
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert torch.equal(embeds(loaded, tok), reference(src, Q8, torch.float32, tok))


def test_leftovers_of_a_crashed_writer_are_not_entries_and_are_cleaned(tmp_path):
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    entry = t5_cache.entry_dir(cache, src, Q8, torch.float32)
    crashed = entry.with_name(entry.name + ".tmp-999999-deadbeef")
    crashed.mkdir(parents=True)
    (crashed / t5_cache.WEIGHTS).write_bytes(b"partial")
    old = 10**9 * (int(crashed.stat().st_mtime) - 2 * t5_cache._LEFTOVER_AGE_S)
    os.utime(crashed, ns=(old, old))
    loaded = _load(src, cache)
    assert loaded.cache.written and loaded.cache.reason == "no entry yet"
    assert not crashed.exists()
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]


def test_unquantized_loads_do_not_use_the_cache(tmp_path):
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    loaded = ct5.load_t5(src, t5_spec.QUANT_NONE, torch.float32, cache_dir=cache)
    assert loaded.cache is None and not cache.exists()


# -------------------------------------------------------------------------------------------------- per tensor


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["file", "prefixed file", "folder"])
def test_per_tensor_quantization_gives_transformers_bytes(tmp_path, quant, dtype, layout):
    """The GPU path's quantizer, run on the CPU: one tensor at a time through the bitsandbytes functions, it gives
    the keys, dtypes and bytes of transformers' quantized load of the same file."""
    model = tiny.make_t5()
    if layout == "folder":
        src = tmp_path / "t5folder"
        model.half().save_pretrained(src, safe_serialization=True)
    else:
        src = tmp_path / "t5.safetensors"
        prefix = "text_encoders.t5xxl.transformer." if layout == "prefixed file" else ""
        save_file(tiny.t5_single_file_sd(model, prefix=prefix), str(src))
    tensors, config = t5_quantize.quantize_per_tensor(src, quant, dtype, CPU)
    ref = reference_state(src, quant, dtype)
    assert_same_tensors(tensors, {k: v for k, v in ref.items() if k != "encoder.embed_tokens.weight"})  # tied: shared
    assert config.quantization_config.to_dict() == bnb(quant, dtype).to_dict()


def test_per_tensor_quantization_refuses_what_it_does_not_read(tmp_path):
    """Scaled-fp8 files and pickle folders go to transformers' loader (on the CPU) instead."""
    sd = tiny.t5_single_file_sd(tiny.make_t5())
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(())
    save_file(sd, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(t5_quantize.UnsupportedSource):
        t5_quantize.quantize_per_tensor(tmp_path / "scaled.safetensors", Q8, torch.float32, CPU)
    model = tiny.make_t5()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(t5_quantize.UnsupportedSource):
        t5_quantize.quantize_per_tensor(tmp_path / "bin", Q8, torch.float32, CPU)


def test_gpu_path_writes_the_per_tensor_result_and_loads_it_from_the_cache(tmp_path, tok, monkeypatch):
    """A load whose device is a CUDA GPU quantizes per tensor on that device, writes the result to the cache and
    loads it from there. No CUDA here: the per-tensor quantizer gets the CUDA device (recorded) and runs on the
    CPU, where its bytes are tested equal to transformers' above; what runs for real is the selection by device,
    the cache write of its result and the pre-quantized load. bench/gpu_check.py runs it on a GPU."""
    src, cache = write_t5(tmp_path / "t5.safetensors"), tmp_path / "cache"
    seen = []
    real = t5_quantize.quantize_per_tensor

    def on_cpu(path, quant, dtype, device):
        seen.append(device)
        return real(path, quant, dtype, CPU)

    monkeypatch.setattr(t5_quantize, "quantize_per_tensor", on_cpu)
    loaded = ct5.load_t5(src, NF4, torch.float32, cache_dir=cache, quantize_device=torch.device("cuda", 0))
    assert seen == [torch.device("cuda", 0)]
    assert loaded.cache.written and loaded.cache.quantized_on == "cuda:0"
    assert torch.equal(embeds(loaded, tok), reference(src, NF4, torch.float32, tok))
    monkeypatch.undo()
    again = ct5.load_t5(src, NF4, torch.float32, cache_dir=cache, quantize_device=torch.device("cuda", 0))
    assert again.cache.hit and again.cache.quantized_on == "cuda:0"


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_file_with_two_different_embeddings_embeds_as_transformers_quantized_load(tmp_path, tok, monkeypatch,
                                                                                    quant, device):
    """A file holding both `shared.weight` and `encoder.embed_tokens.weight`, with different values: transformers
    leaves them untied and its encoder reads `encoder.embed_tokens` (its load warns so). Quantized into the cache on
    the CPU (transformers' load) and on a GPU (the per-tensor quantizer, which reads the file itself; run on the CPU
    as above), the T5 embeds as transformers' own quantized load."""
    sd = tiny.t5_single_file_sd(tiny.make_t5(seed=0))
    sd["encoder.embed_tokens.weight"] = tiny.make_t5(seed=1).shared.weight.detach().to(torch.float16).contiguous()
    assert not torch.equal(sd["shared.weight"], sd["encoder.embed_tokens.weight"])
    src = tmp_path / "t5xxl_two_embeddings.safetensors"
    save_file(sd, str(src))
    real = t5_quantize.quantize_per_tensor
    monkeypatch.setattr(t5_quantize, "quantize_per_tensor", lambda path, q, dtype, _: real(path, q, dtype, CPU))
    loaded = ct5.load_t5(src, quant, torch.float32, cache_dir=tmp_path / "cache",
                         quantize_device=torch.device(device, 0) if device == "cuda" else None)
    assert loaded.cache.written and loaded.cache.quantized_on == (f"{device}:0" if device == "cuda" else "cpu")
    assert torch.equal(embeds(loaded, tok), reference(src, quant, torch.float32, tok))


# -------------------------------------------------------------------------------------------------- other formats


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
def test_scaled_fp8_source_is_cached_like_the_others(tmp_path, tok, quant):
    """A ComfyUI scaled-fp8 T5 quantized to 8-bit/nf4: the first load (the scaled-fp8 loader, on the CPU) writes the
    cache; the second reads it and equals the uncached load of the same file, tensors and embeddings."""
    src = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(tiny.t5_scaled_fp8_sd(tiny.make_t5()), str(src))
    first = _load(src, tmp_path / "cache", quant)
    assert first.cache.written
    again = _load(src, tmp_path / "cache", quant)
    assert again.cache.hit
    assert_same_tensors(state(again.model), reference_state(src, quant, torch.float32))
    assert torch.equal(embeds(again, tok), reference(src, quant, torch.float32, tok))


def test_gguf_with_quantization_is_still_refused_with_a_cache(tmp_path):
    """GGUF files are already quantized: 8-bit on one is refused with the loader's message, cache or not, and no
    cache entry is made."""
    from harness import gguf_files
    from harness.gguf_files import GGUF_WIDTH_CONFIG
    from harness.models import make_t5_from_config as _t5
    from pixart_core import gguf_t5

    path = gguf_files.write_t5_gguf(_t5(GGUF_WIDTH_CONFIG), tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", "Q8_0")
    with pytest.raises(ValueError, match="GGUF") as e:
        _load(path, tmp_path / "cache")
    assert gguf_t5.QUANTIZATION_HINT in str(e.value)
    assert not (tmp_path / "cache").exists()


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every element width the cache writes, and an empty tensor among the 4-byte ones (written as nothing)."""
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.empty": torch.zeros(0),
            "c.scale": torch.randn(4, generator=g).to(torch.bfloat16), "e.flag": torch.tensor([True, False, True]),
            "d.q": torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g), "f.absmax": torch.randn(2).double()}


def test_the_weights_file_is_byte_for_byte_the_one_safetensors_writes(tmp_path):
    """The cache writes its file itself (one tensor at a time, no serialized copy): safetensors' own save_file, with
    the metadata torch's files carry, gives the same bytes (header, its padding, order, data)."""
    from transformers import T5Config

    tensors = _mixed_tensors()
    entry = tmp_path / "entry"
    t5_cache.write(entry, {"k": 1}, T5Config(), tensors, "cpu")
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (entry / t5_cache.WEIGHTS).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_the_manifest_holds_each_files_sha256(tmp_path):
    """hashlib's sha256 of each file as written; a full check passes on the entry and sees one changed byte of the
    config (size and mtime kept)."""
    import hashlib

    from transformers import T5Config

    entry, key = tmp_path / "entry", {"k": 1}
    t5_cache.write(entry, key, T5Config(), _mixed_tensors(), "cpu")
    files = json.loads((entry / t5_cache.MANIFEST).read_text())["files"]
    for name in (t5_cache.WEIGHTS, "config.json"):
        assert files[name]["sha256"] == hashlib.sha256((entry / name).read_bytes()).hexdigest()
    assert t5_cache.check(entry, key, verify="full") is None
    config = entry / "config.json"
    st = config.stat()
    config.write_bytes(config.read_bytes().replace(b" ", b"\t", 1))  # an indent: still the same config, same size
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert t5_cache.check(entry, key, verify="full") == "config.json does not match its sha256"


def test_a_tensor_safetensors_cannot_hold_is_refused_by_name_and_leaves_nothing(tmp_path):
    from transformers import T5Config

    with pytest.raises(t5_cache.CacheError) as e:
        t5_cache.write(tmp_path / "entry", {}, T5Config(), {"x.weight": torch.zeros(2, dtype=torch.complex64)}, "cpu")
    assert str(e.value) == "tensor x.weight has dtype torch.complex64, which safetensors cannot hold"
    assert list(tmp_path.iterdir()) == []


def _small_entry():
    from transformers import T5Config

    return {"w": torch.ones(4, 4)}, T5Config()  # 64 bytes of tensors


def test_a_young_leftover_is_kept_for_the_writer_that_may_still_use_it(tmp_path):
    """Only leftovers older than an hour are removed: a younger one may be another process's folder in the making;
    a file with a leftover's name is not touched either."""
    entry = tmp_path / "cache" / "entry"
    young = entry.with_name(entry.name + ".tmp-4242-0a1b2c3d")
    young.mkdir(parents=True)
    stray = entry.with_name(entry.name + ".old-1-x")
    stray.write_bytes(b"not ours")
    old = 10**9 * (int(stray.stat().st_mtime) - 2 * t5_cache._LEFTOVER_AGE_S)
    os.utime(stray, ns=(old, old))
    tensors, config = _small_entry()
    t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    assert young.is_dir() and stray.read_bytes() == b"not ours"


@pytest.mark.parametrize("spare,written", [(0, True), (-1, False)])
def test_free_disk_space_must_hold_the_tensors_and_256_mib(tmp_path, monkeypatch, spare, written):
    """The disk as the operating system reports it (shutil.disk_usage, the only query stood in for): an entry is
    written with exactly 64 bytes + 256 MiB free, and refused, whole message, with one byte less."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    free = 64 + (256 << 20) + spare
    monkeypatch.setattr(t5_cache.shutil, "disk_usage", lambda p: usage(1 << 40, (1 << 40) - free, free))
    tensors, config = _small_entry()
    entry = tmp_path / "cache" / "entry"
    if written:
        t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
        assert t5_cache.check(entry, {"k": 1}) is None
        return
    with pytest.raises(t5_cache.CacheError) as e:
        t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    assert str(e.value) == f"not enough free disk space in {entry.parent} (0.3 GiB free, 0.0 GiB needed)"
    assert not entry.exists()


def test_the_space_message_gives_gib_with_one_decimal(tmp_path, monkeypatch):
    """3 GiB of tensors (on the meta device: sized, never allocated) against 2.5 GiB free."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(t5_cache.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 5 << 29))
    tensors = {"w": torch.empty(3 << 28, dtype=torch.float32, device="meta")}
    with pytest.raises(t5_cache.CacheError) as e:
        t5_cache.write(tmp_path / "entry", {}, _small_entry()[1], tensors, "cpu")
    assert str(e.value) == f"not enough free disk space in {tmp_path} (2.5 GiB free, 3.0 GiB needed)"


def test_the_cache_folder_and_its_parents_are_made(tmp_path):
    entry = tmp_path / "models" / "pixart" / "t5_cache" / "entry"
    tensors, config = _small_entry()
    t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    assert t5_cache.check(entry, {"k": 1}) is None


def test_the_manifest_says_when_the_entry_was_made_in_utc(tmp_path, monkeypatch):
    """ISO 8601 in UTC with a Z, whatever the machine's time zone (here set to Tokyo, 9 hours ahead)."""
    import datetime
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        tensors, config = _small_entry()
        before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        t5_cache.write(tmp_path / "entry", {"k": 1}, config, tensors, "cpu")
        after = datetime.datetime.now(datetime.timezone.utc)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    created = json.loads((tmp_path / "entry" / t5_cache.MANIFEST).read_text())["created"]
    stamp = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert before <= stamp <= after


def test_an_invalid_entry_in_the_way_is_replaced_and_nothing_of_it_stays(tmp_path):
    entry = tmp_path / "entry"
    tensors, config = _small_entry()
    t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    (entry / t5_cache.WEIGHTS).write_bytes(b"garbage")  # invalid now
    assert t5_cache.check(entry, {"k": 1}) is not None
    t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    assert t5_cache.check(entry, {"k": 1}) is None
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


@pytest.mark.parametrize("theirs_valid", [True, False])
def test_another_process_finishing_the_same_entry_first(tmp_path, monkeypatch, theirs_valid):
    """Two ComfyUI processes quantizing the same T5: the other one renames its entry into place between our check
    and our rename (stood in for by doing its write inside ours, just before the rename). A valid entry of theirs is
    kept and our folder removed; an invalid one is an error, and our folder is still removed."""
    entry = tmp_path / "entry"
    tensors, config = _small_entry()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == entry and not entry.exists():
            monkeypatch.setattr(t5_cache.os, "replace", real_replace)
            t5_cache.write(entry, {"k": 1}, config, {"w": torch.full((4, 4), 2.0)}, "cpu")
            if not theirs_valid:
                (entry / t5_cache.WEIGHTS).write_bytes(b"garbage")
        return real_replace(src, dst)

    monkeypatch.setattr(t5_cache.os, "replace", replace)
    if theirs_valid:
        t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
        assert t5_cache.check(entry, {"k": 1}) is None
        assert torch.equal(load_file(str(entry / t5_cache.WEIGHTS))["w"], torch.full((4, 4), 2.0))  # theirs
    else:
        with pytest.raises(OSError):
            t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def _entry_with_weights(tmp_path, data: bytes) -> Path:
    """An entry whose manifest describes weights of these bytes (size and mtime as written): only the safetensors
    layout itself can tell a broken file."""
    entry = tmp_path / "entry"
    tensors, config = _small_entry()
    t5_cache.write(entry, {"k": 1}, config, tensors, "cpu")
    weights = entry / t5_cache.WEIGHTS
    weights.write_bytes(data)
    manifest = json.loads((entry / t5_cache.MANIFEST).read_text())
    s = weights.stat()
    manifest["files"][t5_cache.WEIGHTS].update(size=s.st_size, mtime_ns=s.st_mtime_ns)
    (entry / t5_cache.MANIFEST).write_text(json.dumps(manifest))
    return entry


def _safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    """The safetensors layout (its format description): the header's length as a little-endian u64, the JSON
    header, the data."""
    import struct

    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("data,problem", [
    (b"\x05\x00\x00", "shorter than a safetensors header"),
    (b"\x03\x00\x00\x00\x00\x00\x00\x00{}", "header length points past the end of the file"),  # 3 of 2 bytes
    (b"\x02\x00\x00\x00\x00\x00\x00\x80{}", "header length points past the end of the file"),  # 2**63 + 2: unsigned
    (_safetensors_bytes(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)) + b"abc",
     "73 bytes where its header describes 70"),  # 8 + a 54-byte header + 8 bytes of data, and 3 more
])
def test_a_weights_file_that_is_not_whole_safetensors_is_named_for_what_is_wrong(tmp_path, data, problem):
    entry = _entry_with_weights(tmp_path, data)
    assert t5_cache.check(entry, {"k": 1}) == f"{t5_cache.WEIGHTS} is not a complete safetensors file: {problem}"


def test_a_header_that_fills_the_file_exactly_is_whole(tmp_path):
    """No tensors: the header alone, its length exactly the rest of the file (the boundary of the check above)."""
    entry = _entry_with_weights(tmp_path, _safetensors_bytes(b'{"__metadata__":{"format":"pt"}}'))
    assert t5_cache.check(entry, {"k": 1}) is None


def test_a_folders_source_files_are_its_config_and_weights_only(tmp_path):
    """A transformers T5 folder also holds a README, the tokenizer and folders: editing those changes no weight, so
    they are not in the cache key."""
    folder = tmp_path / "t5"
    folder.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "README.md", "spiece.model"):
        (folder / name).write_bytes(b"x")
    (folder / "old.safetensors.d").mkdir()
    assert [f.name for f in t5_cache.source_files(folder)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_the_entry_folder_is_named_for_the_source_mode_dtype_and_resolved_path(tmp_path):
    """The file name with every run of other characters than letters, digits, _ . - made one _, cut to 60
    characters (a root path has no name: t5), then mode, dtype and the first 12 hex digits of the resolved path's
    sha256 (hashlib)."""
    import hashlib

    src = tmp_path / "My T5 (fp16)!.safetensors"
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    assert t5_cache.entry_dir(tmp_path, src, Q8, torch.bfloat16).name == \
        f"My_T5_fp16_.safetensors-8bit-bfloat16-{digest}"
    long = tmp_path / ("a" * 70 + ".safetensors")
    assert t5_cache.entry_dir(tmp_path, long, NF4, torch.float32).name.startswith("a" * 60 + "-nf4-float32-")
    assert t5_cache.entry_dir(tmp_path, "/", Q8, torch.float32).name.startswith("t5-8bit-float32-")


def test_the_cache_refuses_a_mode_it_does_not_hold():
    with pytest.raises(ValueError) as e:
        t5_cache.entry_dir("/tmp", "/tmp/t5.safetensors", "none", torch.float32)
    assert str(e.value) == "the T5 cache holds quantized modes only (8bit, nf4), not 'none'."


def test_check_says_why_an_entry_cannot_be_used(tmp_path):
    """Each reason in full: no manifest, a key field missing on one side or changed, a manifest listing other
    files."""
    entry = tmp_path / "entry"
    tensors, config = _small_entry()
    t5_cache.write(entry, {"a": 1, "b": 2}, config, tensors, "cpu")
    assert t5_cache.check(entry, {"a": 1, "c": 3}) == "made for another source or setting (differs in: b, c)"
    assert t5_cache.check(entry, {"a": 1}) == "made for another source or setting (differs in: b)"
    manifest_path = entry / t5_cache.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["extra.bin"] = manifest["files"]["config.json"]
    manifest_path.write_text(json.dumps(manifest))
    assert t5_cache.check(entry, {"a": 1, "b": 2}) == \
        f"manifest lists ['config.json', 'extra.bin', '{t5_cache.WEIGHTS}']"
    manifest_path.unlink()
    assert t5_cache.check(entry, {"a": 1, "b": 2}) == "no manifest (an interrupted write)"
