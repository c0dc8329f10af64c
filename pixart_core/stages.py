"""Staged sampling (as ComfyUI's KSamplerAdvanced): what a stage that stops with leftover noise hands on, and the
conversions between the solvers' noisy latents and ComfyUI's."""
from __future__ import annotations

import copy
import dataclasses

import torch

STATE_KEY = "pixart_solver_state"  # where a LATENT with leftover noise carries its SolverState


@dataclasses.dataclass
class SolverState:
    """What a stage that stops with leftover noise hands on, so that the next stage continues it exactly as one
    uninterrupted run would: multistep solvers keep earlier model outputs, stochastic ones go on drawing from the
    generator, inpainting goes on re-noising the original image with the run's noise."""

    scheduler_id: str
    steps: int
    end_step: int
    scheduler: object  # the solver with its history (latent-sized tensors on the CPU)
    generator_state: torch.Tensor | None
    noise: torch.Tensor  # the run's initial noise
    known: torch.Tensor | None  # the image latent an inpainting run keeps outside its mask
    latents: torch.Tensor  # the exact solver-space latents the stage ended with
    handed: torch.Tensor  # what the stage returned (the LATENT's samples, model scale): how to recognise it

    def continues(self, scheduler_id: str, steps: int, start_step: int, latents: torch.Tensor) -> bool:
        """Whether `latents`, sampled on from `start_step`, are this stage's own output, unchanged."""
        return (self.scheduler_id == scheduler_id and self.steps == steps and self.end_step == start_step
                and self.handed.shape == latents.shape
                and torch.allclose(self.handed, latents.to(self.handed), rtol=1e-5, atol=1e-6))


def moved_history(scheduler, device: torch.device):
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


def input_scales(scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with the model's input at the step being run (timestep t) = a * x0 + b * noise: sqrt(alphas_cumprod[t])
    and sqrt(1 - alphas_cumprod[t]) for the variance-preserving schedulers; Euler's keep x0 + sigma * noise and give
    the model 1 / sqrt(sigma² + 1) of it, at the sigma of their current step (between two trained timesteps when the
    schedule's timesteps are not whole numbers)."""
    if float(scheduler.init_noise_sigma) > 1.0:
        sigma = scheduler.sigmas[scheduler.step_index].to(torch.float32)
        a = (sigma * sigma + 1).rsqrt()
        return a, sigma * a
    a = scheduler.alphas_cumprod[int(t)]
    return a.sqrt(), (1 - a).sqrt()


def level_after(scheduler, last_t, next_t) -> int:
    """The timestep whose noise level a solver's latents hold after stepping from `last_t`: diffusers' DDIM steps to
    last_t - 1000 // steps whatever its timestep spacing; the others to the next timestep of the schedule."""
    if type(scheduler).__name__ == "DDIMScheduler":
        return int(last_t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return int(next_t)
