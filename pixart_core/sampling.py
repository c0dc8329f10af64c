"""The denoising loop (diffusers schedulers, as PixArtSigmaPipeline runs them) and its scheduler presets."""
from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# The released training schedule: 1000 steps, linear betas 1e-4 -> 0.02, epsilon prediction.
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 prediction_type="epsilon")


def _dpmpp_2m():
    """DPM-Solver++ multistep, order 2, as the official scheduler_config.json of PixArt-Σ (Lu et al. 2022)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                       solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
                                       steps_offset=0, use_karras_sigmas=False, thresholding=False)


def _sa_solver():
    """SA-Solver (Xue et al. 2023), the PixArt-Σ repository's second sampler."""
    from diffusers import SASolverScheduler

    return SASolverScheduler(**_SCHEDULE, predictor_order=2, corrector_order=2, algorithm_type="data_prediction")


def _ddim():
    """DDIM (Song et al. 2020), eta 0, on the release's linspace timesteps; x0 never clipped (latents, not pixels)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_SCHEDULE, clip_sample=False, timestep_spacing="linspace", steps_offset=0)


def _euler():
    """Euler (Karras et al. 2022) on the discrete schedule."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_SCHEDULE)


def _euler_a():
    """Euler ancestral (Karras et al. 2022)."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(**_SCHEDULE)


def _unipc():
    """UniPC multistep (Zhao et al. 2023)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**_SCHEDULE)


def _ddpm():
    """DDPM ancestral sampling (Ho et al. 2020) on evenly spread timesteps, as the original IDDPM respacing."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE, clip_sample=False, timestep_spacing="linspace", steps_offset=0)


def _lcm():
    """Latent consistency sampling (Luo et al. 2023) for PixArt-LCM: 4 steps, cfg 1."""
    from diffusers import LCMScheduler

    return LCMScheduler(**_SCHEDULE)


def _dmd():
    """One step at timestep 400 with DDPM, as the PixArt-α DMD release samples (Yin et al. 2023); CFG 1."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE, clip_sample=False)


DMD_TIMESTEP = 400

SCHEDULERS: dict[str, Callable[[], object]] = {
    "dpm++ 2m": _dpmpp_2m,
    "sa-solver": _sa_solver,
    "ddim": _ddim,
    "euler": _euler,
    "euler ancestral": _euler_a,
    "unipc": _unipc,
    "ddpm": _ddpm,
    "lcm": _lcm,
    "dmd 1-step (t=400)": _dmd,
}
DMD = "dmd 1-step (t=400)"
DEFAULT_SCHEDULER = "dpm++ 2m"


def make_scheduler(name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}.")
    return SCHEDULERS[name]()


@dataclasses.dataclass
class Conditioning:
    """T5 embeddings of one prompt and their attention mask (1 = real token)."""

    embeds: torch.Tensor  # [1, L, C]
    mask: torch.Tensor  # [1, L]
    # The same prompt encoded at smaller token limits ({limit: Conditioning}), made when the limit was left to the
    # DiT and the prompt is longer than a limit: the sampler picks what its model was trained with.
    at_limit: dict[int, "Conditioning"] = dataclasses.field(default_factory=dict)


def for_limit(c: Conditioning, limit: int) -> Conditioning:
    """What a DiT trained with `limit` T5 tokens reads: the encoding made at that limit, when there is one."""
    if c.mask.shape[1] > limit and limit in c.at_limit:
        return c.at_limit[limit]
    return c


