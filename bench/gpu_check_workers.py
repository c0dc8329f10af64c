"""The worker processes of bench/gpu_check: each part runs in a process of its own (its own CUDA context and peak),
so the parent never holds GPU memory while another process measures under a cap.

A worker prints its result as a `RESULT {json}` line (bench.measure.emit) after each step it finishes: the parent
keeps the last one, so a part that runs out of time still reports what it measured.

What this check knows of the pack beyond ComfyUI's API is kept to the list below (other refactors then leave it
working); everything else goes through node class ids, their inputs, and ComfyUI's executor and model management:
  - node class ids and input names (the prompts and `node(...)` calls below);
  - a loader's output holds a comfy ModelPatcher (found by type: `patcher_of`), around the diffusers / transformers
    model (found by class: `module_of`);
  - Text Encode's output holds the embeddings as a [1, L, C] float tensor (found by shape: `embeds_of`);
  - the quantized-T5 cache folder is set by ComfyUI's folder_paths key `pixart_t5_cache` (the key users put in
    extra_model_paths.yaml); an entry holds `manifest.json` (its "quantized_on" and "key"."dtype") and the weights
    as one safetensors file in transformers' bitsandbytes layout;
  - Tiled Refine logs "... in N tiles".
"""
from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import time
from pathlib import Path

from bench import gpu, measure
from harness import models
from harness.comfyui import Executor, execution_message, init_comfy, validation_message

GiB = 1 << 30
QUANTS = {"8-bit": "8-bit (bitsandbytes)", "nf4": "4-bit nf4 (bitsandbytes)"}
PROMPTS = ("a red fox in the snow, golden light", "a lighthouse on a cliff above a stormy sea")
SCHEDULER = "dpm++ 2m"
CACHE_KEY = "pixart_t5_cache"
# Three layers whose quantized bytes are compared with bitsandbytes' own CPU quantization (g).
COMPARED = ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            "encoder.block.1.layer.0.SelfAttention.o.weight")


def t5_name(blocks: int, smoke: bool) -> str:
    return "t5-tiny_fp16.safetensors" if smoke else f"t5xxl-random-{blocks}blocks_bf16.safetensors"


# ------------------------------------------------------------------------------------------------ in a worker


class Records(logging.Handler):
    """ComfyUI's and the pack's log lines about loading, evicting, tiles and the T5 cache, kept for the report."""

    KEEP = ("Unloading", "loaded partially", "loaded completely", "models unloaded", "Unloaded partially", "tiles",
            "T5 cache", "ran out of memory", "retrying in tiles", "lowvram", "quantiz")

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if any(k in msg for k in self.KEEP):
            self.lines.append(msg[:240])

    def take(self) -> list[str]:
        out, self.lines = self.lines[-16:], []
        return out


class Ctx:
    """ComfyUI started in this worker with the pack: its node classes, model management and device."""

    def __init__(self, a):
        init_comfy(Path(a.base), cpu=a.smoke)
        import comfy.model_management as mm
        import nodes
        import torch

        self.a, self.torch, self.mm, self.N = a, torch, mm, nodes.NODE_CLASS_MAPPINGS
        self.device = mm.get_torch_device()
        self.cuda = self.device.type == "cuda"
        self.records = Records()
        logging.getLogger().addHandler(self.records)
        logging.getLogger().setLevel(logging.INFO)

    def node(self, class_id: str, **inputs) -> tuple:
        """Run one node by its class id, as ComfyUI calls it (V3: its execute classmethod; V1: FUNCTION)."""
        from comfy_api.internal import _ComfyNodeInternal

        cls = self.N[class_id]
        if issubclass(cls, _ComfyNodeInternal):
            return tuple(cls.execute(**inputs).result)
        return tuple(getattr(cls(), cls.FUNCTION)(**inputs))

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def unload_all(self) -> None:
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()

    def encode(self, t5, prompt: str, cleaning: str = "lowercase") -> tuple:
        return self.node("PixArtSigmaTextEncode", t5=t5, positive=prompt, negative="", max_tokens=300,
                         caption_cleaning=cleaning)

    def sample(self, dit, pos, neg, size: int | tuple[int, int], steps: int, seed: int = 0):
        w, h = (size, size) if isinstance(size, int) else size
        return self.node("PixArtSigmaSampler", dit=dit, positive=pos, negative=neg, seed=seed, steps=steps,
                         cfg=gpu.CFG, scheduler=SCHEDULER, width=w, height=h, batch_size=1)[0]


