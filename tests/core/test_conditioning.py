"""Conditionings into the DiT: a positive and a negative of different lengths sample as diffusers does with the shorter
one zero-padded and masked, a T5 of the wrong width is named, and the encoding made at the DiT's token limit is
the one it reads."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from pixart_core import conditioning, sampling
from pixart_core.conditioning import Conditioning


@pytest.mark.parametrize("width,name", [(512, "T5-v1.1-small"), (768, "T5-v1.1-base"), (1024, "T5-v1.1-large"),
                                        (2048, "T5-v1.1-XL"), (4096, "T5-v1.1-XXL"), (300, "an unusual T5")])
def test_wrong_t5_width_names_the_t5(width, name):
    """T5-v1.1 widths (d_model) as google's v1.1 configs give them: small 512, base 768, large 1024, XL 2048, XXL 4096."""
    dit = tiny.make_dit()
    cond = Conditioning(torch.randn(1, 4, width), torch.ones(1, 4, dtype=torch.long))
    good = Conditioning(torch.randn(1, 4, tiny.T5_WIDTH), torch.ones(1, 4, dtype=torch.long))
    noise, _ = sampling.initial_noise(0, 1, 4, 16, 16)
    import re

    with pytest.raises(ValueError, match=re.escape(f"is {width} wide ({name}), but this DiT takes 64-wide")):
        sampling.sample(dit, cond, good, noise, steps=1, cfg=4.5)
    with pytest.raises(ValueError, match=re.escape(f"The negative conditioning is {width} wide ({name})")):
        sampling.sample(dit, good, cond, noise, steps=1, cfg=4.5)


def test_conditionings_of_different_lengths_match_diffusers_padded(tmp_path):
    """A 9-token positive with a 1-token (empty) negative samples as diffusers does with the negative zero-padded to 9
    tokens and masked (what the pipeline gets from its tokenizer's padding)."""
    from diffusers import PixArtSigmaPipeline

    torch.manual_seed(7)
    dit = tiny.make_dit()
    pos = Conditioning(torch.randn(1, 9, tiny.T5_WIDTH), torch.ones(1, 9, dtype=torch.long))
    neg = Conditioning(torch.randn(1, 1, tiny.T5_WIDTH), torch.ones(1, 1, dtype=torch.long))
    noise, gen = sampling.initial_noise(4, 1, 4, 64, 64)
    ours = sampling.sample(dit, pos, neg, noise, steps=3, cfg=4.5, generator=gen)
    ours_swapped = sampling.sample(dit, neg, pos, noise, steps=3, cfg=4.5)
    neg_embeds = torch.cat([neg.embeds, torch.zeros(1, 8, tiny.T5_WIDTH)], dim=1)
    neg_mask = torch.tensor([[1] + [0] * 8])
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny.make_vae(), transformer=dit,
                               scheduler=reference.scheduler("dpmpp_2m"))
    kw = dict(prompt=None, negative_prompt=None, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.5,
              height=64, width=64, output_type="latent", use_resolution_binning=False)
    want = pipe(prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, negative_prompt_embeds=neg_embeds,
                negative_prompt_attention_mask=neg_mask, **kw).images
    want_swapped = pipe(prompt_embeds=neg_embeds, prompt_attention_mask=neg_mask, negative_prompt_embeds=pos.embeds,
                        negative_prompt_attention_mask=pos.mask, **kw).images
    assert (ours - want).abs().max() <= 1e-4 and (ours_swapped - want_swapped).abs().max() <= 1e-4


def test_negative_one_token_shorter_is_padded_by_hand_computation():
    """Lengths 3 and 2 (one token apart): the same latents as the negative zero-padded to 3 with a 0 in its mask."""
    torch.manual_seed(8)
    dit = tiny.make_dit()
    pos = Conditioning(torch.randn(1, 3, tiny.T5_WIDTH), torch.ones(1, 3, dtype=torch.long))
    neg = Conditioning(torch.randn(1, 2, tiny.T5_WIDTH), torch.ones(1, 2, dtype=torch.long))
    padded = Conditioning(torch.cat([neg.embeds, torch.zeros(1, 1, tiny.T5_WIDTH)], 1),
                                   torch.tensor([[1, 1, 0]]))
    noise, _ = sampling.initial_noise(2, 1, 4, 32, 32)
    a = sampling.sample(dit, pos, neg, noise, steps=2, cfg=4.5)
    b = sampling.sample(dit, pos, padded, noise, steps=2, cfg=4.5)
    assert torch.equal(a, b)


