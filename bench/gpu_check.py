"""The GPU check (issue 11): one prepared run on one NVIDIA GPU that measures what the CPU test suite can only
simulate. It prints one JSON document and a table, and writes bench/out/gpu_check.json.

  (a) peak VRAM of an 8-bit T5 reload: encode prompt A, ComfyUI unloads everything, encode prompt B; and whether
      every 8-bit layer still holds one int8 copy (the bug was a second copy: +3.4 GiB for T5-XXL);
  (b) a whole 1024 px image (T5 -> DiT 20 steps -> VAE decode) under VRAM caps of 12, 8 and 6 GiB, with the T5
      in 8-bit and in nf4: whether it ran, its peak VRAM and seconds, what ComfyUI evicted or loaded partially,
      and whether the VAE tiled. A cap is torch.cuda.set_per_process_memory_fraction plus ComfyUI's own reserve
      (the memory above the cap counts as reserved), so ComfyUI plans for a card of that size;
  (c) P4 from bench/gpu.py: seconds per 1024 px image against diffusers, MFU and peak VRAM (bf16);
  (d) which SDPA kernel runs in the DiT's self- and cross-attention (torch profiler, one 1024 px forward);
  (e) cosine of the 8-bit and nf4 T5 embeddings against the bf16 T5's, on the GPU;
  (f) 1024 -> 2K -> 4K (issue 16): peak VRAM and seconds of one CFG-batched forward of the 28-block XL/2 DiT (bf16)
      at 1024x1024, at 2048x2048 and of the tiled refine at 3840x2160 (four 2688x1536 tiles, pixart_core.tiles),
      each above the weights.
  (g) issue 14: the 8-bit and nf4 T5 quantized on the GPU tensor by tensor into the quantized-T5 cache: seconds,
      peak VRAM (one tensor at a time, never the whole model), the share of int8/nf4 bytes equal to the CPU
      quantizer's for three layers, and the second (cached) load's seconds.

Weights are random and full size (T5-v1.1-XXL shape with --t5-blocks of its 24 blocks, the PixArt-Σ XL/2 1024
transformer, the SDXL VAE), written once under bench/out/. Every part runs in its own process (its own CUDA peak).
Sized to finish in under 8 minutes on an H100/H200; --budget stops starting new parts after that many seconds.

    bash bench/gpu_check.sh                     # everything
    bash bench/gpu_check.sh --t5-blocks 12      # faster: half of T5-XXL's blocks (the T5 figures are then for 12)
    ./scripts/harness bench.gpu_check --cpu-smoke   # every code path on the CPU with tiny models (no figures)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench import gpu, measure, weights
from bench.report import machine, write_json
from harness import models
from harness.comfyui import init_comfy

CAPS_GIB = (12, 8, 6)
QUANTS = {"8-bit": "8-bit (bitsandbytes)", "nf4": "4-bit nf4 (bitsandbytes)"}
PROMPTS = ("a red fox in the snow, golden light", "a lighthouse on a cliff above a stormy sea")
GiB = 1 << 30


def t5_name(blocks: int, smoke: bool) -> str:
    return "t5-tiny_fp16.safetensors" if smoke else f"t5xxl-random-{blocks}blocks_bf16.safetensors"


def prepare_t5(base: Path, blocks: int, smoke: bool) -> Path:
    """A T5 with T5-v1.1-XXL's shapes (width 4096, 64 heads, d_ff 10240) and `blocks` blocks, random, bf16; built on
    the GPU (seconds) and written once."""
    import torch
    from safetensors.torch import save_file

    path = base / "models" / "text_encoders" / t5_name(blocks, smoke)
    if path.is_file():
        return path
    if smoke:
        model = models.make_t5()
    else:
        with torch.device("cuda"):
            model = models.make_t5("bench", seed=1, layers=blocks).to(torch.bfloat16)
    save_file(models.t5_single_file_sd(model, dtype=torch.bfloat16), str(path.with_suffix(".part")))
    path.with_suffix(".part").rename(path)
    return path


# ---------------------------------------------------------------------------------------------------- workers


class _Records(logging.Handler):
    """ComfyUI's and the pack's log lines about evicting, partial loads and tiles, kept for the report."""

    KEEP = ("Unloading", "loaded partially", "loaded completely", "models unloaded", "Unloaded partially", "tiles")

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if any(k in msg for k in self.KEEP):
            self.lines.append(msg[:200])


def _pack(module: str):
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


def _worker_setup(a):
    init_comfy(Path(a.base), cpu=a.smoke)
    import torch

    import comfy.model_management as mm
    import nodes

    records = _Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    return torch, mm, nodes.NODE_CLASS_MAPPINGS, mm.get_torch_device(), records


def _encode(N, t5, prompt: str):
    pos, _ = N["PixArtSigmaTextEncode"].execute(t5=t5, positive=prompt, negative="", max_tokens=300).result
    return pos


def worker_reference(a) -> dict:
    """(e) the bf16 T5's embeddings of the prompts on the device, saved for the quantized workers."""
    torch, mm, N, device, _ = _worker_setup(a)
    t5 = N["PixArtSigmaT5Loader"].execute(t5_name=a.t5, quantization="none", dtype="bf16").result[0]
    with torch.inference_mode():
        embeds = [_encode(N, t5, p).embeds for p in PROMPTS]
    torch.save(embeds, Path(a.base) / "t5_reference.pt")
    return {"device": str(device)}


