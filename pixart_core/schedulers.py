"""The schedulers: one table entry per scheduler (internal id, diffusers class, the settings it is built with, the
paper or release it follows), the way variants.PRESETS is one table of models. The ids are not UI labels: the nodes
map their widget's labels to these ids."""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

# The released training schedule: 1000 steps, linear betas 1e-4 -> 0.02, epsilon prediction.
TRAINING_SCHEDULE: Mapping[str, Any] = types.MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"))
# The release's timestep spacing (PixArt-Σ's scheduler_config.json); diffusers' default is "leading".
_LINSPACE = dict(timestep_spacing="linspace", steps_offset=0)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """One sampler: a diffusers scheduler class and the settings it gets on top of the training schedule."""

    id: str
    cls: str  # the diffusers class
    settings: Mapping[str, Any]  # what differs from the class's defaults besides TRAINING_SCHEDULE
    source: str  # the paper and the release (or source) whose settings these are

    def make(self):
        """A fresh diffusers scheduler (it keeps state while it runs: one per run)."""
        import diffusers

        return getattr(diffusers, self.cls)(**TRAINING_SCHEDULE, **self.settings)


def _entry(scheduler_id: str, cls: str, source: str, **settings) -> Scheduler:
    return Scheduler(scheduler_id, cls, types.MappingProxyType(settings), source)


SCHEDULERS: dict[str, Scheduler] = {s.id: s for s in [
    _entry("dpmpp_2m", "DPMSolverMultistepScheduler",
           "DPM-Solver++ multistep, order 2 (Lu et al. 2022), as the official scheduler_config.json of PixArt-Σ",
           algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
           use_karras_sigmas=False, thresholding=False, **_LINSPACE),
    _entry("sa_solver", "SASolverScheduler", "SA-Solver (Xue et al. 2023), the PixArt-Σ repository's second sampler",
           predictor_order=2, corrector_order=2, algorithm_type="data_prediction"),
    _entry("ddim", "DDIMScheduler", "DDIM (Song et al. 2020), eta 0, on the release's linspace timesteps; x0 never "
           "clipped (latents, not pixels)", clip_sample=False, **_LINSPACE),
    _entry("euler", "EulerDiscreteScheduler", "Euler (Karras et al. 2022) on the discrete schedule"),
    _entry("euler_ancestral", "EulerAncestralDiscreteScheduler", "Euler ancestral (Karras et al. 2022)"),
    _entry("unipc", "UniPCMultistepScheduler", "UniPC multistep (Zhao et al. 2023)"),
    _entry("ddpm", "DDPMScheduler", "DDPM ancestral sampling (Ho et al. 2020) on evenly spread timesteps, as the "
           "original IDDPM respacing", clip_sample=False, **_LINSPACE),
    _entry("lcm", "LCMScheduler", "Latent consistency sampling (Luo et al. 2023) for PixArt-LCM: 4 steps, cfg 1"),
    _entry("dmd", "DDPMScheduler", "One step at a set timestep (400) with DDPM, as the PixArt-α DMD release samples "
           "(Yin et al. 2023); CFG 1", clip_sample=False),
]}
DEFAULT = "dpmpp_2m"
DMD = "dmd"  # one step at DMD_TIMESTEP (or the timestep asked for): no schedule of steps
DMD_TIMESTEP = 400


def make(scheduler: str):
    """A fresh diffusers scheduler for a table id."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {list(SCHEDULERS)}.")
    return SCHEDULERS[scheduler].make()
