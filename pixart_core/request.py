"""A sampling request: what one run samples, from what, with which schedule and guidance, described once; and the
one check of it (check_inputs), made before anything is loaded."""
from __future__ import annotations

import dataclasses

import torch

from . import resolution, schedulers
from .conditioning import Conditioning, check_width
from .guidance import Guidance
from .stages import SolverState


@dataclasses.dataclass(frozen=True)
class Request:
    """One sampling run. Text-to-image from noise; img2img from `init_latents` (model scale) over the last `denoise`
    of the schedule, as diffusers' strength; inpainting with `mask` (1 = repaint) on top; or one stage of a staged
    run (ComfyUI's KSamplerAdvanced): steps `start_step` to `end_step` (None or past the schedule: to its end),
    `add_noise` off taking `init_latents` as already noisy (ComfyUI's form), `leftover_noise` returning the noisy
    latents, `resume` the state a previous stage handed on."""

    positive: Conditioning
    negative: Conditioning
    width: int  # pixels
    height: int
    steps: int
    guidance: Guidance
    scheduler: str = schedulers.DEFAULT  # an id of schedulers.SCHEDULERS
    denoise: float = 1.0
    init_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    start_step: int = 0
    end_step: int | None = None
    add_noise: bool = True
    leftover_noise: bool = False
    resume: SolverState | None = None
    dmd_timestep: int = schedulers.DMD_TIMESTEP  # the one step the DMD scheduler runs
    tiled: bool = False  # the DiT runs the canvas in tiles (pixart_core.tiles), checked where they were laid out

    @property
    def one_step(self) -> bool:
        """The DMD scheduler: one step from noise; stage settings do not apply to it."""
        return self.scheduler == schedulers.DMD

    @property
    def staged(self) -> bool:
        """Whether this is a stage of a staged run (any stage setting given)."""
        return not self.one_step and (self.start_step > 0 or self.end_step is not None or not self.add_noise
                                      or self.leftover_noise or self.resume is not None)

    @property
    def schedule_steps(self) -> int:
        """The steps of the whole schedule (DMD's is its one step)."""
        return 1 if self.one_step else self.steps

    @property
    def end(self) -> int:
        """The step this run stops at."""
        if not self.staged or self.end_step is None:
            return self.schedule_steps
        return min(self.end_step, self.steps)

    @property
    def stops_early(self) -> bool:
        """A stage that ends before the schedule does."""
        return self.staged and self.end < self.steps


def check_denoise(denoise: float, steps: int, img2img: bool) -> None:
    """Refuse a denoise that runs nothing or needs an input latent that is not there (img2img: whether one is)."""
    if not img2img and denoise < 1.0:
        raise ValueError("PixArt sampler: denoise below 1.0 needs an input latent (connect 'latent' for img2img).")
    if denoise <= 0.0:
        raise ValueError("PixArt sampler: denoise 0 runs no step; use a value in (0, 1].")
    if img2img and min(int(steps * denoise), steps) == 0:
        raise ValueError(f"denoise {denoise} of {steps} steps runs no step; use denoise >= {1 / steps:.3g} or more steps.")


def check_steps(steps: int, start_step: int, end_step: int | None) -> int:
    """The end step a stage runs to (end_step past the schedule means its end); refuses an empty stage."""
    end = steps if end_step is None else min(end_step, steps)
    if start_step < 0 or start_step >= end:
        raise ValueError(f"PixArt sampler: start_step {start_step} to end_step {end} of {steps} steps runs no step; "
                         "start_step must be below end_step and below steps.")
    return end


def _check_one_step(r: Request) -> None:
    if r.init_latents is not None or r.start_step > 0 or not r.add_noise:
        raise ValueError("The one-step DMD sampler does not do img2img: it starts from noise (an Empty Latent "
                         "Image; add_noise enable and start_step 0 in the Advanced sampler). Pick another scheduler "
                         "for img2img.")
    if not 0 <= r.dmd_timestep < schedulers.TRAINING_SCHEDULE["num_train_timesteps"]:
        raise ValueError(f"DMD timestep {r.dmd_timestep} is outside the schedule's 0-999 (the release uses 400).")


def check_inputs(r: Request, model: torch.nn.Module) -> None:
    """Refuse a request that cannot run on `model` (the DiT), saying what to change: the one check of a request,
    made before the model is loaded or anything allocated."""
    if r.scheduler not in schedulers.SCHEDULERS:
        raise ValueError(f"Unknown scheduler {r.scheduler!r}; choose one of {list(schedulers.SCHEDULERS)}.")
    if r.staged and r.denoise < 1.0:
        raise ValueError("PixArt sampler: denoise and start/end steps both choose the part of the schedule to run; "
                         "use one of them (denoise 1.0 with start/end steps).")
    if r.one_step:
        _check_one_step(r)
    if r.staged:
        check_steps(r.steps, r.start_step, r.end_step)
    else:
        check_denoise(r.denoise, r.steps, img2img=r.init_latents is not None)
    if not r.tiled:
        resolution.check_size(r.width, r.height)
    if r.mask is not None and r.init_latents is None:
        raise ValueError("PixArt sampler: the inpainting mask needs the image's latent; connect 'latent' (VAE Encode "
                         "of the image, or Set Latent Noise Mask's output).")
    if r.init_latents is None and (r.start_step > 0 or not r.add_noise):
        raise ValueError("PixArt sampler: a stage that starts part-way (start_step > 0 or add_noise off) "
                         "continues an input latent; connect one.")
    g = r.guidance
    if not 0.0 <= g.cfg_start <= g.cfg_end <= 1.0:
        raise ValueError(f"PixArt sampler: the CFG interval [{g.cfg_start}, {g.cfg_end}] must lie in [0, 1] with "
                         "cfg_start <= cfg_end.")
    check_width(r.positive, r.negative, model.config.caption_channels)