def patcher_of(handle):
    """The comfy ModelPatcher a loader's output holds."""
    from comfy.model_patcher import ModelPatcher

    if isinstance(handle, ModelPatcher):
        return handle
    values = list(vars(handle).values()) if hasattr(handle, "__dict__") else list(handle)
    found = next((v for v in values if isinstance(v, ModelPatcher)), None)
    if found is None:
        raise RuntimeError(f"no ModelPatcher in {type(handle).__name__}: the check needs one in each loader's output")
    return found


def module_of(handle, cls):
    """The `cls` module (a diffusers / transformers class) inside a loader's output."""
    return next(m for m in patcher_of(handle).model.modules() if isinstance(m, cls))


def embeds_of(cond):
    """The [1, L, C] embeddings of a Text Encode output."""
    import torch

    values = vars(cond).values() if hasattr(cond, "__dict__") else cond
    return next(v for v in values if isinstance(v, torch.Tensor) and v.ndim == 3 and v.is_floating_point())


def device_bytes(module, device) -> int:
    """Bytes of every tensor reachable from the module's parameters, buffers and their attributes (bitsandbytes'
    CB/SCB, quant_state, the layer's matmul state) that live on `device`, each storage once."""
    import torch

    seen: dict[tuple, int] = {}

    def walk(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device == device or (device.type == obj.device.type and device.index is None):
                st = obj.untyped_storage()
                seen[(str(obj.device), st.data_ptr())] = st.nbytes()
            if depth > 0:
                for v in getattr(obj, "__dict__", {}).values():
                    walk(v, depth - 1)
        elif depth > 0 and isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth - 1)
        elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for v in vars(obj).values():
                walk(v, depth - 1)

    for m in module.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            walk(t, 3)
        for k, v in vars(m).items():
            if not k.startswith("_") and not isinstance(v, torch.nn.Module):
                walk(v, 2)
    return sum(seen.values())


def int8_copies(module) -> list[int]:
    """For each bitsandbytes 8-bit layer, how many distinct int8 storages hold its matrix (weight, weight.CB,
    state.CB): 1 when the layer keeps one copy."""
    import torch
    from bitsandbytes.nn import Linear8bitLt

    out = []
    for m in module.modules():
        if isinstance(m, Linear8bitLt):
            held = (m.weight.data, getattr(m.weight, "CB", None), getattr(getattr(m, "state", None), "CB", None))
            out.append(len({(str(t.device), t.untyped_storage().data_ptr()) for t in held
                            if isinstance(t, torch.Tensor) and t.dtype == torch.int8}))
    return out


def cosine(torch, a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def _gib(b: float | None) -> float | None:
    return None if b is None else b / GiB


def log_env() -> dict:
    """The versions and the bitsandbytes library this worker loaded."""
    import bitsandbytes  # noqa: F401 - loads its native library
    import diffusers
    import torch
    import transformers

    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps if "libbitsandbytes" in line})
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__, "bitsandbytes_library": libs}


# ------------------------------------------------------------------------------------------------ the workers


