"""Sampler time: our loop vs diffusers' PixArtSigmaPipeline on the same weights, run A/B alternately.

Also reports sampler overhead: our sampling time / (steps x one CFG-batched DiT forward).
Full-size XL/2 random weights by default (small init keeps outputs finite); --tiny for a quick check.

    .venv/bin/python bench/sampler_vs_diffusers.py --size 256 --steps 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixart_core import sampling  # noqa: E402


def build_dit(tiny: bool):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    if tiny:
        cfg = dict(num_attention_heads=2, attention_head_dim=72, num_layers=2, cross_attention_dim=144, caption_channels=64)
    else:
        cfg = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152, caption_channels=4096)
    model = PixArtTransformer2DModel(**cfg, in_channels=4, out_channels=8, sample_size=128, interpolation_scale=2,
                                     use_additional_conditions=False, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
                                     attention_bias=True, activation_fn="gelu-approximate").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.2)
    return model, cfg["caption_channels"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny model (seconds) instead of full-size XL/2")
    ap.add_argument("--out", default="bench/out/sampler_vs_diffusers.json")
    a = ap.parse_args()

    from diffusers import PixArtSigmaPipeline

    dit, width = build_dit(a.tiny)
    torch.manual_seed(1)
    pos = sampling.Conditioning(torch.randn(1, 300, width) * 0.1, torch.tensor([[1] * 20 + [0] * 280]))
    neg = sampling.Conditioning(torch.randn(1, 300, width) * 0.1, torch.tensor([[1] + [0] * 299]))
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dit,
                               scheduler=sampling.make_scheduler(sampling.DEFAULT_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)

    def ours():
        noise, gen = sampling.initial_noise(0, 1, 4, a.size, a.size)
        return sampling.sample(dit, pos, neg, noise, steps=a.steps, cfg=4.5, generator=gen)

    def theirs():
        noise, gen = sampling.initial_noise(0, 1, 4, a.size, a.size)
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask,
                    negative_prompt_embeds=neg.embeds, negative_prompt_attention_mask=neg.mask, latents=noise,
                    generator=gen, num_inference_steps=a.steps, guidance_scale=4.5, height=a.size, width=a.size,
                    output_type="latent", use_resolution_binning=False).images

    def forward():
        x = torch.randn(2, 4, a.size // 8, a.size // 8)
        with torch.no_grad():
            dit(x, encoder_hidden_states=torch.cat([neg.embeds, pos.embeds]),
                encoder_attention_mask=torch.cat([neg.mask, pos.mask]), timestep=torch.tensor([999, 999]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    timed(ours)  # warm-up both paths once
    times = {"ours": [], "diffusers": [], "forward": []}
    for _ in range(a.repeats):
        for name, fn in (("ours", ours), ("diffusers", theirs), ("forward", forward)):
            times[name].append(timed(fn)[0])
    diff = (timed(ours)[1] - timed(theirs)[1]).abs().max().item()
    ratios = [o / d for o, d in zip(times["ours"], times["diffusers"])]
    overhead = statistics.median(times["ours"]) / (a.steps * statistics.median(times["forward"]))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "model": "tiny" if a.tiny else "XL/2 full-size (random)",
        "size": a.size, "steps": a.steps, "repeats": a.repeats,
        "seconds": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
        "ratio_ours_over_diffusers": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "sampler_overhead": overhead, "max_abs_latent_diff": diff,
    }
    print(f"{'':<12}{'median s':>10}{'min':>9}{'max':>9}")
    for k, v in result["seconds"].items():
        print(f"{k:<12}{v['median']:>10.3f}{v['min']:>9.3f}{v['max']:>9.3f}")
    r = result["ratio_ours_over_diffusers"]
    print(f"ours/diffusers (paired): median {r['median']:.3f}  min {r['min']:.3f}  max {r['max']:.3f}")
    print(f"sampler overhead (ours / steps x forward): {overhead:.3f};  max |latent diff| {diff:.2e}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
