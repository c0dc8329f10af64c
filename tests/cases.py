"""Inputs and small helpers that tests in more than one file share (fixtures are in conftest.py): prompts of a known
T5 token count, the small sampling case (a 64 px image, seeded noise, a box to repaint), a recorder of the DiT's
calls, cosine similarity, the other-latent-space refusals, and diffusers' pipeline loop written out as the reference."""
from __future__ import annotations

import inspect

import torch

import reference_settings as reference
from pixart_core import sampling

SIZE = 64  # pixels: an 8x8 latent


def noise(seed: int = 11, batch: int = 2) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise of a SIZE x SIZE batch and the generator after it (ComfyUI's seed convention)."""
    return sampling.initial_noise(seed, batch, 4, SIZE, SIZE)


def pipeline_loop(dit, pos, neg, noise, steps, cfg, name, *, stop=None, rescale=0.0, generator=None, switch=None):
    """The diffusers pipeline's loop written out (PixArtSigmaPipeline + StableDiffusionPipeline's guidance_rescale),
    on a scheduler from the published settings; returns the latents and the last step's scheduler output.
    `generator`: what the scheduler's step draws from (the pipeline passes its generator to stochastic schedulers);
    `switch`: (step, other DiT): that DiT predicts from that step of the schedule on."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    sch = reference.scheduler(name)
    sch.set_timesteps(steps)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sch.step).parameters else {}
    b = noise.shape[0]
    lat = noise * sch.init_noise_sigma
    emb = torch.cat([neg.embeds.repeat(b, 1, 1), pos.embeds.repeat(b, 1, 1)])
    msk = torch.cat([neg.mask.repeat(b, 1), pos.mask.repeat(b, 1)])
    res = None
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps[:stop]):
            model = switch[1] if switch is not None and i >= switch[0] else dit
            x = sch.scale_model_input(torch.cat([lat] * 2), t)
            out = model(x, encoder_hidden_states=emb, encoder_attention_mask=msk, timestep=t[None].expand(2 * b),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            u, c = out.chunk(2)
            guided, c = (u + cfg * (c - u)).chunk(2, dim=1)[0], c.chunk(2, dim=1)[0]
            if rescale:
                guided = rescale_noise_cfg(guided, c, guidance_rescale=rescale)
            res = sch.step(guided, t, lat, **step_kwargs)
            lat = res.prev_sample
    return lat, res, sch


def box_mask(batch: int = 2) -> torch.Tensor:
    """A latent mask repainting a 4x4 box of the 8x8 latent (1 inside, 0 outside)."""
    m = torch.zeros(batch, 1, SIZE // 8, SIZE // 8)
    m[:, :, 2:6, 1:5] = 1.0
    return m


def record_calls(dit) -> tuple[list, object]:
    """Every DiT forward's latent input and timestep, as the model receives them."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), kwargs["timestep"].detach().clone()))

    return calls, dit.register_forward_pre_hook(hook, with_kwargs=True)


def words(n_tokens: int) -> str:
    """A prompt of exactly n_tokens T5 tokens, EOS included ('cat' is one token)."""
    return " ".join(["Cat"] * (n_tokens - 1))


# Over 200 tokens, with what caption cleaning changes (a URL, HTML, case).
LONG_PROMPT = "Visit HTTPS://EXAMPLE.COM for A <b>Red</b> Fox " + words(200)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# A latent of the other latent space for a DiT (same shapes, wrong colours): (variant, the latent's space, the
# sampler's refusal, written out), for every node that samples from an input latent.
OTHER_LATENT_SPACE = [
    ("sigma-1024", "sd",
     ("PixArt sampler: the input latent was encoded with the SD 1.x VAE (PixArt-α), but tiny-sigma-1024 (sigma-1024) "
      "works in the SDXL latent space. Encode with the SDXL VAE (PixArt-Σ).")),
    ("alpha-512", "sdxl",
     ("PixArt sampler: the input latent was encoded with the SDXL VAE (PixArt-Σ), but tiny-alpha-512 (alpha-512) "
      "works in the SD latent space. Encode with the SD 1.x VAE (PixArt-α).")),
]
