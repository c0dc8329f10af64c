"""The bridge's MODEL (ComfyUI's PixArt on our DiT's weights) and our DiT keep one copy of the weights in system
memory after either went to a GPU and back (a fake CUDA GPU: harness.fake_cuda, where moves really copy)."""
from __future__ import annotations

import copy
import sys

import torch

from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

CPU = torch.device("cpu")


def _pack(module: str):
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


def _own_tensors(model, dit) -> list[str]:
    """The MODEL's tensors that do not lie in the DiT's storage (the original layout's null caption is its own)."""
    dit_storages = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    return [k for k, t in model.model.diffusion_model.state_dict().items()
            if t.untyped_storage().data_ptr() not in dit_storages and k != "y_embedder.y_embedding"]


def _eps(dit, x, ctx):
    with torch.no_grad():
        return dit(x, encoder_hidden_states=ctx, timestep=torch.tensor([500]),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def test_model_and_dit_share_their_weights_after_gpu_round_trips(comfy):
    import comfy.model_management as mm

    from pixart_core.variants import PRESETS

    management, types, bridge = (_pack(m) for m in ("nodes.comfy.loading", "nodes.types", "nodes.bridge"))
    dit = tiny.make_dit(variant="sigma-1024")
    ref = copy.deepcopy(dit)
    handle = types.DiTHandle(management.wrap(dit, CUDA, CPU), PRESETS["sigma-1024"], "tiny-sigma-1024", "test")
    with comfy_sees(FakeCuda(2 << 30)) as gpu:
        model = bridge.to_model(handle)
        assert not _own_tensors(model, dit)
        mm.load_models_gpu([model])  # as KSampler loads it
        assert model.loaded_size() == model.model_size() and gpu.used > 0
        mm.free_memory(gpu.total, CUDA)  # ComfyUI unloads everything from the GPU
        assert gpu.used == 0
        own = _own_tensors(model, dit)
        assert not own, f"{len(own)} MODEL tensors hold a second copy after the MODEL's round trip, e.g. {own[:3]}"
        management.use(handle.patcher)  # our sampler on the same DiT
        mm.free_memory(gpu.total, CUDA)
        own = _own_tensors(model, dit)
        assert not own, f"{len(own)} MODEL tensors hold a second copy after the DiT's round trip, e.g. {own[:3]}"
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.T5_WIDTH)
    assert torch.equal(_eps(dit, x, ctx), _eps(ref, x, ctx))
