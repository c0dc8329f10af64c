"""P1 whole text-to-image: our nodes vs diffusers' PixArtSigmaPipeline vs ComfyUI's built-in PixArt, A/B alternately.

Each image is made in a fresh process (so peak RSS is per system), from the files on disk (page cache warm after the
first run) to a saved PNG: load T5 + DiT + VAE, encode the prompt and the empty negative, sample, decode, save.
  ours      this pack's nodes in ComfyUI's PromptExecutor (T5 Loader -> Text Encode, DiT Loader -> Sampler,
            VAE Loader -> VAE Decode -> SaveImage), scheduler "dpm++ 2m", every dtype "auto" (on CPUs with native
            bf16 the DiT and VAE compute in bf16); ours-fp32: the DiT and VAE set to fp32
  diffusers PixArtSigmaPipeline.from_pretrained(diffusers folder, fp32) with the same DPM-Solver++ 2M config;
            diffusers-bf16: torch_dtype=bfloat16
  comfy     ComfyUI's core nodes: UNETLoader (original-layout file), CLIPLoader type "pixart" (T5 file),
            CLIPTextEncode x2, EmptyLatentImage, KSampler dpmpp_2m / "simple", VAELoader + VAEDecode -> SaveImage;
            comfy-bf16: ComfyUI's --bf16-unet --bf16-vae --bf16-text-enc (on a CPU ComfyUI stores the DiT in bf16
            and computes it in fp32: its unet_manual_cast)
Weights: one random 512-family XL/2 set (see weights.py), the same for every system and size.
Besides the totals it prints where each system's seconds go (phase_table): ours and comfy per node of ComfyUI's
executor, diffusers per part of from_pretrained and of the pipeline call, wall and CPU seconds, medians of the runs.

    ./scripts/harness bench.p1_text_to_image                       # 256 px x 4 steps x 3, 512 px x 2 steps x 2
    ./scripts/harness bench.p1_text_to_image --sizes 256 --steps 4 --repeats 3
    ./scripts/harness bench.p1_text_to_image --sizes 256 --systems ours diffusers comfy diffusers-bf16 comfy-bf16
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from bench import measure, report, weights  # noqa: E402
from harness.comfyui import init_comfy  # noqa: E402

SYSTEMS = ["ours", "diffusers", "comfy"]
VARIANTS = ["ours-fp32", "diffusers-bf16", "comfy-bf16"]  # the same systems in another precision
SEED, CFG = 42, 4.5


def ours_prompt(a, dtype: str = "auto") -> dict:
    return {
        "1": {"class_type": "PixArtSigmaT5Loader",
              "inputs": {"t5_name": weights.t5_file(a.t5_layers), "quantization": "none", "dtype": "auto"}},
        "2": {"class_type": "PixArtSigmaTextEncode",
              "inputs": {"t5": ["1", 0], "positive": weights.PROMPT, "negative": "", "max_tokens": 300}},
        "3": {"class_type": "PixArtSigmaDiTLoader", "inputs": {"dit_name": weights.DIT_FILE, "variant": "auto", "dtype": dtype}},
        "4": {"class_type": "PixArtSigmaSampler",
              "inputs": {"dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "seed": SEED, "steps": a.steps,
                         "cfg": CFG, "scheduler": "dpm++ 2m", "width": a.size, "height": a.size, "batch_size": 1,
                         "denoise": 1.0}},
        "5": {"class_type": "PixArtSigmaVAELoader", "inputs": {"vae_name": weights.VAE_FILE, "dtype": dtype}},
        "6": {"class_type": "PixArtSigmaVAEDecode", "inputs": {"vae": ["5", 0], "samples": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench_ours"}},
    }


def comfy_prompt(a) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": weights.DIT_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": weights.t5_file(a.t5_layers), "type": "pixart", "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": weights.PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": a.size, "height": a.size, "batch_size": 1}},
        "6": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": SEED, "steps": a.steps, "cfg": CFG, "sampler_name": "dpmpp_2m",
                         "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                         "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": weights.VAE_FILE}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench_comfy"}},
    }


def patch_comfy_for_short_t5(t5_layers: int) -> None:
    """ComfyUI recognises T5-XXL only by its 24th block and builds a fixed 24-block config. For the few-block bench
    T5 (real width 4096) make CLIPLoader take it as T5-XXL with `t5_layers` blocks; nothing else changes."""
    import comfy.sd

    detect = comfy.sd.detect_te_model

    def detect_short(sd):
        k = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
        if k in sd and sd[k].shape[-1] == 4096 and f"encoder.block.{t5_layers}.layer.0.SelfAttention.q.weight" not in sd:
            return comfy.sd.TEModel.T5_XXL
        return detect(sd)

    load = comfy.sd.load_text_encoder_state_dicts

    def load_short(state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
        opts = {**model_options, "t5xxl_model_config": {"num_layers": t5_layers, "num_decoder_layers": t5_layers}}
        return load(state_dicts, embedding_directory=embedding_directory, clip_type=clip_type, model_options=opts)

    comfy.sd.detect_te_model = detect_short
    comfy.sd.load_text_encoder_state_dicts = load_short


def patch_comfy_pos_embed_at_256() -> None:
    """ComfyUI 0.3.75's PixArt computes base_size = round(latent side / 64) * 64 // 2, which is 0 for a 256 px image
    (round(0.5) == 0), and then divides by it (ZeroDivisionError, whatever the weights' family). To time its 256 px
    path at all, a zero base_size is replaced by 16 (what a 256-family model uses); the cost is the same."""
    import comfy.ldm.pixart.pixartms as pm

    orig = pm.get_2d_sincos_pos_embed_torch

    def pos_embed(embed_dim, w, h, pe_interpolation=1.0, base_size=16, **k):
        return orig(embed_dim, w, h, pe_interpolation=pe_interpolation or 0.5, base_size=base_size or 16, **k)

    pm.get_2d_sincos_pos_embed_torch = pos_embed


def image_stats(arr) -> dict:
    import numpy as np

    arr = np.asarray(arr, dtype=np.float32)
    return {"shape": list(arr.shape), "mean": float(arr.mean()), "std": float(arr.std())}


def worker(a) -> None:
    base = weights.work_dir(a.dit_layers, a.t5_layers)
    timers = measure.Timers()
    system, _, precision = a.worker.partition("-")
    if system in ("ours", "comfy"):
        init_comfy(base, pack=system == "ours")
    if a.worker == "comfy-bf16":
        from comfy.cli_args import args

        args.bf16_unet = args.bf16_vae = args.bf16_text_enc = True
    import numpy as np
    import torch
    from PIL import Image

    if system == "ours":
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        timers.wrap(PixArtTransformer2DModel, "forward", "dit_forward")
        timers.wrap(T5EncoderModel, "forward", "t5_forward")
        timers.wrap(AutoencoderKL, "decode", "vae_decode")
    elif system == "comfy":
        import comfy.ldm.pixart.pixartms
        import comfy.sd
        import comfy.text_encoders.t5

        patch_comfy_for_short_t5(a.t5_layers)
        if a.size < 264:
            patch_comfy_pos_embed_at_256()
        timers.wrap(comfy.ldm.pixart.pixartms.PixArtMS, "forward", "dit_forward")
        timers.wrap(comfy.text_encoders.t5.T5, "forward", "t5_forward")
        timers.wrap(comfy.sd.VAE, "decode", "vae_decode")
    else:
        from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        timers.wrap(PixArtTransformer2DModel, "forward", "dit_forward")
        timers.wrap(T5EncoderModel, "forward", "t5_forward")
        timers.wrap(AutoencoderKL, "decode", "vae_decode")
        for cls, part in ((T5EncoderModel, "T5"), (PixArtTransformer2DModel, "DiT"), (AutoencoderKL, "VAE")):
            timers.wrap(cls, "from_pretrained", f"load {part}")  # the pipeline loads each part through its class
    startup = time.perf_counter() - T_START
    baseline = measure.rss_bytes()

    t0, c0 = time.perf_counter(), time.process_time()
    if system in ("ours", "comfy"):
        prompt = ours_prompt(a, precision or "auto") if system == "ours" else comfy_prompt(a)
        outputs = measure.run_prompt(prompt, timers)
        save = "7" if system == "ours" else "9"
        img = outputs[save]["images"][0]
        arr = np.asarray(Image.open(base / "output" / img["subfolder"] / img["filename"]))
    else:
        t, c = time.perf_counter(), time.process_time()
        pipe = PixArtSigmaPipeline.from_pretrained(str(base / "models" / "diffusers" / weights.DIT_NAME),
                                                   torch_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                                   local_files_only=True)
        timers.add("load (from_pretrained)", time.perf_counter() - t, time.process_time() - c)
        timers.mark("from_pretrained")
        pipe.set_progress_bar_config(disable=True)
        timers.wrap(pipe, "encode_prompt", "encode_prompt")
        encode = pipe.encode_prompt

        def encode_and_mark(*args, **kw):
            out = encode(*args, **kw)
            timers.mark("encode_prompt")
            return out

        pipe.encode_prompt = encode_and_mark
        decode = pipe.vae.decode

        def mark_and_decode(*args, **kw):
            timers.mark("denoising loop")
            out = decode(*args, **kw)
            timers.mark("vae decode")
            return out

        pipe.vae.decode = mark_and_decode
        t, c = time.perf_counter(), time.process_time()
        image = pipe(prompt=weights.PROMPT, negative_prompt="", num_inference_steps=a.steps, guidance_scale=CFG,
                     height=a.size, width=a.size, generator=torch.Generator("cpu").manual_seed(SEED),
                     use_resolution_binning=False, clean_caption=False).images[0]
        timers.add("pipeline call", time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        path = base / "output" / "bench_diffusers.png"
        image.save(path)
        timers.add("save", time.perf_counter() - t, time.process_time() - c)
        arr = np.asarray(Image.open(path))
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = measure.peak_rss_bytes()
    st = image_stats(arr)
    if not (st["std"] > 0.5 and np.isfinite(st["mean"])):
        raise RuntimeError(f"{a.worker}: degenerate image {st}")
    measure.emit({"system": a.worker, "size": a.size, "steps": a.steps, "total_s": total, "total_cpu_s": total_cpu,
                 "startup_s": startup, "seconds": timers.seconds, "cpu_seconds": timers.cpu_seconds, "sys_seconds": timers.sys_seconds,
                 "minor_faults": timers.minor_faults, "calls": timers.calls, "peak_rss": peak, "baseline_rss": baseline,
                 "memory_after": [{"after": l, "rss_gib": report.gib(r), "peak_gib": report.gib(p)} for l, r, p in timers.memory],
                 "image": st, "threads": torch.get_num_threads()})


def summarize(runs: list[dict], size: int, steps: int) -> dict:
    by = {s: [r for r in runs if r["system"] == s] for s in SYSTEMS + VARIANTS}
    out = {"size": size, "steps": steps, "systems": {}}
    for s, rs in by.items():
        if not rs:
            continue
        d = {"total_s": report.stats([r["total_s"] for r in rs]),
             "total_cpu_s": report.stats([r["total_cpu_s"] for r in rs]),
             "others_cpu_share": report.stats([r["others_cpu_share"] for r in rs]),
             "cpu_per_wall": report.stats([r["total_cpu_s"] / r["total_s"] for r in rs]),
             "peak_rss_gib": report.stats([report.gib(r["peak_rss"]) for r in rs]),
             "peak_over_baseline_gib": report.stats([report.gib(r["peak_rss"] - r["baseline_rss"]) for r in rs])}
        for part in ("t5_forward", "dit_forward", "vae_decode"):
            d[part + "_s"] = report.stats([r["seconds"].get(part, 0.0) for r in rs])
            d[part + "_calls"] = rs[0]["calls"].get(part, 0)
        d["other_s"] = report.stats([r["total_s"] - sum(r["seconds"].get(p, 0.0) for p in ("t5_forward", "dit_forward", "vae_decode"))
                                     for r in rs])
        out["systems"][s] = d
    ratios = {}
    for peer in ("diffusers", "comfy", *VARIANTS):
        pairs = list(zip(by.get("ours", []), by.get(peer, [])))
        if pairs:
            ratios[f"time ours/{peer}"] = report.stats([o["total_s"] / p["total_s"] for o, p in pairs])
            ratios[f"CPU time ours/{peer}"] = report.stats([o["total_cpu_s"] / p["total_cpu_s"] for o, p in pairs])
            ratios[f"peak RSS ours/{peer}"] = report.stats([o["peak_rss"] / p["peak_rss"] for o, p in pairs])
            ratios[f"DiT time ours/{peer}"] = report.stats(
                [o["seconds"]["dit_forward"] / p["seconds"]["dit_forward"] for o, p in pairs])
    out["paired_ratios"] = ratios
    if "ours" not in out["systems"]:
        return out  # the goals are about ours
    ours_t = out["systems"]["ours"]["total_s"]["median"]
    for goal, peers, target in (("goal_time", ("diffusers", "comfy"), 0.9 if size > 256 else 0.4),
                                ("goal_time_bf16", ("diffusers-bf16", "comfy-bf16"), 0.9)):
        if all(p in out["systems"] for p in peers):
            fast = min(peers, key=lambda s: out["systems"][s]["total_s"]["median"])
            out[goal] = {"faster_peer": fast, "ours_over_faster": ours_t / out["systems"][fast]["total_s"]["median"],
                         "target": target}
    if "diffusers" in out["systems"]:
        out["goal_rss"] = {"ours_over_diffusers": out["systems"]["ours"]["peak_rss_gib"]["median"]
                           / out["systems"]["diffusers"]["peak_rss_gib"]["median"], "target": 1.0}
    return out


def print_summary(s: dict) -> str:
    rows = []
    for name, d in s["systems"].items():
        rows.append([name, d["total_s"]["median"], d["total_s"]["min"], d["total_s"]["max"],
                     f"{d['total_cpu_s']['median']:.1f} ({d['cpu_per_wall']['min']:.2f})",
                     f"{d['others_cpu_share']['median']:.0%} ({d['others_cpu_share']['max']:.0%})",
                     f"{d['t5_forward_s']['median']:.2f} ({d['t5_forward_calls']})",
                     f"{d['dit_forward_s']['median']:.2f} ({d['dit_forward_calls']})",
                     f"{d['vae_decode_s']['median']:.2f}", f"{d['other_s']['median']:.2f}",
                     f"{d['peak_rss_gib']['median']:.2f}", f"{d['peak_over_baseline_gib']['median']:.2f}"])
    text = [f"P1 {s['size']} px, {s['steps']} steps, n = {next(iter(s['systems'].values()))['total_s']['n']} per system",
            report.md_table(["system", "total s (median)", "min", "max", "CPU s (min CPU/wall)", "others' CPU share (max)", "T5 s (calls)", "DiT s (calls)", "VAE decode s",
                             "other s (load, glue)", "peak RSS GiB", "peak - baseline GiB"], rows), ""]
    rrows = [[k, v["median"], v["min"], v["max"]] for k, v in s["paired_ratios"].items()]
    text += [report.md_table(["paired ratio", "median", "min", "max"], rrows)]
    for key in ("goal_time", "goal_time_bf16"):
        if key in s:
            g = s[key]
            text.append(f"\ngoal time <= {g['target']} x faster peer ({g['faster_peer']}): {g['ours_over_faster']:.3f} "
                        f"({'met' if g['ours_over_faster'] <= g['target'] else 'missed'})")
    if "goal_rss" in s:
        g = s["goal_rss"]
        text.append(f"goal peak RSS <= 1.0 x diffusers: {g['ours_over_diffusers']:.3f} "
                    f"({'met' if g['ours_over_diffusers'] <= 1.0 else 'missed'})")
    text += ["", phase_table(s)]
    out = "\n".join(text)
    print(out, flush=True)
    return out


# Where each system's seconds go, in run order; ours and comfy: per node (ComfyUI's executor); diffusers: its parts.
FORWARDS = ("t5_forward", "dit_forward", "vae_decode")


def phases(run: dict) -> dict[str, tuple[float, float]]:
    """{phase: (wall s, CPU s)} of one run: start-up (imports, before the clock), the loaders, encode, sample,
    decode and save, each with the model forwards inside it, and what nothing above covers."""
    sec, cpu = run["seconds"], run["cpu_seconds"]
    out = {"start-up (imports; not in total)": (run["startup_s"], float("nan"))}
    labels = [k for k in sec if k.startswith("node ")] or [
        "load T5", "load DiT", "load VAE", "load (from_pretrained)", "encode_prompt", "pipeline call", "save"]
    for k in labels:
        out[k] = (sec.get(k, 0.0), cpu.get(k, 0.0))
    if "load (from_pretrained)" in out:  # the parts' loads are inside it, the encode inside the call
        parts = [out[k] for k in ("load T5", "load DiT", "load VAE")]
        w, c = out.pop("load (from_pretrained)")
        out["load (rest: tokenizer, scheduler, pipeline)"] = (w - sum(p[0] for p in parts), c - sum(p[1] for p in parts))
        w, c = out.pop("pipeline call")
        e = out["encode_prompt"]
        out["sample (pipeline call less encode and decode)"] = (w - e[0] - sec["vae_decode"],
                                                                c - e[1] - cpu["vae_decode"])
        out["vae_decode"] = (sec["vae_decode"], cpu["vae_decode"])
        out = {k: out[k] for k in ["start-up (imports; not in total)", "load T5", "load DiT", "load VAE",
                                    "load (rest: tokenizer, scheduler, pipeline)", "encode_prompt",
                                    "sample (pipeline call less encode and decode)", "vae_decode", "save"]}
    counted = [v for k, v in out.items() if not k.startswith("start-up")]
    out["not in any phase"] = (run["total_s"] - sum(v[0] for v in counted), run["total_cpu_s"] - sum(v[1] for v in counted))
    for f in FORWARDS:  # the forwards inside the phases, for reading the glue off
        out[f"  of which {f}"] = (sec.get(f, 0.0), cpu.get(f, 0.0))
    return out


def phase_table(s: dict) -> str:
    """Per system, each phase's median wall and CPU seconds over its runs (summarize's result with "runs")."""
    import statistics

    rows = []
    for name in s["systems"]:
        per = [phases(r) for r in s["runs"] if r["system"] == name]
        for k in per[0]:
            w = statistics.median(p[k][0] for p in per)
            c = statistics.median(p[k][1] for p in per)
            rows.append([name, k, f"{w:.2f}", "-" if c != c else f"{c:.2f}"])
    return report.md_table(["system", "phase", "wall s (median)", "CPU s (median)"], rows)


def files_for(system: str, base: Path, t5_layers: int) -> list[Path]:
    m = base / "models"
    if system.startswith("diffusers"):
        return [m / "diffusers" / weights.DIT_NAME]
    return [m / "diffusion_models" / weights.DIT_FILE, m / "text_encoders" / weights.t5_file(t5_layers), m / "vae" / weights.VAE_FILE]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2], help="steps per size (one value: all sizes)")
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 2], help="runs per system per size")
    ap.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS + VARIANTS)
    ap.add_argument("--dit-layers", type=int, default=28)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--out", default=str(weights.OUT / "p1_text_to_image.json"))
    ap.add_argument("--worker", choices=SYSTEMS + VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.steps = a.steps[0]
        worker(a)
        return

    weights.build(str(a.dit_layers), str(a.t5_layers))
    per = lambda v, i: v[i] if i < len(v) else v[-1]  # noqa: E731
    result = {"machine": report.machine(), "model": f"PixArt XL/2 512-family random, {a.dit_layers} blocks; "
              f"T5 width 4096 x {a.t5_layers} blocks (fp16 file); SDXL VAE random", "prompt": weights.PROMPT,
              "seed": SEED, "cfg": CFG, "sizes": []}
    texts = []
    for i, size in enumerate(a.sizes):
        steps, repeats = per(a.steps, i), per(a.repeats, i)
        runs = []
        for order in report.rotations(a.systems, repeats):
            for system in order:
                la = report.loadavg()
                r = measure.run_quiet(__spec__.name, ["--worker", system, "--size", str(size), "--steps", str(steps),
                                                       "--dit-layers", str(a.dit_layers), "--t5-layers", str(a.t5_layers)],
                                      weights.OUT / "logs" / f"p1_{system}.log",
                                      warm=files_for(system, weights.work_dir(a.dit_layers, a.t5_layers), a.t5_layers))
                r["loadavg_before"] = la
                runs.append(r)
                measure.log(f"P1 {size}px {system}: {r['total_s']:.1f} s (CPU {r['total_cpu_s']:.1f} s), peak RSS "
                           f"{report.gib(r['peak_rss']):.2f} GiB; others used {r['others_cpu_share']:.0%} of the CPUs; "
                           f"{r['major_page_faults']} major page faults; try {r['attempts']}")
        s = summarize(runs, size, steps)
        s["runs"] = runs
        result["sizes"].append(s)
        texts.append(print_summary(s))
    report.publish(result, "\n\n".join(texts), a.out, show=False)  # print_summary printed each


if __name__ == "__main__":
    main()
