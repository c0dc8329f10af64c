"""The denoising loop (diffusers schedulers, as PixArtSigmaPipeline runs them): a checked Request is planned (the
part of the schedule it runs, its first latents), then `loop` steps the solver with a guided prediction
(pixart_core.guidance) that it calls as predict(x, t, step)."""
from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Callable

import torch

from . import schedulers
from .conditioning import Conditioning
from .guidance import Guidance, Predict, guided
from .inpaint import Inpainting, latent_mask
from .logs import logger_name
from .request import Request, check_inputs
from .stages import SolverState, input_scales, level_after, moved_history, ve_factor
from .tiles import TiledDiT

log = logging.getLogger(logger_name(__name__))

# on_step(step, total, x0): after each step; x0() computes the current clean estimate (a device sync on GPUs).
OnStep = Callable[[int, int, Callable[[], torch.Tensor]], None]


def initial_noise(seed: int, batch: int, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Generator]:
    """Noise by ComfyUI's convention (one CPU generator seeded with `seed` for the whole batch), and that
    generator, which stochastic schedulers go on drawing from."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, channels, height // 8, width // 8), generator=generator, dtype=torch.float32)
    return noise, generator


def img2img_timesteps(scheduler, steps: int, denoise: float) -> tuple[torch.Tensor, int]:
    """The part of the schedule that img2img runs, as diffusers' strength does: (timesteps, steps run)."""
    init = min(int(steps * denoise), steps)
    start = max(steps - init, 0)
    order = scheduler.order
    timesteps = scheduler.timesteps[start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    return timesteps, steps - start


def defers_nan_check(device: torch.device) -> bool:
    """Whether the per-step NaN check stays on the device (no host sync per step) and is read once at the end."""
    return device.type != "cpu"


def _x0(scheduler, model_input: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """Clean-latent estimate from the (VP-scaled) model input and epsilon at the step being run (the scales are 0-dim
    tensors, which CUDA kernels take as scalars from the CPU)."""
    a, b = input_scales(scheduler, t)
    return (model_input - b * eps) / a


def _nan_error(step: int, timesteps: torch.Tensor, cfg: float) -> FloatingPointError:
    return FloatingPointError(
        f"PixArt sampling produced NaN/inf at step {step} of {len(timesteps)} (timestep {int(timesteps[step - 1])}). "
        f"The model overflowed: lower cfg (now {cfg}), load the DiT in bf16 or fp32 instead of fp16, or check that "
        "the weights file is not corrupt."
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The part of the schedule one run steps through, with the solver set up to run it."""

    scheduler: object  # the diffusers scheduler at its first step (a resumed stage's: with its history)
    timesteps: torch.Tensor  # the timesteps this run steps through
    first: int  # the schedule step timesteps[0] belongs to (the CFG interval counts whole-schedule steps)
    to_x0: bool  # the last step jumps to the clean estimate (an early stop without leftover noise)
    generator: torch.Generator | None  # what stochastic schedulers draw from
    inpainting: Inpainting | None
    cfg: float  # named in the overflow error
    noise: torch.Tensor  # the run's noise on the device (a stage's state keeps it)
    known: torch.Tensor | None  # the input image latent (a stage's state keeps it)


def _stage_start(r: Request, scheduler, init: torch.Tensor, noise: torch.Tensor, generator, device) -> tuple:
    """(scheduler, latents, known, blend noise) of a stage starting at r.start_step: the previous stage's solver
    state when the input is its own output, else the solver restarted there (as KSamplerAdvanced)."""
    first, order, resume = r.start_step, scheduler.order, r.resume
    if resume is not None and not r.add_noise and resume.continues(r.scheduler, r.steps, first, init):
        if generator is not None and resume.generator_state is not None:
            generator.set_state(resume.generator_state)
        known = None if resume.known is None else resume.known.to(device)
        return moved_history(resume.scheduler, device), resume.latents.to(device), known, resume.noise.to(device)
    if resume is not None and not r.add_noise:
        log.info("PixArt sampler: the input latent is not the previous stage's own output (or the stages' "
                 "scheduler/steps differ); the solver restarts at step %d.", first)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * order)
    t0 = scheduler.timesteps[first * order:][:1]
    if r.add_noise:
        return scheduler, scheduler.add_noise(init, noise, t0.repeat(noise.shape[0])), init, noise
    # already noisy, in ComfyUI's form, at the level a run's step `first` starts from; as ComfyUI, known regions
    # are then kept without new noise
    level = level_after(scheduler, scheduler.timesteps[(first - 1) * order], t0[0]) if first else t0[0]
    return scheduler, init / ve_factor(scheduler, level), init, torch.zeros_like(noise)


def prepare(r: Request, noise: torch.Tensor, generator: torch.Generator | None,
            device: torch.device) -> tuple[Plan, torch.Tensor]:
    """The plan of a checked request and the latents it starts from (text-to-image, img2img or a stage)."""
    scheduler = schedulers.make(r.scheduler)
    if r.one_step:
        scheduler.set_timesteps(timesteps=[r.dmd_timestep], device=device)
    else:
        scheduler.set_timesteps(r.steps, device=device)
    order, steps, end = scheduler.order, r.schedule_steps, r.end
    noise = noise.to(device=device, dtype=torch.float32)
    batch, blend_noise, init = noise.shape[0], noise, None
    if r.init_latents is not None:
        init = r.init_latents.to(device=device, dtype=torch.float32)
        if init.shape[0] != batch:
            init = init.repeat((batch + init.shape[0] - 1) // init.shape[0], 1, 1, 1)[:batch]
    known = init
    if init is None:
        first, timesteps = 0, scheduler.timesteps[:end * order]
        latents = noise * scheduler.init_noise_sigma
    elif not r.staged:
        timesteps, run_steps = img2img_timesteps(scheduler, steps, r.denoise)
        first = steps - run_steps
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
    else:
        first = r.start_step
        scheduler, latents, known, blend_noise = _stage_start(r, scheduler, init, noise, generator, device)
        timesteps = scheduler.timesteps[first * order:end * order]
    inpainting = None
    if r.mask is not None:
        mask = r.mask.to(device=device, dtype=torch.float32)
        inpainting = Inpainting(mask if mask.shape == latents.shape else latent_mask(mask, latents.shape), known,
                                blend_noise)
    to_x0 = r.stops_early and not r.leftover_noise  # KSamplerAdvanced's force_full_denoise
    return Plan(scheduler, timesteps, first, to_x0, generator, inpainting, r.guidance.cfg, noise, known), latents


@torch.no_grad()
def loop(predict: Predict, plan: Plan, latents: torch.Tensor, on_step: OnStep | None = None) -> torch.Tensor:
    """Step the plan's solver through its timesteps from `latents` with the guided prediction; returns its latents.
    Inpainting gives the model the image outside the mask and blends its clean estimate with the image."""
    s, timesteps = plan.scheduler, plan.timesteps
    order = s.order
    step_kwargs = {"generator": plan.generator} if "generator" in inspect.signature(s.step).parameters else {}
    # NaN/inf check per step: at once on the CPU; on a GPU without a host sync per step (the first bad step is
    # kept on the device and read once at the end).
    sync_free = defers_nan_check(latents.device)
    first_bad = torch.zeros((), dtype=torch.int32, device=latents.device) if sync_free else None
    for i, t in enumerate(timesteps):
        if plan.inpainting is not None:
            latents, x_in = plan.inpainting.step_inputs(s, latents, t)
        x = s.scale_model_input(latents, t)
        eps = predict(x if plan.inpainting is None else x_in, t, plan.first + i // order)
        if plan.inpainting is not None:
            eps = plan.inpainting.prediction(eps, x_in, x, *input_scales(s, t))
        if on_step is not None:
            on_step(i + 1, len(timesteps), lambda: _x0(s, x, eps, t))  # noqa: B023 (called at once)
        if plan.to_x0 and i == len(timesteps) - 1:  # the last step goes to sigma 0: the clean estimate
            latents = _x0(s, x, eps, t)
        else:
            latents = s.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if sync_free:
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(latents).all(), i + 1, first_bad)
        elif not torch.isfinite(latents).all():
            raise _nan_error(i + 1, timesteps, plan.cfg)
    if sync_free and int(first_bad):
        raise _nan_error(int(first_bad), timesteps, plan.cfg)
    return latents


def finish(r: Request, plan: Plan, latents: torch.Tensor) -> tuple[torch.Tensor, SolverState | None]:
    """What the run hands back: the result (the image kept outside an inpainting mask), or for a stage that stops
    with leftover noise its noisy latents in ComfyUI's form and the state the next stage continues from."""
    leftover = r.stops_early and r.leftover_noise
    if not leftover:
        return (latents if plan.inpainting is None else plan.inpainting.result(latents)), None
    s, solver = plan.scheduler, latents
    level = level_after(s, plan.timesteps[-1], s.timesteps[r.end * s.order])
    latents = solver * ve_factor(s, level)
    cpu = torch.device("cpu")
    state = SolverState(r.scheduler, r.steps, r.end, moved_history(s, cpu),
                        None if plan.generator is None else plan.generator.get_state(), plan.noise.to(cpu),
                        None if plan.known is None else plan.known.to(cpu), solver.to(cpu), latents.to(cpu))
    return latents, state


@torch.no_grad()
def run(model: torch.nn.Module, r: Request, noise: torch.Tensor, generator: torch.Generator | None = None,
        device: torch.device | None = None, on_step: OnStep | None = None) -> tuple[torch.Tensor, SolverState | None]:
    """Sample a request that check_inputs passed with `model` (a PixArtTransformer2DModel, or a TiledDiT) from
    `noise` [B,4,h,w]: (model-scale latents, the SolverState a stage with leftover noise hands on, else None).
    `device`: where to compute (default: where the model's first parameter is; a partially loaded model's weights
    are partly elsewhere)."""
    device = device or next(model.parameters()).device
    plan, latents = prepare(r, noise, generator, device)
    with guided(model, r.positive, r.negative, r.guidance, r.schedule_steps) as predict:
        latents = loop(predict, plan, latents, on_step)
    return finish(r, plan, latents)


def sample(model: torch.nn.Module, positive: Conditioning, negative: Conditioning, noise: torch.Tensor, *,
           generator: torch.Generator | None = None, device: torch.device | None = None, on_step: OnStep | None = None,
           return_state: bool = False, **settings):
    """Check and run a request given as keywords (Request's and Guidance's fields; the size is the noise's), for
    scripts and tests: the latents, or (latents, SolverState or None) with `return_state`."""
    names = {f.name for f in dataclasses.fields(Guidance)}
    guidance = Guidance(**{k: v for k, v in settings.items() if k in names})
    r = Request(positive, negative, noise.shape[-1] * 8, noise.shape[-2] * 8, guidance=guidance,
                tiled=isinstance(model, TiledDiT), **{k: v for k, v in settings.items() if k not in names})
    check_inputs(r, model)
    latents, state = run(model, r, noise, generator, device, on_step)
    return (latents, state) if return_state else latents