def test_t5_of_the_wrong_width_is_named_at_sampling():
    from pixart_core import sampling
    from pixart_core.conditioning import Conditioning

    dit = tiny.make_dit()
    cond = Conditioning(torch.randn(1, 4, 768), torch.ones(1, 4, dtype=torch.long))
    noise, _ = sampling.initial_noise(0, 1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"768 wide \(T5-v1.1-base\).*64-wide"):
        sampling.sample(dit, cond, cond, noise, steps=1, cfg=4.5)


def test_for_limit_picks_the_encoding_made_at_the_dit_limit():
    long = conditioning.Conditioning(torch.zeros(1, 300, 4), torch.ones(1, 300, dtype=torch.long))
    short = conditioning.Conditioning(torch.ones(1, 120, 4), torch.ones(1, 120, dtype=torch.long))
    long.at_limit[120] = short
    assert conditioning.for_limit(long, 120) is short
    assert conditioning.for_limit(long, 300) is long
    plain = conditioning.Conditioning(torch.zeros(1, 150, 4), torch.ones(1, 150, dtype=torch.long))
    assert conditioning.for_limit(plain, 120) is plain  # nothing better to offer: the sampler warns
    fits = conditioning.Conditioning(torch.zeros(1, 120, 4), torch.ones(1, 120, dtype=torch.long), {120: short})
    assert conditioning.for_limit(fits, 120) is fits


def test_fit_says_when_it_reads_the_encoding_made_at_the_limit_and_warns_when_a_prompt_is_still_longer(caplog):
    """The sampler's log: the model and its token limit when a prompt encoded at that limit is used instead; a warning
    with the limit, the prompt's length and the max_tokens to set when one is still longer; nothing when both fit."""
    import logging

    caplog.set_level(logging.INFO, logger="pixart_sigma")
    made = conditioning.Conditioning(torch.ones(1, 120, 4), torch.ones(1, 120, dtype=torch.long))
    long = conditioning.Conditioning(torch.zeros(1, 300, 4), torch.ones(1, 300, dtype=torch.long), {120: made})
    short = conditioning.Conditioning(torch.zeros(1, 20, 4), torch.ones(1, 20, dtype=torch.long))
    assert conditioning.fit(short, short, 120, "PixArt-alpha XL/2") == (short, short)
    assert caplog.records == []
    assert conditioning.fit(long, short, 120, "PixArt-alpha XL/2") == (made, short)
    assert [r.getMessage() for r in caplog.records] == [
        "PixArt sampler: PixArt-alpha XL/2 reads 120 T5 tokens; using the prompt encoded at that limit."]
    caplog.clear()
    plain = conditioning.Conditioning(torch.zeros(1, 150, 4), torch.ones(1, 150, dtype=torch.long))
    assert conditioning.fit(short, plain, 120, "PixArt-alpha XL/2") == (short, plain)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "PixArt sampler: PixArt-alpha XL/2 was trained with 120 T5 tokens but gets 150; set max_tokens to "
                    "120 (or 0, from the DiT) in Text Encode.")]


def test_wrong_width_refusal_says_which_prompt_and_what_to_load():
    """The whole message, for each prompt: which one, its width and T5, the DiT's, and what to load."""
    good = Conditioning(torch.randn(1, 4, 4096), torch.ones(1, 4, dtype=torch.long))
    bad = Conditioning(torch.randn(1, 4, 512), torch.ones(1, 4, dtype=torch.long))
    for label, pos, neg in (("positive", bad, good), ("negative", good, bad)):
        with pytest.raises(ValueError) as e:
            conditioning.check_width(pos, neg, 4096)
        assert str(e.value) == (f"The {label} conditioning is 512 wide (T5-v1.1-small), but this DiT takes "
                                "4096-wide T5 embeddings (T5-v1.1-XXL). Load the T5 the model was trained with "
                                "(T5-v1.1-XXL for every released PixArt).")
