"""Bridge forward: one CFG-batched forward of the same PixArt weights as our diffusers DiT and as the bridged
ComfyUI MODEL's network (ComfyUI's PixArtMS with diffusers' position table), A/B alternately; plus the memory the
MODEL adds to the DiT (bytes of its tensors that do not share the DiT's storage).

    ./scripts/harness bench.bridge_forward --layers 4 --size 512 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="XL/2 blocks (28 in the release)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--tokens", type=int, default=27, help="caption tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--pytorch-attention", action="store_true",
                    help="ComfyUI's --use-pytorch-cross-attention (its default on CUDA; on CPUs it picks sub-quadratic)")
    a = ap.parse_args()

    import torch

    from harness import comfyui, models

    from comfy.cli_args import args

    args.use_pytorch_cross_attention = a.pytorch_attention  # read when ComfyUI's attention module is imported
    comfyui.init_comfy(quiet=True)
    import comfy.ldm.modules.attention as attention
    pack = next(m for name, m in sys.modules.items() if name.endswith(".nodes.bridge"))
    management = sys.modules[pack.__name__.rsplit(".", 1)[0] + ".comfy.loading"]
    types = sys.modules[pack.__name__.rsplit(".", 1)[0] + ".types"]
    from pixart_core.variants import PRESETS

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dit = models.make_dit("bench", layers=a.layers).to(dtype)
    patcher = management.wrap(dit, torch.device("cpu"), torch.device("cpu"))
    model = pack.to_model(types.DiTHandle(patcher, PRESETS["sigma-1024"], "bench", "bench"))
    net = model.model.diffusion_model
    dit_ptrs = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    own = sum(t.numel() * t.element_size() for t in net.state_dict().values()
              if t.untyped_storage().data_ptr() not in dit_ptrs)
    dit_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())

    torch.manual_seed(0)
    side = a.size // 8
    x = torch.randn(2, 4, side, side, dtype=dtype)
    ctx = torch.randn(2, a.tokens, 4096, dtype=dtype)
    t = torch.tensor([500.0, 500.0])
    added = {"resolution": None, "aspect_ratio": None}

    def ours():
        return dit(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs=added, return_dict=False)[0]

    def bridged():
        return net(x, t, ctx)

    times = {"diffusers DiT": [], "bridged MODEL": []}
    with torch.no_grad():
        diff = (ours()[:, :4].float() - bridged().float()).abs().max().item()  # also warms both up
        for r in range(a.repeats):
            order = list(times.items()) if r % 2 == 0 else list(times.items())[::-1]
            for name, acc in order:
                fn = ours if name == "diffusers DiT" else bridged
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"comfyui_attention": attention.optimized_attention.__name__, "layers": a.layers, "size": a.size, "tokens": a.tokens, "dtype": a.dtype, "repeats": a.repeats,
           "median_s": med, "ratio_bridged_over_diffusers": med["bridged MODEL"] / med["diffusers DiT"],
           "max_abs_diff": diff, "dit_MiB": dit_bytes / 2**20, "model_own_MiB": own / 2**20}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