def _cap(torch, mm, device, gib: float | None) -> None:
    """Make this process see a card of `gib` GiB: torch refuses allocations above it, ComfyUI reserves the rest."""
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total), device)
    mm.EXTRA_RESERVED_VRAM = int(total - gib * GiB) + 400 * 2**20


def worker_memory(a) -> dict:
    """(a) for 8-bit, (b) and (e) for the T5 quantization `a.quant`."""
    torch, mm, N, device, records = _worker_setup(a)
    quant = _pack("pixart_core.quant")
    text = _pack("nodes.text")
    vae_nodes = _pack("nodes.vae")
    out: dict = {"quant": a.quant}
    t = time.perf_counter()
    t5 = N["PixArtSigmaT5Loader"].execute(t5_name=a.t5, quantization=QUANTS[a.quant], dtype="auto").result[0]
    out["t5_load_s"] = time.perf_counter() - t
    out["t5_model_gib"] = t5.patcher.model_size() / GiB

    # (a) encode A, unload everything, encode B: the reload's peak against the first load's
    peaks = []
    for prompt in PROMPTS:
        mm.unload_all_models()
        mm.soft_empty_cache()
        gpu._reset_peak(device)
        with torch.inference_mode():
            _encode(N, t5, prompt)
        peaks.append(gpu._peak(device)["peak_allocated"])
    out["reload"] = {"first_peak_gib": peaks[0] / GiB, "reload_peak_gib": peaks[1] / GiB,
                     "int8_copies_per_layer": sorted(set(quant.int8_copies(t5.patcher.model.inner)))}

    # (e) cosine against the bf16 T5 on the device
    ref = torch.load(Path(a.base) / "t5_reference.pt")
    text.EMBEDDINGS.clear()
    with torch.inference_mode():
        mine = [_encode(N, t5, p).embeds for p in PROMPTS]
    out["cosine_vs_bf16"] = [float(torch.nn.functional.cosine_similarity(m.flatten().float(), r.flatten().float(),
                                                                          dim=0)) for m, r in zip(mine, ref)]

    # (b) whole images under caps
    dit = N["PixArtSigmaDiTLoader"].execute(dit_name=gpu.DIT, variant="auto", dtype="auto").result[0]
    vae = N["PixArtSigmaVAELoader"].execute(vae_name=gpu.VAE, dtype="auto").result[0]
    decided = []
    load_for = vae_nodes.load_for

    def spy(*args, **kwargs):
        ready, tiled = load_for(*args, **kwargs)
        decided.append(tiled)
        return ready, tiled

    vae_nodes.load_for = spy
    out["caps"] = []
    for cap in (a.caps or [None]):
        mm.unload_all_models()
        text.EMBEDDINGS.clear()
        mm.soft_empty_cache()
        _cap(torch, mm, device, cap)
        records.lines.clear()
        decided.clear()
        gpu._reset_peak(device)
        row = {"cap_gib": cap}
        t = time.perf_counter()
        try:
            with torch.inference_mode():
                pos, neg = N["PixArtSigmaTextEncode"].execute(t5=t5, positive=PROMPTS[0], negative="",
                                                              max_tokens=300).result
                latent = N["PixArtSigmaSampler"].execute(dit=dit, positive=pos, negative=neg, seed=0, steps=a.steps,
                                                         cfg=gpu.CFG, scheduler="dpm++ 2m", width=a.size,
                                                         height=a.size, batch_size=1).result[0]
                image = N["PixArtSigmaVAEDecode"].execute(vae=vae, samples=latent, tiling="auto").result[0]
            gpu._sync(device)
            row.update(ok=bool(torch.isfinite(image).all()), image=list(image.shape))
        except Exception as e:  # an OOM under the cap is a result, not a crash of the check
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        row.update(seconds=time.perf_counter() - t, peak_gib=gpu._peak(device)["peak_allocated"] / GiB,
                   vae_tiled=decided[-1] if decided else None, log=records.lines[-12:])
        out["caps"].append(row)
    _cap(torch, mm, device, None)
    return out


