"""The denoising loop (diffusers schedulers, as PixArtSigmaPipeline runs them) and its scheduler presets."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import re
from typing import Callable

import torch
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

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


def _check_conditioning(model: torch.nn.Module, positive: Conditioning, negative: Conditioning) -> None:
    want = model.config.caption_channels
    for label, c in (("positive", positive), ("negative", negative)):
        if c.embeds.shape[-1] != want:
            raise ValueError(
                f"The {label} conditioning is {c.embeds.shape[-1]} wide ({_t5_name(c.embeds.shape[-1])}), but this "
                f"DiT takes {want}-wide T5 embeddings ({_t5_name(want)}). Load the T5 the model was trained with "
                "(T5-v1.1-XXL for every released PixArt)."
            )


# --- inpainting --------------------------------------------------------------------------------------------------

def latent_mask(mask: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A mask ([H,W], [B,H,W] or [B,1,H,W], 1 = repaint) at latent size `shape` [B,C,h,w], as ComfyUI resizes a
    KSampler's noise_mask (comfy.sampler_helpers.prepare_mask -> comfy.utils.reshape_mask: bilinear, then the
    channels and the batch repeated or cut)."""
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    m = torch.nn.functional.interpolate(m, size=tuple(shape[2:]), mode="bilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    if m.shape[0] > shape[0]:
        m = m[:shape[0]]
    elif m.shape[0] < shape[0]:
        m = m.repeat(-(-shape[0] // m.shape[0]), 1, 1, 1)[:shape[0]]
    return m


# --- guidance ----------------------------------------------------------------------------------------------------

def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4):
    the guided prediction brought back towards the conditional one's standard deviation."""
    dims = list(range(1, noise_pred_text.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def pag_layer_patterns(spec: str) -> list[str]:
    """'blocks.14' or 'blocks.13, blocks.14': one regular expression per comma-separated entry, as diffusers'
    pag_applied_layers takes them."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def pag_targets(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Module]:
    """The self-attention modules diffusers' PAGMixin._set_pag_attn_processor perturbs for these patterns: every
    self-attention whose name the pattern matches (re.search), except a bare number matching a different number."""
    from diffusers.models.attention_processor import Attention

    if not patterns:
        raise ValueError("PAG needs the layers to perturb, e.g. 'blocks.14' (or set pag_scale to 0).")
    found: list[torch.nn.Module] = []
    for pattern in patterns:
        last = pattern.split(".")[-1]
        hits = [m for name, m in model.named_modules()
                if isinstance(m, Attention) and not m.is_cross_attention and re.search(pattern, name) is not None
                and not (last.isnumeric() and name.split(".")[-1].isnumeric() and last == name.split(".")[-1])]
        if not hits:
            depth = len(getattr(model, "transformer_blocks", []))
            raise ValueError(f"PAG: no self-attention layer matches {pattern!r}; this DiT has blocks.0 to "
                             f"blocks.{depth - 1} (e.g. 'blocks.14', or several: 'blocks.13, blocks.14').")
        found += [m for m in hits if all(m is not f for f in found)]
    return found


@contextlib.contextmanager
def _restored_processors(modules: list[torch.nn.Module]):
    """Whatever the loop sets as these modules' attention processors, they get their own back (also on errors and
    Cancel): the model is shared with every later run."""
    old = [m.processor for m in modules]
    try:
        yield
    finally:
        for m, p in zip(modules, old):
            m.processor = p


def _guide(out: torch.Tensor, use_cfg: bool, cfg: float, pag_scale: float, learned_sigma: bool,
           guidance_rescale: float) -> torch.Tensor:
    """Epsilon from one forward's batch ([uncond,] cond[, perturbed]): CFG, then PAG as diffusers' PAGMixin adds
    it, the learned-variance channels dropped, then CFG rescale against the conditional prediction."""
    parts = out.chunk((2 if use_cfg else 1) + (1 if pag_scale > 0 else 0))
    cond = parts[1] if use_cfg else parts[0]
    pred = parts[0] + cfg * (cond - parts[0]) if use_cfg else cond
    if pag_scale > 0:
        pred = pred + pag_scale * (cond - parts[-1])
    if learned_sigma:
        pred, cond = pred.chunk(2, dim=1)[0], cond.chunk(2, dim=1)[0]
    if use_cfg and guidance_rescale > 0:
        pred = rescale_noise_cfg(pred, cond, guidance_rescale)
    return pred


def cfg_active(step: int, steps: int, cfg: float, cfg_start: float = 0.0, cfg_end: float = 1.0) -> bool:
    """Whether step `step` (0-based, of the whole schedule of `steps`) runs CFG: cfg > 1 and the step starts inside
    [cfg_start, cfg_end) as fractions of the schedule."""
    return cfg > 1.0 and cfg_start <= step / steps < cfg_end


# --- staged sampling ---------------------------------------------------------------------------------------------

STATE_KEY = "pixart_solver_state"  # where a LATENT with leftover noise carries its SolverState


@dataclasses.dataclass
class SolverState:
    """What a stage that stops with leftover noise hands on, so that the next stage continues it exactly as one
    uninterrupted run would: multistep solvers keep earlier model outputs, stochastic ones go on drawing from the
    generator, inpainting goes on re-noising the original image with the run's noise."""

    scheduler_name: str
    steps: int
    end_step: int
    scheduler: object  # the solver with its history (latent-sized tensors on the CPU)
    generator_state: torch.Tensor | None
    noise: torch.Tensor  # the run's initial noise
    known: torch.Tensor | None  # the image latent an inpainting run keeps outside its mask
    latents: torch.Tensor  # the exact solver-space latents the stage ended with
    handed: torch.Tensor  # what the stage returned (the LATENT's samples, model scale): how to recognise it

    def continues(self, scheduler_name: str, steps: int, start_step: int, latents: torch.Tensor) -> bool:
        """Whether `latents`, sampled on from `start_step`, are this stage's own output, unchanged."""
        return (self.scheduler_name == scheduler_name and self.steps == steps and self.end_step == start_step
                and self.handed.shape == latents.shape
                and torch.allclose(self.handed, latents.to(self.handed), rtol=1e-5, atol=1e-6))


def _move_history(scheduler, device: torch.device):
    """A copy of the scheduler with its latent-sized history (model outputs, last samples) on `device`."""
    s = copy.deepcopy(scheduler)
    for key, value in vars(s).items():
        if torch.is_tensor(value) and value.ndim >= 4:
            setattr(s, key, value.to(device))
        elif isinstance(value, (list, tuple)) and any(torch.is_tensor(v) and v.ndim >= 4 for v in value):
            setattr(s, key, type(value)(v.to(device) if torch.is_tensor(v) and v.ndim >= 4 else v for v in value))
    return s


def ve_factor(scheduler, t) -> float:
    """x_ComfyUI = x * factor: ComfyUI (k-diffusion) keeps a noisy latent as x0 + sigma * noise; the
    variance-preserving schedulers keep sqrt(a) * x0 + sqrt(1 - a) * noise; Euler's already keep ComfyUI's form."""
    if float(scheduler.init_noise_sigma) > 1.0:
        return 1.0
    return float(scheduler.alphas_cumprod[int(t)].rsqrt())


def level_after(scheduler, last_t, next_t) -> int:
    """The timestep whose noise level a solver's latents hold after stepping from `last_t`: diffusers' DDIM steps to
    last_t - 1000 // steps whatever its timestep spacing; the others to the next timestep of the schedule."""
    if type(scheduler).__name__ == "DDIMScheduler":
        return int(last_t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return int(next_t)


def check_steps(steps: int, start_step: int, end_step: int | None) -> int:
    """The end step a stage runs to (end_step past the schedule means its end); refuses an empty stage."""
    end = steps if end_step is None else min(end_step, steps)
    if start_step < 0 or start_step >= end:
        raise ValueError(f"PixArt sampler: start_step {start_step} to end_step {end} of {steps} steps runs no step; "
                         "start_step must be below end_step and below steps.")
    return end


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
    mask: torch.Tensor | None = None,
    start_step: int = 0,
    end_step: int | None = None,
    add_noise: bool = True,
    leftover_noise: bool = False,
    resume: SolverState | None = None,
    return_state: bool = False,
    pag_scale: float = 0.0,
    pag_layers: str = "blocks.1",
    guidance_rescale: float = 0.0,
    cfg_start: float = 0.0,
    cfg_end: float = 1.0,
    dmd_timestep: int = DMD_TIMESTEP,
):
    """Denoise `noise` [B,4,h,w] with a PixArtTransformer2DModel; returns scaled (model-space) latents.

    Runs the same computation as diffusers' PixArtSigmaPipeline/PixArtAlphaPipeline loop: one CFG-batched
    forward per step ([negative, positive]), the first half of the output channels as epsilon.
    `init_latents` (scaled) with `denoise` < 1 starts part-way, as diffusers' img2img strength does.
    `on_step(step, total, x0)` gets a function returning the current estimate of the clean (scaled) latents, for
    previews: computed only when called (it reads the timestep on the host, a device sync on GPUs).
    `device`: where to compute (default: where the model's first parameter is; a partially loaded model's weights
    are partly elsewhere).

    Inpainting: `mask` (latent size, 1 = repaint; see latent_mask) keeps `init_latents` outside it, re-noised to
    each step's timestep with the run's noise and blended in before every forward, the prediction there replaced by
    that noise (the image itself as the clean estimate), as ComfyUI's KSamplerX0Inpaint does.

    Staged sampling, as ComfyUI's KSamplerAdvanced: the steps `start_step` to `end_step` of a `steps` schedule.
    `add_noise` off takes `init_latents` as already noisy (ComfyUI's form, x0 + sigma * noise); `leftover_noise`
    returns the noisy latents in that form instead of the clean estimate an early stop otherwise jumps to. With
    `return_state` the result is (latents, SolverState or None); a SolverState given as `resume` to the next stage
    continues the run exactly (same solver history and generator) when that stage starts where it ended.

    Guidance: `pag_scale` > 0 adds perturbed-attention guidance on the self-attention layers `pag_layers` names
    (diffusers' PixArtSigmaPAGPipeline); `guidance_rescale` (diffusers' rescale_noise_cfg); CFG runs only on the
    steps whose start lies in [`cfg_start`, `cfg_end`) of the schedule, the others run the positive pass alone.
    `dmd_timestep`: the one step the DMD scheduler runs.
    """
    _check_conditioning(model, positive, negative)
    p = next(model.parameters())
    device, dtype = device or p.device, p.dtype
    batch = noise.shape[0]
    staged = start_step > 0 or end_step is not None or not add_noise or leftover_noise or resume is not None
    if staged and denoise < 1.0:
        raise ValueError("PixArt sampler: denoise and start/end steps both choose the part of the schedule to run; "
                         "use one of them (denoise 1.0 with start/end steps).")
    if not 0.0 <= cfg_start <= cfg_end <= 1.0:
        raise ValueError(f"PixArt sampler: the CFG interval [{cfg_start}, {cfg_end}] must lie in [0, 1] with "
                         "cfg_start <= cfg_end.")
    scheduler = make_scheduler(scheduler_name)
    if scheduler_name == DMD:
        if init_latents is not None:
            raise ValueError("The one-step DMD sampler does not do img2img; pick another scheduler.")
        if staged:
            raise ValueError("The one-step DMD sampler runs one step: start/end steps do not apply.")
        if not 0 <= dmd_timestep < scheduler.config.num_train_timesteps:
            raise ValueError(f"DMD timestep {dmd_timestep} is outside the schedule's 0-999 (the release uses 400).")
        scheduler.set_timesteps(timesteps=[dmd_timestep], device=device)
        steps = 1
    else:
        scheduler.set_timesteps(steps, device=device)
    order = getattr(scheduler, "order", 1)
    end = check_steps(steps, start_step, end_step) if staged else steps
    noise = noise.to(device=device, dtype=torch.float32)
    if mask is not None and init_latents is None:
        raise ValueError("PixArt sampler: an inpainting mask needs the image's latent (connect 'latent').")

    init = known = None
    blend_noise = noise
    if init_latents is not None:
        init = init_latents.to(device=device, dtype=torch.float32)
        if init.shape[0] != batch:
            init = init.repeat((batch + init.shape[0] - 1) // init.shape[0], 1, 1, 1)[:batch]
        known = init
    if init is None:
        if start_step > 0 or not add_noise:
            raise ValueError("PixArt sampler: a stage that starts part-way (start_step > 0 or add_noise off) "
                             "continues an input latent; connect one.")
        first = 0
        timesteps = scheduler.timesteps[:end * order]
        latents = noise * scheduler.init_noise_sigma
    elif not staged:
        check_denoise(denoise, steps, img2img=True)
        timesteps, run = img2img_timesteps(scheduler, steps, denoise)
        first = steps - run
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
    else:
        first = start_step
        if resume is not None and not add_noise and resume.continues(scheduler_name, steps, start_step, init):
            scheduler = _move_history(resume.scheduler, device)
            if generator is not None and resume.generator_state is not None:
                generator.set_state(resume.generator_state)
            blend_noise = resume.noise.to(device)
            known = None if resume.known is None else resume.known.to(device)
            latents = resume.latents.to(device)
        else:
            if resume is not None and not add_noise:
                log.info("PixArt sampler: the input latent is not the previous stage's own output (or the stages' "
                         "scheduler/steps differ); the solver restarts at step %d.", start_step)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(first * order)
            t0 = scheduler.timesteps[first * order:][:1]
            if add_noise:
                latents = scheduler.add_noise(init, noise, t0.repeat(batch))
            else:  # already noisy, in ComfyUI's form, at the level a run's step `first` starts from; as ComfyUI,
                # known regions are then kept without new noise
                level = level_after(scheduler, scheduler.timesteps[(first - 1) * order], t0[0]) if first else t0[0]
                latents = init / ve_factor(scheduler, level)
                blend_noise = torch.zeros_like(noise)
        timesteps = scheduler.timesteps[first * order:end * order]
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)
        if mask.shape != latents.shape:
            mask = latent_mask(mask, latents.shape)

    length = max(positive.embeds.shape[1], negative.embeds.shape[1])
    pos, neg = _pad(positive, length), _pad(negative, length)
    use_pag = pag_scale > 0
    targets = pag_targets(model, pag_layer_patterns(pag_layers)) if use_pag else []
    batches: dict[bool, tuple] = {}

    def inputs(use_cfg: bool) -> tuple:
        """Embeddings, attention mask and micro-conditions of the forward batch: [neg,] pos[, pos (perturbed)]."""
        if use_cfg not in batches:
            conds = ([neg] if use_cfg else []) + [pos] + ([pos] if use_pag else [])
            embeds = torch.cat([c.embeds.repeat(batch, 1, 1) for c in conds]).to(device=device, dtype=dtype)
            m = torch.cat([c.mask.repeat(batch, 1) for c in conds])
            # An all-ones mask changes nothing; without one, SDPA keeps its unmasked fast kernels.
            m = None if bool(m.all()) else m.to(device=device)
            added = {"resolution": None, "aspect_ratio": None}
            if getattr(model, "use_additional_conditions", False):
                h, w = noise.shape[-2] * 8, noise.shape[-1] * 8
                n = embeds.shape[0]
                added = {"resolution": torch.tensor([[h, w]], dtype=dtype, device=device).repeat(n, 1),
                         "aspect_ratio": torch.tensor([[float(h / w)]], dtype=dtype, device=device).repeat(n, 1)}
            batches[use_cfg] = (embeds, m, added)
        return batches[use_cfg]

    if use_pag:
        from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                          PAGIdentitySelfAttnProcessor2_0)

        pag_processors = {True: PAGCFGIdentitySelfAttnProcessor2_0(), False: PAGIdentitySelfAttnProcessor2_0()}

    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    learned_sigma = model.config.out_channels // 2 == model.config.in_channels
    to_x0 = staged and end < steps and not leftover_noise  # KSamplerAdvanced's force_full_denoise

    # NaN/inf check per step: at once on the CPU; on a GPU without a host sync per step (the first bad step is
    # kept on the device and read once at the end).
    sync_free = defers_nan_check(device)
    first_bad = torch.zeros((), dtype=torch.int32, device=device) if sync_free else None
    with _restored_processors(targets):
        for i, t in enumerate(timesteps):
            use_cfg = cfg_active(first + i // order, steps, cfg, cfg_start, cfg_end)
            if mask is not None:
                noisy_known = scheduler.add_noise(known, blend_noise, t.reshape(1).repeat(batch))
                latents = mask * latents + (1 - mask) * noisy_known
            k = (2 if use_cfg else 1) + (1 if use_pag else 0)
            x = torch.cat([latents] * k) if k > 1 else latents
            x = scheduler.scale_model_input(x, t)
            tt = t[None].to(device).expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=device)
            for m in targets:
                m.processor = pag_processors[use_cfg]
            embeds, attn_mask, added = inputs(use_cfg)
            out = model(x.to(dtype), encoder_hidden_states=embeds, encoder_attention_mask=attn_mask, timestep=tt,
                        added_cond_kwargs=added, return_dict=False)[0].float()
            out = _guide(out, use_cfg, cfg, pag_scale, learned_sigma, guidance_rescale)
            if mask is not None:
                out = mask * out + (1 - mask) * blend_noise
            x_in = x[:batch]
            if on_step is not None:
                on_step(i + 1, len(timesteps), lambda: _x0(scheduler, x_in, out, t))  # noqa: B023 (called at once)
            if to_x0 and i == len(timesteps) - 1:  # the last step goes to sigma 0: the clean estimate
                latents = _x0(scheduler, x_in, out, t)
            else:
                latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
            if sync_free:
                first_bad = torch.where((first_bad == 0) & ~torch.isfinite(latents).all(), i + 1, first_bad)
            elif not torch.isfinite(latents).all():
                raise _nan_error(i + 1, timesteps, cfg)
    if sync_free and int(first_bad):
        raise _nan_error(int(first_bad), timesteps, cfg)
    if mask is not None and not (staged and leftover_noise and end < steps):  # fully denoised: the image itself
        latents = mask * latents + (1 - mask) * known
    state = None
    if staged and leftover_noise and end < steps:
        solver = latents
        level = level_after(scheduler, timesteps[-1], scheduler.timesteps[end * order])
        latents = solver * ve_factor(scheduler, level)
        if return_state:
            cpu = torch.device("cpu")
            state = SolverState(scheduler_name, steps, end, _move_history(scheduler, cpu),
                                None if generator is None else generator.get_state(), noise.to(cpu),
                                None if known is None else known.to(cpu), solver.to(cpu), latents.to(cpu))
    return (latents, state) if return_state else latents
