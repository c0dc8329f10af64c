"""Where our time goes: profile one CFG-batched DiT forward and the T5 encode, and measure the padding / mask options.

Every "would save" figure below is measured here, A/B alternately (median of --repeats), on the bench weight set:
  1. torch.profiler of one CFG-batched forward (300-token masked captions, as diffusers feeds it): top ops.
  2. Per-module time of one forward (self-attention, cross-attention K/V projections, cross-attention rest, MLP, ...).
  3. DiT forward with captions padded to 300 + mask (diffusers; our encoder until 157fd2b) vs trimmed to the longest
     real caption + mask (ours since 157fd2b) (exactness
     checked: max |difference| of the outputs).
  4. SDPA at the cross-attention shape: diffusers' float additive mask (per head) vs a bool mask vs no mask vs trimmed.
  5. T5 encode of the positive + empty negative: padded to 300 + mask (diffusers) vs trimmed to the real tokens
     (exactness checked on the real tokens' outputs).
  6. Host<->device sync points of our sampling loop: ops that force a sync on a GPU (item / nonzero / tolist ...),
     counted with a TorchDispatchMode on the CPU run.
  7. VAE decode (diffusers AutoencoderKL, as our VAE Decode runs it) in the default vs channels_last memory format.

    ./scripts/harness bench.profile_forward --size 256 --repeats 3
    ./scripts/harness bench.profile_forward --parts vae --vae-sizes 256 512 --out bench/out/profile_vae.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from pathlib import Path

from bench import measure, report, weights
from harness.location import comfyui_path


DISTURBED: list[float] = []  # others' CPU share during every timed run


def ab(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each callable `repeats` times, rotating the order every round (waiting for a quiet machine)."""
    out = {k: [] for k in fns}
    for order in report.rotations(list(fns), repeats):
        for k in order:
            m = measure.measure(fns[k])
            out[k].append(m["s"])
            DISTURBED.append(m["others_cpu_share"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real-tokens", type=int, default=0, help="positive caption length (0: tokenize the bench prompt)")
    ap.add_argument("--dit-layers", type=int, default=28)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["t5", "dit", "vae"], choices=["t5", "dit", "vae"],
                    help="t5: padding (5); dit: profiler, modules, padding, SDPA masks, syncs (1-4, 6); vae: (7)")
    ap.add_argument("--vae-sizes", type=int, nargs="+", default=[256], help="image sizes for the VAE part")
    ap.add_argument("--out", default=str(weights.OUT / "profile_forward.json"))
    a = ap.parse_args()
    weights.build(str(a.dit_layers), str(a.t5_layers))

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from pixart_core import sampling
    from pixart_core.conditioning import Conditioning
    from pixart_core import t5 as core_t5
    from pixart_core import transformer as core_dit

    base = weights.work_dir(a.dit_layers, a.t5_layers)
    models = base / "models"
    result: dict = {"machine": report.machine(), "size": a.size}
    md: list[str] = []

    # ---- real conditioning from our T5 path (tokenizer shipped by ComfyUI)
    tok = core_t5.load_tokenizer([comfyui_path() / "comfy" / "text_encoders" / "t5_tokenizer"])
    t5 = core_t5.load_t5(models / "text_encoders" / weights.t5_file(a.t5_layers), "none", torch.float32)
    import inspect

    # diffusers' padded [1, 300] tensors (our encode pads only when asked since 157fd2b; before, it always padded)
    kw = {"pad": True} if "pad" in inspect.signature(core_t5.encode).parameters else {}
    pe, pm = core_t5.encode(t5, tok, weights.PROMPT, 300, torch.device("cpu"), **kw)
    ne, nm = core_t5.encode(t5, tok, "", 300, torch.device("cpu"), **kw)
    result["our_encode_pads"] = not kw
    real = int(pm.sum()) if not a.real_tokens else a.real_tokens
    if a.real_tokens:
        pm = torch.tensor([[1] * real + [0] * (300 - real)])
    result["real_tokens"] = {"positive": real, "negative": int(nm.sum())}
    md.append(f"Captions: positive {real} real tokens, negative {int(nm.sum())} (of 300).")

    if "t5" in a.parts:
        # ---- 5. T5 padding
        def t5_run(length):
            ids_p = tok([core_t5.preprocess(weights.PROMPT)], padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt")
            ids_n = tok([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            with torch.no_grad():
                return [t5.model(input_ids=i.input_ids, attention_mask=i.attention_mask).last_hidden_state for i in (ids_p, ids_n)]

        full = t5_run(300)
        trim = t5_run(real)
        t5_diff = max(float((full[0][:, :real] - trim[0][:, :real]).abs().max()),
                      float((full[1][:, :1] - trim[1][:, :1]).abs().max()))
        t5_times = ab({"padded 300 + mask (diffusers)": lambda: t5_run(300), f"trimmed to {real}": lambda: t5_run(real)},
                      a.repeats)
        result["t5"] = {"layers": a.t5_layers, "seconds": {k: report.stats(v) for k, v in t5_times.items()},
                        "max_abs_diff_real_tokens": t5_diff}
        rows = [[k, statistics.median(v), min(v), max(v), statistics.median(v) / a.t5_layers] for k, v in t5_times.items()]
        md.append(f"\nT5 encode of positive + empty negative (width 4096, {a.t5_layers} blocks, fp32), n = {a.repeats}\n"
                  + report.md_table(["T5 input", "median s", "min", "max", "s per block"], rows)
                  + f"\nmax |difference| on the real tokens' outputs, padded vs trimmed: {t5_diff:.2e}")
        del t5, full, trim

    if "dit" in a.parts:
        # ---- DiT
        dit = core_dit.load_dit(models / "diffusion_models" / weights.DIT_FILE, "auto", torch.float32)[0]
        torch.manual_seed(0)
        n = a.size // 8
        x = torch.randn(2, 4, n, n)
        t = torch.tensor([500.0, 500.0])
        enc = torch.cat([ne, pe])
        mask = torch.cat([nm, pm])
        L = max(real, int(nm.sum()))
        added = {"resolution": None, "aspect_ratio": None}

        def fwd(e, m):
            with torch.no_grad():
                return dit(x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=t, added_cond_kwargs=added,
                           return_dict=False)[0]

        fwd(enc, mask)  # warm-up

        # 1. profiler
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fwd(enc, mask)
        avgs = prof.key_averages(group_by_input_shape=True)
        (weights.OUT / "profile_forward_table.txt").write_text(avgs.table(sort_by="self_cpu_time_total", row_limit=40))
        total_us = sum(e.self_cpu_time_total for e in avgs)
        top = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:16]
        result["profiler_top_self_cpu"] = [{"op": e.key, "shapes": str(e.input_shapes), "self_ms": e.self_cpu_time_total / 1000,
                                            "share": e.self_cpu_time_total / total_us, "calls": e.count} for e in top]
        by_op: dict[str, float] = defaultdict(float)
        for e in avgs:
            by_op[e.key] += e.self_cpu_time_total
        result["profiler_by_op"] = {k: v / total_us for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]}
        md.append(f"\ntorch.profiler, one CFG-batched forward at {a.size} px (padded 300 + mask), self CPU time by op: "
                  + ", ".join(f"{k} {v:.1%}" for k, v in list(result["profiler_by_op"].items())[:7])
                  + "\n\nTop (op, input shapes)\n"
                  + report.md_table(["op", "input shapes", "self ms", "share", "calls"],
                                    [[e.key, str(e.input_shapes)[:70], e.self_cpu_time_total / 1000,
                                      f"{e.self_cpu_time_total / total_us:.1%}", e.count] for e in top]))

        # 2. per-module time (forward hooks; CPU ops are synchronous)
        spent: dict[str, float] = defaultdict(float)
        starts: dict[int, float] = {}

        def label(name: str) -> str | None:
            parts = name.split(".")
            if parts[0] != "transformer_blocks" or len(parts) < 3:
                return {"pos_embed": "patch embed", "caption_projection": "caption projection (all tokens)",
                        "adaln_single": "timestep embed", "proj_out": "final layer"}.get(name)
            rest = ".".join(parts[2:])
            return {"attn1": "self-attention (all)", "attn2": "cross-attention (all)", "attn2.to_k": "cross-attn K proj",
                    "attn2.to_v": "cross-attn V proj", "attn2.to_q": "cross-attn Q proj", "attn2.to_out.0": "cross-attn out proj",
                    "ff": "MLP", "norm1": "layer norms", "norm2": "layer norms"}.get(rest)

        hooks = []
        for name, mod in dit.named_modules():
            lab = label(name)
            if lab:
                hooks.append(mod.register_forward_pre_hook(lambda m, i, k=id(mod): starts.__setitem__(k, time.perf_counter())))
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, k=id(mod), lab=lab: spent.__setitem__(lab, spent[lab] + time.perf_counter() - starts[k])))
        runs: dict[str, list[dict]] = defaultdict(list)
        cases = {"padded 300 + mask": (enc, mask), f"trimmed to {L} + mask": (enc[:, :L], mask[:, :L])}
        for order in report.rotations(list(cases), a.repeats):
            for tag in order:
                spent.clear()
                tt = time.perf_counter()
                fwd(*cases[tag])
                runs[tag].append({"forward_s": time.perf_counter() - tt, **dict(spent)})
        for h in hooks:
            h.remove()
        per_module = {tag: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in rs[0]} for tag, rs in runs.items()}
        result["per_module_s"] = per_module
        labels = sorted({k for v in per_module.values() for k in v if k != "forward_s"},
                        key=lambda k: -per_module["padded 300 + mask"].get(k, 0))
        rows = [[k] + [f"{v.get(k, 0):.3f} ({v.get(k, 0) / v['forward_s']:.1%})" for v in per_module.values()] for k in labels]
        rows.append(["whole forward"] + [f"{v['forward_s']:.3f}" for v in per_module.values()])
        md.append(f"\nPer-module time of one forward at {a.size} px (median of {a.repeats}; seconds and share of the forward)\n"
                  + report.md_table(["module (28 blocks summed)", *per_module], rows))

        # 3. padded vs trimmed forward, exactness
        o_full, o_trim = fwd(enc, mask), fwd(enc[:, :L], mask[:, :L])
        o_nomask = fwd(enc, None)
        dit_diff = float((o_full - o_trim).abs().max())
        scale = float(o_full.abs().max())
        times = ab({"padded 300 + mask (diffusers)": lambda: fwd(enc, mask),
                    f"trimmed to {L} + mask": lambda: fwd(enc[:, :L], mask[:, :L]),
                    "padded 300, no mask (wrong; mask cost only)": lambda: fwd(enc, None)}, a.repeats)
        base_t = statistics.median(times["padded 300 + mask (diffusers)"])
        result["dit_padding"] = {"seconds": {k: report.stats(v) for k, v in times.items()},
                                 "max_abs_diff_trimmed": dit_diff, "max_abs_output": scale,
                                 "max_abs_diff_no_mask": float((o_full - o_nomask).abs().max())}
        rows = [[k, statistics.median(v), min(v), max(v), f"{statistics.median(v) / base_t:.3f}"] for k, v in times.items()]
        md.append(f"\nDiT forward at {a.size} px, CFG batch 2, n = {a.repeats} (A/B rotated)\n"
                  + report.md_table(["captions", "median s", "min", "max", "vs padded"], rows)
                  + f"\nmax |out(padded) - out(trimmed)| = {dit_diff:.2e} (max |out| {scale:.2f}); "
                    f"without the mask the output differs by {result['dit_padding']['max_abs_diff_no_mask']:.2e}")

        # 4. SDPA at the cross-attention shape (per block call), mask variants
        q = torch.randn(2, 16, n * n // 4, 72)
        k = torch.randn(2, 16, 300, 72)
        v = torch.randn(2, 16, 300, 72)
        fmask = ((1 - mask.float()) * -10000.0)[:, None, None, :].expand(2, 16, 1, 300).contiguous()
        bmask = mask.bool()[:, None, None, :]

        def sdpa(m, kk, vv, reps=28):
            with torch.no_grad():
                for _ in range(reps):
                    F.scaled_dot_product_attention(q, kk, vv, attn_mask=m)

        sd_times = ab({"float additive mask [2,16,1,300] (diffusers)": lambda: sdpa(fmask, k, v),
                       "bool mask [2,1,1,300]": lambda: sdpa(bmask, k, v),
                       "no mask, 300 keys": lambda: sdpa(None, k, v),
                       f"bool mask, trimmed to {L} keys": lambda: sdpa(bmask[..., :L], k[:, :, :L], v[:, :, :L])},
                      a.repeats)
        with profile(activities=[ProfilerActivity.CPU]) as p2:
            sdpa(fmask, k, v, reps=1)
        kernels = sorted({e.key for e in p2.key_averages() if "scaled_dot_product" in e.key or e.key in ("aten::bmm", "aten::_softmax")})
        result["sdpa_cross"] = {"seconds_28_calls": {k_: report.stats(v_) for k_, v_ in sd_times.items()},
                                "kernels_float_mask": kernels}
        rows = [[k_, statistics.median(v_), min(v_), max(v_)] for k_, v_ in sd_times.items()]
        md.append(f"\nSDPA at the cross-attention shape (q {list(q.shape)}), 28 calls = one forward's worth, n = {a.repeats}\n"
                  + report.md_table(["mask", "median s", "min", "max"], rows)
                  + f"\nkernels with the float mask: {', '.join(kernels)}")

        # 6. sync points in our sampling loop (ops that would block on a GPU)
        from torch.utils._python_dispatch import TorchDispatchMode

        class CountSyncs(TorchDispatchMode):
            SYNC = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2", "item")

            def __init__(self):
                super().__init__()
                self.counts: dict[str, int] = defaultdict(int)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in self.SYNC:
                    import traceback

                    frames = [f for f in traceback.extract_stack() if "diffusers" in f.filename or "pixart_core" in f.filename]
                    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
                    self.counts[f"{name} at {where}"] += 1
                return func(*args, **(kwargs or {}))

        small = core_dit.load_dit(models / "diffusion_models" / weights.DIT_FILE, "auto", torch.float32)[0]
        small.transformer_blocks = small.transformer_blocks[:1]  # the loop's sync points do not depend on depth
        steps = 4
        noise, gen = sampling.initial_noise(0, 1, 4, 64, 64)
        with CountSyncs() as cs:
            sampling.sample(small, Conditioning(pe, pm), Conditioning(ne, nm), noise, steps=steps, cfg=4.5,
                            generator=gen)
        result["sync_ops_in_loop"] = {"steps": steps, "counts": dict(cs.counts)}
        md.append(f"\nOps that force a host<->device sync on a GPU, in our sampling loop ({steps} steps, dpm++ 2m): "
                  + ("; ".join(f"{k} x{c}" for k, c in sorted(cs.counts.items())) or "none"))

    # ---- 7. VAE decode: default (contiguous) vs channels_last memory format
    if "vae" in a.parts:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(models / "diffusers" / weights.DIT_NAME / "vae")).eval()
        vae_cl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
        result["vae_channels_last"] = {}
        for size in a.vae_sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

            def dec(model, zz):
                with torch.no_grad():
                    return model.decode(zz).sample

            diff = float((dec(vae, z) - dec(vae_cl, z.to(memory_format=torch.channels_last))).abs().max())  # + warm-up
            times = ab({"default": lambda: dec(vae, z),
                        "channels_last": lambda: dec(vae_cl, z.to(memory_format=torch.channels_last))}, a.repeats)
            result["vae_channels_last"][size] = {"seconds": {k: report.stats(v) for k, v in times.items()},
                                                 "max_abs_diff": diff}
            rows = [[k, statistics.median(v), min(v), max(v),
                     f"{statistics.median(v) / statistics.median(times['default']):.3f}"] for k, v in times.items()]
            md.append(f"\nVAE decode (SDXL VAE, diffusers AutoencoderKL, fp32) at {size} px, n = {a.repeats}\n"
                      + report.md_table(["memory format", "median s", "min", "max", "vs default"], rows)
                      + f"\nmax |difference| of the decoded images: {diff:.1e}")

    result["others_cpu_share_max"] = max(DISTURBED) if DISTURBED else None
    if DISTURBED:
        md.append(f"\nOthers' CPU share during the timed runs: median {statistics.median(DISTURBED):.0%}, "
                  f"max {max(DISTURBED):.0%}.")
    report.publish(result, "\n".join(md), a.out)


if __name__ == "__main__":
    main()