def worker_sdpa(a) -> dict:
    """(d) the SDPA kernels that run inside self- and cross-attention during one CFG-batched forward."""
    torch, mm, N, device, _ = _worker_setup(a)
    from torch.profiler import ProfilerActivity, profile, record_function

    conditioning = _pack("pixart_core.conditioning")
    dit = N["PixArtSigmaDiTLoader"].execute(dit_name=gpu.DIT, variant="auto", dtype="auto").result[0]
    inner = dit.patcher.model.inner
    width = inner.config.caption_channels
    # real prompts are short and the empty negative is one token: padded to the longest, so cross-attention is masked
    pos = conditioning.Conditioning(torch.randn(1, 24, width), torch.ones(1, 24, dtype=torch.long))
    neg = conditioning.Conditioning(torch.randn(1, 1, width), torch.ones(1, 1, dtype=torch.long))
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
    run = lambda: N["PixArtSigmaSampler"].execute(dit=dit, positive=pos, negative=neg, seed=0, steps=1, cfg=gpu.CFG,  # noqa: E731
                                                  scheduler="dpm++ 2m", width=a.size, height=a.size, batch_size=1)
    with torch.inference_mode():
        run()  # loads the DiT
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run()
    for h in handles:
        h.remove()
    kernels: dict[str, dict[str, int]] = {"self_attention": {}, "cross_attention": {}}
    for ev in prof.events():
        name = ev.name
        if not any(k in name for k in ("scaled_dot_product", "efficient_attention", "flash_attention", "cudnn_attention")):
            continue
        parent = ev.cpu_parent
        while parent is not None and parent.name not in kernels:
            parent = parent.cpu_parent
        if parent is not None:
            kernels[parent.name][name] = kernels[parent.name].get(name, 0) + 1
    return {"dtype": str(inner.dtype), "kernels": kernels}


