"""Guidance as one guided prediction around the DiT: classifier-free guidance (and its interval), perturbed-attention
guidance and CFG rescale. The loop calls predict(x, t, step) and knows none of them, as k-diffusion's model wrappers
or ComfyUI's CFGGuider sit outside their samplers."""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Iterator

import torch

from .conditioning import Conditioning, padded

# predict(x, t, step): the guided noise prediction for the (scheduler-scaled) latents x at timestep t, step `step`
# (0-based) of the whole schedule.
Predict = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How the prediction is guided: CFG scale and the part of the schedule it runs on, PAG, CFG rescale."""

    cfg: float
    pag_scale: float = 0.0  # > 0: perturbed-attention guidance (diffusers' PixArtSigmaPAGPipeline)
    pag_layers: str = "blocks.1"  # the self-attention layers PAG perturbs, as diffusers' pag_applied_layers
    guidance_rescale: float = 0.0  # diffusers' rescale_noise_cfg
    cfg_start: float = 0.0  # CFG runs on the steps whose start lies in [cfg_start, cfg_end) of the schedule
    cfg_end: float = 1.0


def cfg_active(step: int, steps: int, cfg: float, cfg_start: float = 0.0, cfg_end: float = 1.0) -> bool:
    """Whether step `step` (0-based, of the whole schedule of `steps`) runs CFG: cfg > 1 and the step starts inside
    [cfg_start, cfg_end) as fractions of the schedule."""
    return cfg > 1.0 and cfg_start <= step / steps < cfg_end


def model_at(model: torch.nn.Module, step: int, steps: int) -> torch.nn.Module:
    """The model to call at step `step` (0-based, of the whole schedule of `steps`): a model that acts differently
    over parts of the schedule (a DiT with ControlNets applied from start to end) gives its form for that step with
    `at_step(step, steps)`, counted as the CFG interval counts; any other model is itself."""
    at_step = getattr(type(model), "at_step", None)  # on the class: wrappers forward unknown attributes to the DiT
    return model if at_step is None else at_step(model, step, steps)


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
def _restored_processors(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Whatever the prediction sets as these modules' attention processors, they get their own back (also on errors
    and Cancel): the model is shared with every later run."""
    old = [m.processor for m in modules]
    try:
        yield
    finally:
        for m, p in zip(modules, old):
            m.processor = p


def combine(out: torch.Tensor, use_cfg: bool, g: Guidance, learned_sigma: bool) -> torch.Tensor:
    """Epsilon from one forward's batch ([uncond,] cond[, perturbed]): CFG, then PAG as diffusers' PAGMixin adds
    it, the learned-variance channels dropped, then CFG rescale against the conditional prediction."""
    parts = out.chunk((2 if use_cfg else 1) + (1 if g.pag_scale > 0 else 0))
    cond = parts[1] if use_cfg else parts[0]
    pred = parts[0] + g.cfg * (cond - parts[0]) if use_cfg else cond
    if g.pag_scale > 0:
        pred = pred + g.pag_scale * (cond - parts[-1])
    if learned_sigma:
        pred, cond = pred.chunk(2, dim=1)[0], cond.chunk(2, dim=1)[0]
    if use_cfg and g.guidance_rescale > 0:
        pred = rescale_noise_cfg(pred, cond, g.guidance_rescale)
    return pred


def _text_batch(model: torch.nn.Module, conds: list[Conditioning], x: torch.Tensor, dtype: torch.dtype) -> tuple:
    """Embeddings, attention mask and micro-conditions of a forward over `conds`, each repeated for x's batch."""
    batch, device = x.shape[0], x.device
    embeds = torch.cat([c.embeds.repeat(batch, 1, 1) for c in conds]).to(device=device, dtype=dtype)
    m = torch.cat([c.mask.repeat(batch, 1) for c in conds])
    # An all-ones mask changes nothing; without one, SDPA keeps its unmasked fast kernels.
    m = None if bool(m.all()) else m.to(device=device)
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(model, "use_additional_conditions", False):
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        n = embeds.shape[0]
        added = {"resolution": torch.tensor([[h, w]], dtype=dtype, device=device).repeat(n, 1),
                 "aspect_ratio": torch.tensor([[float(h / w)]], dtype=dtype, device=device).repeat(n, 1)}
    return embeds, m, added


@contextlib.contextmanager
def guided(model: torch.nn.Module, positive: Conditioning, negative: Conditioning, g: Guidance,
           steps: int) -> Iterator[Predict]:
    """The guided prediction of `model` (a PixArt DiT, or a wrapper with its forward; its form for each step, see
    model_at) over a schedule of `steps`: one forward per step over [negative,] positive[, positive with perturbed self-attention]. PAG's attention
    processors (diffusers') are set per step and the model's own restored on leaving, also on errors and Cancel."""
    dtype = next(model.parameters()).dtype
    length = max(positive.embeds.shape[1], negative.embeds.shape[1])
    pos, neg = padded(positive, length), padded(negative, length)
    use_pag = g.pag_scale > 0
    targets = pag_targets(model, pag_layer_patterns(g.pag_layers)) if use_pag else []
    processors = {}
    if use_pag:
        from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                          PAGIdentitySelfAttnProcessor2_0)

        processors = {True: PAGCFGIdentitySelfAttnProcessor2_0(), False: PAGIdentitySelfAttnProcessor2_0()}
    learned_sigma = model.config.out_channels // 2 == model.config.in_channels
    batches: dict[bool, tuple] = {}

    def predict(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        use_cfg = cfg_active(step, steps, g.cfg, g.cfg_start, g.cfg_end)
        k = (2 if use_cfg else 1) + (1 if use_pag else 0)
        xs = torch.cat([x] * k) if k > 1 else x
        tt = t[None].to(x.device).expand(xs.shape[0]) if torch.is_tensor(t) else \
            torch.full((xs.shape[0],), t, device=x.device)
        for m in targets:
            m.processor = processors[use_cfg]
        if use_cfg not in batches:
            batches[use_cfg] = _text_batch(model, ([neg] if use_cfg else []) + [pos] + ([pos] if use_pag else []),
                                           x, dtype)
        embeds, attn_mask, added = batches[use_cfg]
        out = model_at(model, step, steps)(xs.to(dtype), encoder_hidden_states=embeds, encoder_attention_mask=attn_mask,
                                           timestep=tt, added_cond_kwargs=added, return_dict=False)[0].float()
        return combine(out, use_cfg, g, learned_sigma)

    with _restored_processors(targets):
        yield predict
