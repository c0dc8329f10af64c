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
    """An inpainting run: outside `mask` (latent size, 1 = repaint) the image latent `known` is kept, re-noised to
    each step's timestep with `noise` and blended in before every forward, the prediction there replaced by that
    noise (the image itself as the clean estimate)."""

    mask: torch.Tensor
    known: torch.Tensor
    noise: torch.Tensor  # the run's noise; zeros where the input latent is already noisy (ComfyUI keeps it as is)

    def before_step(self, scheduler, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latents with the image, noised to timestep `t`, outside the mask."""
        noisy_known = scheduler.add_noise(self.known, self.noise, t.reshape(1).repeat(latents.shape[0]))
        return blend(self.mask, latents, noisy_known)

    def prediction(self, eps: torch.Tensor) -> torch.Tensor:
        """The model's noise prediction inside the mask, the run's own noise outside."""
        return blend(self.mask, eps, self.noise)

    def result(self, latents: torch.Tensor) -> torch.Tensor:
        """A fully denoised result: the image itself outside the mask."""
        return blend(self.mask, latents, self.known)