def worker_hires(a) -> dict:
    """(f) one forward per hires stage: peak memory above the loaded weights, and seconds."""
    import torch

    from pixart_core import tiles

    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    dit = models.make_dit("tiny" if a.smoke else "bench", variant="sigma-2k").to(device, dtype)
    width = dit.config.caption_channels
    scale = 32 if a.smoke else 1  # smoke: the same stages at 1/32 of the size
    stages = {"1024": (1024, 1024, None), "2048": (2048, 2048, None), "3840x2160 tiled": (3840, 2160, (2688, 1536))}
    out = {}
    for name, (w, h, tile) in stages.items():
        h8, w8 = h // 8 // scale // 2 * 2, w // 8 // scale // 2 * 2
        model = dit
        if tile:
            th8, tw8 = tile[1] // 8 // scale // 2 * 2, tile[0] // 8 // scale // 2 * 2
            layout = tiles.layout(h8, w8, th8, tw8, 32 // scale or 1)
            model = tiles.TiledDiT(dit, layout, (h8, w8))
        x = torch.randn(2, 4, h8, w8, device=device, dtype=dtype)
        kw = dict(encoder_hidden_states=torch.randn(2, 20, width, device=device, dtype=dtype),
                  timestep=torch.tensor([500, 500], device=device),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
        with torch.inference_mode():
            model(x, **kw)  # warm-up (kernels, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            model(x, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / GiB if device.type == "cuda" else None
        out[name] = {"latent": [h8, w8], "tiles": len(layout) if tile else 1, "seconds": seconds,
                     "activation_peak_gib": peak}
    weights_gib = sum(p.numel() * p.element_size() for p in dit.parameters()) / GiB
    return {"weights_gib": weights_gib, "stages": out}



def worker_t5_gpu_quant(a) -> dict:
    """(g) quantize-once on the GPU: pixart_core.t5.load_t5 with a cache folder and quantize_device=cuda."""
    import shutil

    torch, mm, N, device, _ = _worker_setup(a)
    import importlib

    ct5 = _pack("pixart_core.t5")
    t5_cache = importlib.import_module(ct5.__name__.rsplit(".", 1)[0] + ".t5_cache")
    t5_quantize = importlib.import_module(ct5.__name__.rsplit(".", 1)[0] + ".t5_quantize")
    path = Path(a.base) / "models" / "text_encoders" / a.t5
    out = {}
    for q in QUANTS:
        cache = Path(a.base) / "t5_gpu_cache"
        shutil.rmtree(cache, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        kind = "8bit" if q == "8-bit" else "nf4"  # the core's quantization ids (pixart_core.t5_spec)
        t = time.perf_counter()
        first = ct5.load_t5(path, kind, torch.bfloat16, cache_dir=cache, quantize_device=device)
        first_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
        model_gib = first.model.get_memory_footprint() / GiB
        t = time.perf_counter()
        again = ct5.load_t5(path, kind, torch.bfloat16, cache_dir=cache, quantize_device=device)
        cached_s = time.perf_counter() - t
        # the GPU's quantized bytes against the CPU quantizer's, for three layers (read from the cache file)
        from safetensors import safe_open

        keys = ["encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                "encoder.block.1.layer.0.SelfAttention.o.weight"]
        same = []
        with safe_open(str(path), framework="pt") as src, \
                safe_open(str(again.cache.entry / t5_cache.WEIGHTS), framework="pt") as cached:
            for k in keys:
                if k not in src.keys():
                    continue
                cpu = t5_quantize.quantize_weight(k, src.get_tensor(k).to(torch.bfloat16), kind, torch.device("cpu"))[k]
                same.append(float((cpu == cached.get_tensor(k)).float().mean()))
        out[q] = {"first_s": first_s, "quantized_on": first.cache.quantized_on, "peak_vram_gib": peak,
                  "model_gib": model_gib, "cached_s": cached_s, "cached_hit": again.cache.hit,
                  "equal_bytes_vs_cpu": same}
        del first, again
    return out


WORKERS = {"reference": worker_reference, "memory": worker_memory, "sdpa": worker_sdpa, "hires": worker_hires,
           "t5_gpu_quant": worker_t5_gpu_quant}


# ---------------------------------------------------------------------------------------------------- parent


def run_worker(a, kind: str, *extra: str) -> dict:
    args = ["--worker", kind, "--base", str(a.base), "--t5", a.t5, "--size", str(a.size),
            "--steps", str(a.steps), "--caps", ",".join(map(str, a.caps)), *extra]
    args += ["--cpu-smoke"] if a.cpu_smoke else []
    out, stderr, seconds = measure.worker_result(__spec__.name, args, a.timeout)
    if out is None:
        measure.log(f"{kind} {' '.join(extra)}: failed\n{stderr[-4000:]}")
        return {"error": stderr[-2000:], "process_s": seconds}
    out["process_s"] = seconds
    return out


def table(report: dict) -> str:
    rows = ["| part | what | result |", "|---|---|---|"]
    for q, m in report.get("memory", {}).items():
        if "error" in m:
            rows.append(f"| (b) | T5 {q} | worker failed |")
            continue
        if "reload" in m and q == "8-bit":
            r = m["reload"]
            rows.append(f"| (a) | 8-bit T5 peak VRAM, first load / reload | {r['first_peak_gib']:.2f} / "
                        f"{r['reload_peak_gib']:.2f} GiB; int8 copies per layer {r['int8_copies_per_layer']} |")
        rows.append(f"| (e) | T5 {q} cosine vs bf16 | {', '.join(f'{c:.4f}' for c in m['cosine_vs_bf16'])} |")
        for c in m["caps"]:
            what = f"1024 px image, T5 {q}, cap {c['cap_gib']} GiB" if c["cap_gib"] else f"image, T5 {q}, no cap"
            res = (f"ok, {c['seconds']:.1f} s, peak {c['peak_gib']:.2f} GiB, VAE tiled: {c['vae_tiled']}"
                   if c["ok"] else f"failed: {c.get('error', 'non-finite image')[:80]}")
            rows.append(f"| (b) | {what} | {res} |")
    for q, r in report.get("t5_gpu_quant", {}).items():
        if isinstance(r, dict) and "first_s" in r:
            rows.append(f"| (g) | T5 {q} quantized on {r['quantized_on']} into the cache, then cached load | "
                        f"{r['first_s']:.1f} s (peak VRAM {r['peak_vram_gib'] or 0:.2f} GiB, model "
                        f"{r['model_gib']:.2f} GiB), cached {r['cached_s']:.1f} s; bytes equal to CPU's: "
                        f"{r['equal_bytes_vs_cpu']} |")
    p4 = report.get("p4", {})
    for k, v in p4.get("median_s_per_image", {}).items():
        rows.append(f"| (c) | P4 s/image {k} | {v:.2f} |")
    sdpa = report.get("sdpa", {})
    for where, ks in sdpa.get("kernels", {}).items():
        rows.append(f"| (d) | {where} ({sdpa.get('dtype')}) | {', '.join(f'{k} x{n}' for k, n in ks.items()) or 'none seen'} |")
    hires = report.get("hires", {})
    for name, st in hires.get("stages", {}).items():
        peak = f"{st['activation_peak_gib']:.2f} GiB above {hires['weights_gib']:.2f} GiB of weights" \
            if st["activation_peak_gib"] is not None else "(CPU)"
        rows.append(f"| (f) | DiT forward {name} ({st['tiles']} tile(s)) | {st['seconds']:.2f} s, peak {peak} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t5-blocks", type=int, default=24, help="T5-XXL blocks to build (24 = the real model)")
    ap.add_argument("--caps", default=",".join(map(str, CAPS_GIB)), help="VRAM caps in GiB for (b)")
    ap.add_argument("--budget", type=float, default=460, help="seconds after which no new part starts")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per worker process")
    ap.add_argument("--cpu-smoke", action="store_true", help="every code path on the CPU with tiny models")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--t5", help=argparse.SUPPRESS)
    ap.add_argument("--quant", choices=list(QUANTS), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.smoke = a.cpu_smoke
    a.caps = [float(c) for c in str(a.caps).split(",") if c] if not a.cpu_smoke else []
    if a.worker:
        import torch

        torch.manual_seed(0)
        measure.emit(WORKERS[a.worker](a))
        return

    import torch

    start = time.perf_counter()
    if a.cpu_smoke:
        a.size, a.steps, base, device_name = 64, 2, gpu.SMOKE_OUT, "CPU smoke test (tiny models: the numbers mean nothing)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_check.py needs an NVIDIA GPU; --cpu-smoke checks it on the CPU.")
        base, device_name = gpu.OUT, torch.cuda.get_device_name()
    a.base = base
    gpu.prepare(Path(base), a.cpu_smoke)
    a.t5 = prepare_t5(Path(base), a.t5_blocks, a.cpu_smoke).name
    measure.log(f"weights ready in {time.perf_counter() - start:.0f} s")
    report: dict = {"device": device_name, "t5_blocks": None if a.cpu_smoke else a.t5_blocks, "size": a.size,
                    "steps": a.steps, "machine": machine(), "memory": {}}
    skipped = []

    def due(part: str) -> bool:
        if time.perf_counter() - start > a.budget:
            skipped.append(part)
            return False
        measure.log(f"{part} ...")
        return True

    if due("(e) bf16 reference"):
        report["reference"] = run_worker(a, "reference")
    for q in QUANTS:
        if due(f"(a)(b)(e) T5 {q}"):
            report["memory"][q] = run_worker(a, "memory", "--quant", q)
    if due("(g) T5 quantized on the GPU into the cache"):
        report["t5_gpu_quant"] = run_worker(a, "t5_gpu_quant")
    if due("(d) SDPA kernels"):
        report["sdpa"] = run_worker(a, "sdpa")
    if due("(c) P4"):
        p4 = SimpleNamespace(base=base, size=a.size, steps=a.steps, images=2 if not a.cpu_smoke else 1,
                             cpu_smoke=a.cpu_smoke, timeout=a.timeout)
        rows = [gpu.run_config(p4, system, "bf16") for system in ("ours", "diffusers")]
        peak = None if a.cpu_smoke else gpu.peak_tflops(device_name, None)
        p4_table, medians = gpu.summarize(rows, peak, a.steps)
        report["p4"] = {"rows": rows, "median_s_per_image": medians, "table": p4_table}
    if due("(f) hires stages"):
        report["hires"] = run_worker(a, "hires")
    report["skipped"] = skipped
    report["seconds"] = time.perf_counter() - start
    report["table"] = table(report)
    print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1, default=str))
    print(report["table"])
    if "p4" in report:
        print(report["p4"]["table"])
    write_json(a.out or (weights.OUT / ("gpu_check_smoke.json" if a.cpu_smoke else "gpu_check.json")), report)
    failed = [k for k, v in [("reference", report.get("reference", {}))] + list(report["memory"].items())
              + [("sdpa", report.get("sdpa", {})), ("hires", report.get("hires", {})),
                 ("t5_gpu_quant", report.get("t5_gpu_quant", {}))] if "error" in v]
    if failed:
        raise SystemExit(f"failed parts: {failed}")


if __name__ == "__main__":
    main()
