"""Conditioning: a prompt's T5 embeddings and mask, the encodings made at other token limits, and fitting them to
the limit a DiT was trained with."""
from __future__ import annotations

import dataclasses
import logging

import torch

from .logs import logger_name

log = logging.getLogger(logger_name(__name__))


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


def fit(positive: Conditioning, negative: Conditioning, limit: int, model: str) -> tuple[Conditioning, Conditioning]:
    """Both prompts as a DiT trained with `limit` T5 tokens (named `model` in the log) reads them: the encodings made
    at that limit where there are some, and a warning when a prompt is still longer."""
    fitted = [for_limit(c, limit) for c in (positive, negative)]
    if any(f is not c for f, c in zip(fitted, (positive, negative))):
        log.info("PixArt sampler: %s reads %d T5 tokens; using the prompt encoded at that limit.", model, limit)
    positive, negative = fitted
    longest = max(positive.mask.shape[1], negative.mask.shape[1])
    if longest > limit:
        log.warning("PixArt sampler: %s was trained with %d T5 tokens but gets %d; set max_tokens to %d (or 0, "
                    "from the DiT) in Text Encode.", model, limit, longest, limit)
    return positive, negative


def padded(c: Conditioning, length: int) -> Conditioning:
    """`c` zero-padded to `length` tokens, the padding masked out (so two prompts batch together)."""
    extra = length - c.embeds.shape[1]
    if extra <= 0:
        return c
    emb = torch.nn.functional.pad(c.embeds, (0, 0, 0, extra))
    mask = torch.nn.functional.pad(c.mask, (0, extra))
    return Conditioning(emb, mask)


def t5_name(width: int) -> str:
    """The T5-v1.1 size whose embeddings are `width` wide (its d_model)."""
    names = {512: "T5-v1.1-small", 768: "T5-v1.1-base", 1024: "T5-v1.1-large", 2048: "T5-v1.1-XL", 4096: "T5-v1.1-XXL"}
    return names.get(width, "an unusual T5")


def check_width(positive: Conditioning, negative: Conditioning, width: int) -> None:
    """Refuse embeddings of another T5 than the `width`-wide one the DiT takes, naming both."""
    for label, c in (("positive", positive), ("negative", negative)):
        if c.embeds.shape[-1] != width:
            raise ValueError(
                f"The {label} conditioning is {c.embeds.shape[-1]} wide ({t5_name(c.embeds.shape[-1])}), but this "
                f"DiT takes {width}-wide T5 embeddings ({t5_name(width)}). Load the T5 the model was trained with "
                "(T5-v1.1-XXL for every released PixArt)."
            )
