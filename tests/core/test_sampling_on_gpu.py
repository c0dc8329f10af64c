"""Sampling with the DiT on a GPU: every tensor a step computes with is on the GPU (CUDA refuses an operation that
mixes GPU tensors with CPU ones, and harness/fake_cuda.py refuses it the same way), the inputs that arrive on the CPU
(noise, conditioning, the image latent, the mask, a stage's solver state) are moved there, the result stays there,
and the solver state a stage hands on is on the CPU (it lives in ComfyUI's LATENT, outside its model management).

The GPU is simulated (harness/fake_cuda.py: CPU kernels, CUDA's device rule), so a run on it computes exactly what
the same run on the CPU computes; the CPU run is itself checked against diffusers in test_sampling_parity.py and
test_sampling_stages.py, and the text-to-image run here against diffusers' pipeline loop (tests/cases.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from cases import SIZE
from cases import box_mask
from cases import noise as make_noise
from cases import pipeline_loop
from harness.fake_cuda import CUDA, FakeCuda
from pixart_core import sampling

GIB = 1 << 30


def _on_gpu(dit, fake: FakeCuda):
    """A copy of the tiny DiT on the fake GPU."""
    model = copy.deepcopy(dit).to(CUDA)
    assert all(fake.holds(p) for p in model.parameters())
    return model


def _image_latent(seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _state_tensors(state) -> list[torch.Tensor]:
    """The latent-sized tensors a SolverState holds (its solver's history included): the schedule's own 1-D
    tensors (timesteps: a few bytes) stay where diffusers' set_timesteps put them."""
    found = [t for t in (state.noise, state.known, state.latents, state.handed) if t is not None]
    for value in vars(state.scheduler).values():
        found += [v for v in (value if isinstance(value, (list, tuple)) else [value])
                  if torch.is_tensor(v) and v.ndim >= 4]
    return found


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral", "ddpm", "sa_solver"])
def test_text_to_image_on_the_gpu_gives_diffusers_result_there(dit_and_conds, name):
    """Noise and conditioning arrive on the CPU; the latents come back on the GPU, equal to diffusers' loop on the
    CPU (deterministic and stochastic schedulers: the CPU generator goes on drawing as the pipeline's does)."""
    dit, pos, neg = dit_and_conds
    noise, gen = make_noise()
    want, _, _ = pipeline_loop(dit, pos, neg, noise, 5, 4.5, name, generator=gen)
    noise, gen = make_noise()
    with FakeCuda(GIB) as fake:
        got = sampling.sample(_on_gpu(dit, fake), pos, neg, noise, steps=5, cfg=4.5, scheduler=name, generator=gen)
        assert got.device == CUDA and fake.holds(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(denoise=0.6),  # img2img: the image latent moves to the GPU
    dict(mask=box_mask()),  # inpainting: the image latent and the mask move
    dict(mask=box_mask(), end_step=3),  # and an early stop to the clean estimate
], ids=["img2img", "inpainting", "inpainting-early-stop"])
def test_image_inputs_on_the_cpu_are_moved_to_the_gpu(dit_and_conds, settings):
    dit, pos, neg = dit_and_conds
    kw = dict(steps=5, cfg=4.5, scheduler="dpmpp_2m", init_latents=_image_latent(), **settings)
    want = sampling.sample(dit, pos, neg, make_noise()[0], **kw)
    with FakeCuda(GIB) as fake:
        got = sampling.sample(_on_gpu(dit, fake), pos, neg, make_noise()[0], **kw)
        assert fake.holds(got)
    assert torch.equal(got, want)


def test_the_step_preview_computes_its_clean_estimate_on_the_gpu(dit_and_conds):
    """The preview callback's clean estimate (the schedule's scales times GPU tensors) is made on the GPU."""
    dit, pos, neg = dit_and_conds
    want, got = [], []
    sampling.sample(dit, pos, neg, make_noise()[0], steps=3, cfg=4.5, scheduler="euler",
                    on_step=lambda i, n, x0: want.append(x0()))
    with FakeCuda(GIB) as fake:
        sampling.sample(_on_gpu(dit, fake), pos, neg, make_noise()[0], steps=3, cfg=4.5, scheduler="euler",
                        on_step=lambda i, n, x0: got.append(x0()))
        assert all(fake.holds(x) for x in got)
    assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral"])
def test_a_stage_hands_its_state_on_on_the_cpu_and_the_next_continues_it_on_the_gpu(dit_and_conds, name):
    """Stage 1 on the GPU stops with leftover noise: every tensor of its solver state (history, noise, image latent,
    latents) is on the CPU. Stage 2 on the GPU continues it (inpainting: the image latent the state keeps moves
    back) and gives one whole run's latents."""
    dit, pos, neg = dit_and_conds
    kw = dict(steps=6, cfg=4.5, scheduler=name, mask=box_mask(), init_latents=_image_latent())
    noise, gen = make_noise()
    whole = sampling.sample(dit, pos, neg, noise, generator=gen, **kw)
    with FakeCuda(GIB) as fake:
        model = _on_gpu(dit, fake)
        noise, gen = make_noise()
        first, state = sampling.sample(model, pos, neg, noise, generator=gen, end_step=3, leftover_noise=True,
                                       return_state=True, **kw)
        held = [t for t in _state_tensors(state) if fake.holds(t)]
        assert not held, f"{len(held)} tensors of the solver state are on the GPU"
        # noise, image latent, latents, handed, and DPM-Solver++ 2M's history (Euler ancestral keeps none)
        assert len(_state_tensors(state)) >= (5 if name == "dpmpp_2m" else 4)
        noise, gen = make_noise(seed=99)
        kw2 = {**kw, "init_latents": first}
        second = sampling.sample(model, pos, neg, noise, generator=gen, start_step=3, add_noise=False,
                                 resume=state, **kw2)
        assert fake.holds(second)
    assert torch.equal(second, whole)


def test_a_stage_that_restarts_on_the_gpu_gives_the_cpu_result(dit_and_conds):
    """Stage 2 without the state (the LATENT went through a file) restarts the solver on the GPU."""
    dit, pos, neg = dit_and_conds
    kw = dict(steps=6, cfg=4.5, scheduler="dpmpp_2m", init_latents=_image_latent(), start_step=2, add_noise=False)
    want = sampling.sample(dit, pos, neg, make_noise()[0], **kw)
    with FakeCuda(GIB) as fake:
        got = sampling.sample(_on_gpu(dit, fake), pos, neg, make_noise()[0], **kw)
        assert fake.holds(got)
    assert torch.equal(got, want)


def test_the_fake_gpu_refuses_what_cuda_refuses():
    """The check these tests rely on: an operation mixing a GPU tensor with a CPU tensor raises (a 0-dim CPU tensor
    is a scalar to CUDA kernels and passes), as torch does on a real GPU."""
    with FakeCuda(GIB):
        x = torch.ones(2, 3).cuda()
        assert torch.equal((x * torch.tensor(2.0)).cpu(), torch.full((2, 3), 2.0))
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.ones(2, 3)