def worker_weights(a) -> dict:
    """The weight files, random and full size (built on the GPU: seconds), written once under a.base: the DiT,
    VAE and 2-block T5 of P4 (bench/gpu.py) and the T5 with T5-v1.1-XXL's shapes and a.t5_blocks blocks (bf16)."""
    import torch
    from safetensors.torch import save_file

    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False); --cpu-smoke "
                         "runs it on the CPU")
    device = torch.device("cpu" if a.smoke else "cuda")
    base = Path(a.base)
    t = time.perf_counter()
    with torch.device(device):
        gpu.prepare(base, a.smoke)
        path = base / "models" / "text_encoders" / a.t5
        if not path.is_file():
            model = models.make_t5() if a.smoke else models.make_t5("bench", seed=1, layers=a.t5_blocks).to(torch.bfloat16)
            save_file(models.t5_single_file_sd(model, dtype=torch.bfloat16), str(path.with_suffix(".part")))
            path.with_suffix(".part").rename(path)
            del model
    out = {"seconds": time.perf_counter() - t, "files_gib": {p.name: p.stat().st_size / GiB
                                                          for p in (base / "models").rglob("*.safetensors")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device=props.name, total_gib=props.total_memory / GiB, capability=list(torch.cuda.get_device_capability()))
    else:
        out["device"] = "CPU smoke test (tiny models: the numbers mean nothing)"
    return {**out, **log_env()}


def worker_reference(a) -> dict:
    """(e) the bf16 T5's embeddings of the prompts on the device, saved for the quantized workers."""
    import torch

    c = Ctx(a)
    c.reset_peak()
    t = time.perf_counter()
    t5 = c.node("PixArtSigmaT5Loader", t5_name=a.t5, quantization="none", dtype="bf16")[0]
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        embeds = [embeds_of(c.encode(t5, p)[0]).cpu() for p in PROMPTS]
    torch.save(embeds, Path(a.base) / "t5_reference.pt")
    return {"device": str(c.device), "load_s": load_s, "seconds": time.perf_counter() - t,
            "peak_vram_gib": _gib(c.peak()), "model_gib": _gib(patcher_of(t5).model_size())}


def _fresh_cache(c: Ctx, quant: str) -> Path:
    """An empty quantized-T5 cache folder for this worker, set where users set it (folder_paths)."""
    import folder_paths

    folder = Path(c.a.base) / f"t5_cache_{quant}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder_paths.folder_names_and_paths[CACHE_KEY] = ([str(folder)], set())
    return folder


def _equal_bytes(c: Ctx, source: Path, cache: Path, quant: str) -> dict:
    """The share of equal bytes between the cache file's quantized weights and bitsandbytes' own CPU quantization
    of the same source tensors (Int8Params / Params4bit quantize as below when transformers loads them)."""
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors import safe_open

    manifest = next(cache.rglob("manifest.json"))
    info = json.loads(manifest.read_text())
    dtype = getattr(torch, info.get("key", {}).get("dtype", "bfloat16"))
    weights = next(p for p in manifest.parent.glob("*.safetensors"))
    same = {}
    with safe_open(str(source), framework="pt") as src, safe_open(str(weights), framework="pt") as cached:
        for k in COMPARED:
            if k not in set(src.keys()) or k not in set(cached.keys()):
                continue
            w = src.get_tensor(k)
            if quant == "8-bit":
                ref, _, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            else:
                ref, _ = bnbf.quantize_4bit(w.to(dtype).contiguous(), blocksize=64, compress_statistics=False,
                                            quant_type="nf4", quant_storage=torch.uint8)
            got = cached.get_tensor(k)
            same[k] = float((ref.reshape(-1) == got.reshape(-1)).float().mean()) if ref.numel() == got.numel() else 0.0
    return {"quantized_on": info.get("quantized_on"), "compute_dtype": str(dtype), "equal_bytes_vs_cpu": same}


def _load_quantized(c: Ctx, out: dict, quant: str):
    """(g) the first load quantizes into an empty cache (on the GPU where there is one), the second reads it."""
    cache = _fresh_cache(c, quant)
    c.reset_peak()
    c.records.take()
    t = time.perf_counter()
    t5 = c.node("PixArtSigmaT5Loader", t5_name=c.a.t5, quantization=QUANTS[quant], dtype="auto")[0]
    first_s, peak = time.perf_counter() - t, c.peak()
    first_log = c.records.take()
    del t5
    gc.collect()
    t = time.perf_counter()
    t5 = c.node("PixArtSigmaT5Loader", t5_name=c.a.t5, quantization=QUANTS[quant], dtype="auto")[0]
    cached_s = time.perf_counter() - t
    out["quantize"] = {"first_s": first_s, "peak_vram_gib": _gib(peak), "cached_s": cached_s,
                       "cached_hit": any("read" in line for line in c.records.lines), "log": first_log + c.records.take(),
                       **_equal_bytes(c, Path(c.a.base) / "models" / "text_encoders" / c.a.t5, cache, quant)}
    out["t5_model_gib"] = _gib(patcher_of(t5).model_size())
    return t5


def _reload(c: Ctx, out: dict, t5) -> None:
    """(a) encode A, ComfyUI unloads everything, encode B: the reload's peak against the first load's."""
    peaks = []
    for prompt in PROMPTS:
        c.unload_all()
        c.reset_peak()
        with c.torch.inference_mode():
            c.encode(t5, prompt)
        peaks.append(c.peak())
    model = patcher_of(t5).model
    out["reload"] = {"first_peak_gib": _gib(peaks[0]), "reload_peak_gib": _gib(peaks[1]),
                     "int8_copies_per_layer": sorted(set(int8_copies(model))) or None}


def _partial_unload(c: Ctx, out: dict, t5) -> None:
    """(a) ComfyUI frees part of the loaded T5 (model_management.free_memory -> ModelPatcher.partially_unload, as
    when the DiT needs room), then the DiT loads; the memory ComfyUI counts as freed must leave the device, and the
    T5 must encode the same afterwards."""
    torch, mm, device = c.torch, c.mm, c.device
    patcher, model = patcher_of(t5), patcher_of(t5).model
    with torch.inference_mode():
        before = embeds_of(c.encode(t5, PROMPTS[0], "lowercase")[0]).clone()  # (a reload's embeddings)
    mm.load_models_gpu([patcher])  # whole, as after an encode
    c.sync()
    alloc0, loaded0, held0 = c.allocated(), patcher.loaded_size(), device_bytes(model, device)
    want = loaded0 // 2
    c.records.take()
    mm.free_memory(mm.get_free_memory(device) + want, device)
    c.sync()
    alloc1, loaded1, held1 = c.allocated(), patcher.loaded_size(), device_bytes(model, device)
    row = {"loaded_gib": _gib(loaded0), "asked_gib": _gib(want), "comfy_freed_gib": _gib(loaded0 - loaded1),
           "torch_freed_gib": _gib(alloc0 - alloc1), "device_bytes_gib": [_gib(held0), _gib(held1)],
           "uncounted_after_gib": _gib(held1 - loaded1), "log": c.records.take()}
    row["returned"] = (alloc0 - alloc1) / (loaded0 - loaded1) if loaded0 > loaded1 else None
    dit = c.node("PixArtSigmaDiTLoader", dit_name=gpu.DIT, variant="auto", dtype="auto")[0]
    pos, neg = c.encode(t5, PROMPTS[0], "lowercase")  # the embedding cache answers: no T5 load
    c.reset_peak()
    with torch.inference_mode():
        c.sample(dit, pos, neg, c.a.size, 1)
    c.sync()
    row.update(after_dit_allocated_gib=_gib(c.allocated()), after_dit_t5_loaded_gib=_gib(patcher.loaded_size()),
               dit_loaded_gib=_gib(patcher_of(dit).loaded_size()), dit_peak_gib=_gib(c.peak()),
               dit_log=c.records.take())
    with torch.inference_mode():  # caption cleaning "none" reads the same text but misses the embedding cache
        after = embeds_of(c.encode(t5, PROMPTS[0], "none")[0])
    row["same_embeddings"] = {"max_abs_diff": float((after.float() - before.float()).abs().max()),
                              "cosine": cosine(torch, after, before)}
    out["partial_unload"] = row
    del dit
    c.unload_all()


def _cosine(c: Ctx, out: dict, t5) -> None:
    """(e) cosine of this quantization's embeddings against the bf16 T5's (reference worker)."""
    path = Path(c.a.base) / "t5_reference.pt"
    if not path.is_file():
        out["cosine_vs_bf16"] = None
        return
    ref = c.torch.load(path)
    with c.torch.inference_mode():
        mine = [embeds_of(c.encode(t5, p)[0]) for p in PROMPTS]
    out["cosine_vs_bf16"] = [cosine(c.torch, m, r) for m, r in zip(mine, ref, strict=True)]


class Cap:
    """This process sees a card of `gib` GiB: a ballast tensor takes the rest of the device, so the driver's free
    memory, ComfyUI's get_free_memory (the driver's free + torch's cached) and any allocation past the cap all
    behave as on that card. ComfyUI's own reserve (EXTRA_RESERVED_VRAM) stays as it is on such a card."""

    def __init__(self, c: Ctx, gib: float | None):
        self.c, self.gib, self.ballast, self.bytes = c, gib, None, 0

    def __enter__(self) -> dict:
        c = self.c
        seen = {}
        if c.cuda:
            free, total = c.torch.cuda.mem_get_info(c.device)
            # what the card holds before the ballast: this process's CUDA context and tensors, and anything another
            # process holds (none expected: the parent never touches the GPU)
            seen = {"device_used_gib": _gib(total - free), "torch_reserved_gib": _gib(c.torch.cuda.memory_reserved(c.device))}
        if self.gib and c.cuda:
            self.bytes = max(0, total - int(self.gib * GiB))
            self.ballast = c.torch.empty(self.bytes, dtype=c.torch.uint8, device=c.device) if self.bytes else None
        return {"cap_gib": self.gib, **seen, "ballast_gib": _gib(self.bytes),
                "comfy_free_gib": _gib(c.mm.get_free_memory(c.device)) if c.cuda else None,
                "comfy_reserved_gib": _gib(c.mm.extra_reserved_memory())}

    def __exit__(self, *exc) -> None:
        self.ballast = None
        gc.collect()
        if self.c.cuda:
            self.c.torch.cuda.empty_cache()


def image_prompt(a, quant: str, text: str, seed: int) -> dict:
    """T5 -> DiT -> VAE -> Preview, as a user's workflow (API format)."""
    return {
        "1": {"class_type": "PixArtSigmaT5Loader", "inputs": {"t5_name": a.t5, "quantization": QUANTS[quant],
                                                               "dtype": "auto"}},
        "2": {"class_type": "PixArtSigmaTextEncode", "inputs": {"t5": ["1", 0], "positive": text, "negative": "",
                                                                 "max_tokens": 300}},
        "3": {"class_type": "PixArtSigmaDiTLoader", "inputs": {"dit_name": gpu.DIT, "variant": "auto", "dtype": "auto"}},
        "4": {"class_type": "PixArtSigmaSampler", "inputs": {
            "dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "seed": seed, "steps": a.steps, "cfg": gpu.CFG,
            "scheduler": SCHEDULER, "width": a.size, "height": a.size, "batch_size": 1, "denoise": 1.0}},
        "5": {"class_type": "PixArtSigmaVAELoader", "inputs": {"vae_name": gpu.VAE, "dtype": "auto"}},
        "6": {"class_type": "PixArtSigmaVAEDecode", "inputs": {"vae": ["5", 0], "samples": ["4", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def _images(result: dict) -> tuple[list[int] | None, float | None]:
    """(shape [n, H, W, 3], pixel std) of the Preview node's images."""
    import folder_paths
    import numpy as np
    from PIL import Image

    files = result["outputs"].get("7", {}).get("images", [])
    arrays = [np.asarray(Image.open(Path(folder_paths.get_directory_by_type(f["type"])) / f["subfolder"] / f["filename"]))
              for f in files]
    if not arrays:
        return None, None
    return [len(arrays), *arrays[0].shape], float(np.std(np.stack(arrays)))


def _caps(c: Ctx, out: dict, quant: str, emit) -> None:
    """(b) a whole image through ComfyUI's executor under each cap (the loaders' outputs stay cached, as in a
    user's session; each cap has its own prompt text and seed, so T5, DiT and VAE run again)."""
    from diffusers.models.autoencoders.vae import Decoder

    decoder_calls = []
    hook = Decoder.forward

    def counted(self, *args, **kwargs):
        decoder_calls.append(1)
        return hook(self, *args, **kwargs)

    Decoder.forward = counted
    node_s: dict[str, float] = {}
    ex = Executor(on_node=lambda nid, cls, s, cpu: node_s.__setitem__(cls, node_s.get(cls, 0.0) + s),
                  client_id="gpu_check")
    out["caps"] = []
    for i, cap in enumerate(c.a.caps or [None]):
        c.unload_all()
        node_s.clear()
        decoder_calls.clear()
        c.records.take()
        text = f"{PROMPTS[0]}, {cap or 'no'} GiB card"
        with Cap(c, cap) as row:
            c.reset_peak()
            t = time.perf_counter()
            try:
                prompt = image_prompt(c.a, quant, text, seed=i)
                result = ex.run(prompt)
                row["seconds"] = time.perf_counter() - t
                if result["ok"]:
                    shape, std = _images(result)
                    row.update(ok=shape is not None and std > 0, image=shape, pixel_std=std)
                elif not result["valid"]:
                    row.update(ok=False, error=validation_message(result["error"], result["node_errors"], prompt)[:400])
                else:
                    row.update(ok=False, error=execution_message(result["error"] or {})[:400])
            except Exception as e:  # noqa: BLE001 - a failure under a cap is a result
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", seconds=time.perf_counter() - t)
            c.sync()
            row.update(peak_gib=_gib(max(0, c.peak() - row["ballast_gib"] * GiB)) if c.cuda else None,
                       node_s=dict(node_s), vae_decoder_calls=len(decoder_calls), vae_tiled=len(decoder_calls) > 1,
                       log=c.records.take())
        out["caps"].append(row)
        emit(out)
    Decoder.forward = hook


def worker_memory(a) -> dict:
    """(g) quantize into the cache and read it back, (a) reload and partial unload, (e) cosine, (b) images under
    caps, for the T5 quantization a.quant; `a.do` says which of a, b, e run."""
    c = Ctx(a)
    out: dict = {"quant": a.quant}
    t5 = _load_quantized(c, out, a.quant)
    measure.emit(out)
    if "a" in a.do:
        _reload(c, out, t5)
        measure.emit(out)
        _partial_unload(c, out, t5)
        measure.emit(out)
    if "e" in a.do:
        _cosine(c, out, t5)
        measure.emit(out)
    del t5
    c.unload_all()
    if "b" in a.do:
        _caps(c, out, a.quant, measure.emit)
    return out


def _small_conditioning(c: Ctx):
    t5 = c.node("PixArtSigmaT5Loader", t5_name=gpu.T5, quantization="none", dtype="auto")[0]
    with c.torch.inference_mode():
        return c.encode(t5, PROMPTS[0])


def worker_sdpa(a) -> dict:
    """(d) the SDPA kernels that run inside self- and cross-attention during one CFG-batched forward."""
    from diffusers import PixArtTransformer2DModel
    from torch.profiler import ProfilerActivity, profile, record_function

    c = Ctx(a)
    pos, neg = _small_conditioning(c)
    dit = c.node("PixArtSigmaDiTLoader", dit_name=gpu.DIT, variant="auto", dtype="auto")[0]
    inner = module_of(dit, PixArtTransformer2DModel)
    open_ranges: dict[int, object] = {}

    def pre(label):
        def hook(module, args):
            open_ranges[id(module)] = record_function(label)
            open_ranges[id(module)].__enter__()
        return hook

    def post(module, args, output):
        open_ranges.pop(id(module)).__exit__(None, None, None)

    handles = []
    for block in inner.transformer_blocks:
        for name, label in (("attn1", "self_attention"), ("attn2", "cross_attention")):
            m = getattr(block, name)
            handles += [m.register_forward_pre_hook(pre(label)), m.register_forward_hook(post)]
    with c.torch.inference_mode():
        c.sample(dit, pos, neg, a.size, 1)  # loads the DiT
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.cuda else [])
        with profile(activities=activities) as prof:
            c.sample(dit, pos, neg, a.size, 1)
    for h in handles:
        h.remove()
    kernels: dict[str, dict[str, int]] = {"self_attention": {}, "cross_attention": {}}
    for ev in prof.events():
        if not any(k in ev.name for k in ("scaled_dot_product", "efficient_attention", "flash_attention", "cudnn_attention")):
            continue
        parent = ev.cpu_parent
        while parent is not None and parent.name not in kernels:
            parent = parent.cpu_parent
        if parent is not None:
            kernels[parent.name][ev.name] = kernels[parent.name].get(ev.name, 0) + 1
    return {"dtype": str(inner.dtype), "kernels": kernels}


def hires_stages(smoke: bool) -> dict:
    """name -> (canvas width, height, tile width, height or None, overlap) in pixels; the smoke run's are 1/32."""
    if smoke:
        return {"1024": (32, 32, None, 0), "2048": (64, 64, None, 0), "3840x2160 tiled": (112, 64, (80, 48), 16)}
    return {"1024": (1024, 1024, None, 0), "2048": (2048, 2048, None, 0),
            "3840x2160 tiled": (3840, 2160, (2688, 1536), 256)}


def worker_hires(a) -> dict:
    """(f) the 2K DiT at 1024 and 2048 (Sampler, one step) and the tiled refine at 3840x2160 (Tiled Refine, one
    step of four 2688x1536 tiles): seconds and peak memory above the loaded weights, after one warm-up each."""
    from diffusers import PixArtTransformer2DModel

    c = Ctx(a)
    torch = c.torch
    pos, neg = _small_conditioning(c)
    dit = c.node("PixArtSigmaDiTLoader", dit_name=gpu.DIT, variant="sigma-2k", dtype="auto")[0]
    inner = module_of(dit, PixArtTransformer2DModel)
    forwards = []
    handle = inner.register_forward_pre_hook(lambda m, args: forwards.append(1))
    out = {}
    def stage(w: int, h: int, tile: tuple[int, int] | None, overlap: int):
        if tile is None:  # one sampler step: one CFG-batched forward
            return c.sample(dit, pos, neg, (w, h), 1)
        # two steps at denoise 0.5: one step runs, one forward per tile
        return c.node("PixArtSigmaTiledRefine", dit=dit, positive=pos, negative=neg,
                      latent={"samples": torch.zeros(1, 4, h // 8, w // 8)}, seed=0, steps=2, cfg=gpu.CFG,
                      scheduler=SCHEDULER, denoise=0.5, tile_width=tile[0], tile_height=tile[1], overlap=overlap)

    for name, (w, h, tile, overlap) in hires_stages(a.smoke).items():
        def run(w=w, h=h, tile=tile, overlap=overlap):
            return stage(w, h, tile, overlap)

        with torch.inference_mode():
            run()  # warm-up: loads the DiT, kernels, allocator
            c.reset_peak()
            base = c.allocated()
            forwards.clear()
            c.records.take()
            t0 = time.perf_counter()
            run()
            c.sync()
            seconds = time.perf_counter() - t0
        logged = [int(m.group(1)) for line in c.records.take() if (m := re.search(r"in (\d+) tiles", line))]
        out[name] = {"latent": [h // 8, w // 8], "tiles": logged[-1] if logged else len(forwards),
                     "dit_forwards": len(forwards), "seconds": seconds,
                     "activation_peak_gib": _gib(c.peak() - base) if c.cuda else None}
    handle.remove()
    weights_gib = sum(p.numel() * p.element_size() for p in inner.parameters()) / GiB
    return {"weights_gib": weights_gib, "dtype": str(inner.dtype), "stages": out}


WORKERS = {"weights": worker_weights, "reference": worker_reference, "memory": worker_memory, "sdpa": worker_sdpa,
           "hires": worker_hires}
