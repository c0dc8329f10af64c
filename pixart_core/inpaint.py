"""Inpainting: the repaint mask at latent size, and what a run keeps outside it (as ComfyUI's KSamplerX0Inpaint)."""
from __future__ import annotations

import dataclasses

import torch


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


def blend(mask: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """`inside` where the mask is 1, `outside` where it is 0 (linear in between)."""
    return mask * inside + (1 - mask) * outside


@dataclasses.dataclass(frozen=True)
class Inpainting:
    """An inpainting run, as ComfyUI's KSamplerX0Inpaint: the model sees the image latent `known` outside `mask`
    (latent size, 1 = repaint), re-noised to each step's timestep with `noise`, and its clean estimate is blended with
    the image (mask * estimate + (1 - mask) * image); the solver's own latents are not blended."""

    mask: torch.Tensor
    known: torch.Tensor
    noise: torch.Tensor  # the run's noise; zeros where the input latent is already noisy (ComfyUI keeps it as is)

    def step_inputs(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the solver's latents, the model's input) at timestep `t`. Where the mask is 0 both hold the image noised
        to `t` (the result keeps the image there; a stage stopping early hands it on at its level). Where the mask
        lies between 0 and 1 only the model's input is blended with it: the solver goes on from its own latents."""
        noisy_known = scheduler.add_noise(self.known, self.noise, t.reshape(1).repeat(latents.shape[0]))
        latents = torch.where(self.mask == 0, noisy_known, latents)
        return latents, scheduler.scale_model_input(blend(self.mask, latents, noisy_known), t)

    def prediction(self, eps: torch.Tensor, x_in: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor) -> torch.Tensor:
        """The noise prediction the solver steps with from its own latents x (scaled as the model's input, = a * x0
        + b * noise): its clean estimate is the blend of the model's (from its input x_in and `eps`) and the image.
        Where the mask is 1 that is `eps` itself, bit for bit."""
        m = self.mask
        return m * eps + (x - m * x_in - (1 - m) * a * self.known) / b

    def result(self, latents: torch.Tensor) -> torch.Tensor:
        """A fully denoised result: the image itself where the mask is 0 (the blended estimates elsewhere)."""
        return torch.where(self.mask == 0, self.known, latents)