def _pad(c: Conditioning, length: int) -> Conditioning:
    extra = length - c.embeds.shape[1]
    if extra <= 0:
        return c
    emb = torch.nn.functional.pad(c.embeds, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(c.mask, (0, extra))
    return Conditioning(emb, mask)


def inference_memory(batch: int, height: int, width: int, inner: int, dtype: torch.dtype, cfg: bool,
                     fused_attention: bool = True, heads: int = 16) -> int:
    """Bytes of activations one DiT forward needs beyond its weights (rough upper estimate, for ComfyUI).

    With a fused SDPA kernel (flash / memory-efficient) attention needs no more than the MLP, so its share is
    capped at 4x the MLP's; SDPA's math kernel materialises every head's tokens x tokens score matrix (~17 GiB at
    2K in bf16 with CFG), which is counted whole.
    """
    n = batch * (2 if cfg else 1)
    tokens = (height // 16) * (width // 16)
    size = torch.tensor([], dtype=dtype).element_size()
    mlp_and_qkv = n * tokens * inner * 12 * size  # the widest intermediate (MLP 4x, q/k/v, residuals) live at once
    attention = n * heads * tokens * tokens * size  # the math kernel's score matrix
    return mlp_and_qkv + (min(attention, 4 * mlp_and_qkv) if fused_attention else attention) + (64 << 20)


def initial_noise(seed: int, batch: int, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Generator]:
    """Noise by ComfyUI's convention (one CPU generator seeded with `seed` for the whole batch), and that
    generator, which stochastic schedulers go on drawing from."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, channels, height // 8, width // 8), generator=generator, dtype=torch.float32)
    return noise, generator


def check_denoise(denoise: float, steps: int, img2img: bool) -> None:
    """Refuse a denoise that runs nothing or needs an input latent that is not there (img2img: whether one is)."""
    if not img2img and denoise < 1.0:
        raise ValueError("PixArt sampler: denoise below 1.0 needs an input latent (connect 'latent' for img2img).")
    if denoise <= 0.0:
        raise ValueError("PixArt sampler: denoise 0 runs no step; use a value in (0, 1].")
    if img2img and min(int(steps * denoise), steps) == 0:
        raise ValueError(f"denoise {denoise} of {steps} steps runs no step; use denoise >= {1 / steps:.3g} or more steps.")


def img2img_timesteps(scheduler, steps: int, denoise: float) -> tuple[torch.Tensor, int]:
    """The part of the schedule that img2img runs, as diffusers' strength does: (timesteps, steps run)."""
    init = min(int(steps * denoise), steps)
    start = max(steps - init, 0)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    return timesteps, steps - start


def _t5_name(width: int) -> str:
    names = {512: "T5-v1.1-small", 768: "T5-v1.1-base", 1024: "T5-v1.1-large", 2048: "T5-v1.1-XL", 4096: "T5-v1.1-XXL"}
    return names.get(width, "an unusual T5")


def _x0(scheduler, model_input: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Clean-latent estimate from the (VP-scaled) model input and epsilon: valid for every scheduler here."""
    a = scheduler.alphas_cumprod[int(t)].to(model_input.device)
    return (model_input - (1 - a).sqrt() * eps) / a.sqrt()


def _nan_error(step: int, timesteps: torch.Tensor, cfg: float) -> FloatingPointError:
    return FloatingPointError(
        f"PixArt sampling produced NaN/inf at step {step} of {len(timesteps)} (timestep {int(timesteps[step - 1])}). "
        f"The model overflowed: lower cfg (now {cfg}), load the DiT in bf16 or fp32 instead of fp16, or check that "
        "the weights file is not corrupt."
    )


def defers_nan_check(device: torch.device) -> bool:
    """Whether the per-step NaN check stays on the device (no host sync per step) and is read once at the end."""
    return device.type != "cpu"


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    positive: Conditioning,
    negative: Conditioning,
    noise: torch.Tensor,
    *,
    steps: int,
    cfg: float,
    scheduler_name: str = DEFAULT_SCHEDULER,
    generator: torch.Generator | None = None,
    init_latents: torch.Tensor | None = None,
    denoise: float = 1.0,
    on_step: Callable[[int, int, Callable[[], torch.Tensor]], None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B,4,h,w] with a PixArtTransformer2DModel; returns scaled (model-space) latents.

    Runs the same computation as diffusers' PixArtSigmaPipeline/PixArtAlphaPipeline loop: one CFG-batched
    forward per step ([negative, positive]), the first half of the output channels as epsilon.
    `init_latents` (scaled) with `denoise` < 1 starts part-way, as diffusers' img2img strength does.
    `on_step(step, total, x0)` gets a function returning the current estimate of the clean (scaled) latents, for
    previews: computed only when called (it reads the timestep on the host, a device sync on GPUs).
    `device`: where to compute (default: where the model's first parameter is; a partially loaded model's weights
    are partly elsewhere).
    """
    want = model.config.caption_channels
    for label, c in (("positive", positive), ("negative", negative)):
        if c.embeds.shape[-1] != want:
            raise ValueError(
                f"The {label} conditioning is {c.embeds.shape[-1]} wide ({_t5_name(c.embeds.shape[-1])}), but this "
                f"DiT takes {want}-wide T5 embeddings ({_t5_name(want)}). Load the T5 the model was trained with "
                "(T5-v1.1-XXL for every released PixArt)."
            )
    p = next(model.parameters())
    device, dtype = device or p.device, p.dtype
    batch = noise.shape[0]
    scheduler = make_scheduler(scheduler_name)
    if scheduler_name == DMD:
        if init_latents is not None:
            raise ValueError("The one-step DMD sampler does not do img2img; pick another scheduler.")
        scheduler.set_timesteps(timesteps=[DMD_TIMESTEP], device=device)
        steps = 1
    else:
        scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    noise = noise.to(device=device, dtype=torch.float32)
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        check_denoise(denoise, steps, img2img=True)
        timesteps, _ = img2img_timesteps(scheduler, steps, denoise)
        init = init_latents.to(device=device, dtype=torch.float32)
        if init.shape[0] != batch:
            init = init.repeat((batch + init.shape[0] - 1) // init.shape[0], 1, 1, 1)[:batch]
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))

    do_cfg = cfg > 1.0
    length = max(positive.embeds.shape[1], negative.embeds.shape[1])
    pos, neg = _pad(positive, length), _pad(negative, length)
    embeds = pos.embeds.repeat(batch, 1, 1)
    mask = pos.mask.repeat(batch, 1)
    if do_cfg:
        embeds = torch.cat([neg.embeds.repeat(batch, 1, 1), embeds])
        mask = torch.cat([neg.mask.repeat(batch, 1), mask])
    embeds = embeds.to(device=device, dtype=dtype)
    # An all-ones mask changes nothing; without one, SDPA keeps its unmasked fast kernels.
    mask = None if bool(mask.all()) else mask.to(device=device)

    added = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        h, w = noise.shape[-2] * 8, noise.shape[-1] * 8
        n = embeds.shape[0]
        added = {"resolution": torch.tensor([[h, w]], dtype=dtype, device=device).repeat(n, 1),
                 "aspect_ratio": torch.tensor([[float(h / w)]], dtype=dtype, device=device).repeat(n, 1)}

    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    learned_sigma = model.config.out_channels // 2 == model.config.in_channels

    # NaN/inf check per step: at once on the CPU; on a GPU without a host sync per step (the first bad step is
    # kept on the device and read once at the end).
    sync_free = defers_nan_check(device)
    first_bad = torch.zeros((), dtype=torch.int32, device=device) if sync_free else None
    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * 2) if do_cfg else latents
        x = scheduler.scale_model_input(x, t)
        tt = t[None].to(device).expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=device)
        out = model(x.to(dtype), encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=tt,
                    added_cond_kwargs=added, return_dict=False)[0].float()
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + cfg * (cond - uncond)
        if learned_sigma:
            out = out.chunk(2, dim=1)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps),
                    lambda: _x0(scheduler, x.chunk(2)[0] if do_cfg else x, out, t))  # noqa: B023 (called at once)
        latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        if sync_free:
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(latents).all(), i + 1, first_bad)
        elif not torch.isfinite(latents).all():
            raise _nan_error(i + 1, timesteps, cfg)
    if sync_free and int(first_bad):
        raise _nan_error(int(first_bad), timesteps, cfg)
    return latents
