"""Caption handling against the references: diffusers' PixArtSigmaPipeline text preprocessing (with beautifulsoup4
and ftfy installed, so its caption cleaning really runs), and the original PixArt-Σ script's strip-only."""
from __future__ import annotations

import pytest
import torch

from cases import words as _words
from harness import models as tiny
from pixart_core import captions
from pixart_core import t5 as ct5

CPU = torch.device("cpu")


HOSTILE = {
    "plain": "A Red Fox in the SNOW",
    "url": "a cat on https://example.com/cats?id=3 and www.cats.org/page",
    "url-encoded": "a%20dog+with%2Ba%20hat",
    "html": "<b>Bold</b> cat &amp; <i>dog</i> &quot;quoted&quot; <person> on a sofa",
    "cjk": "a cat 一只猫 in 東京 ー カタカナ",
    "emoji": "a happy dog 🐶🎉 with a hat 🎩",
    "tags": "@someone posted #123 and #catsofinstagram and #1234567 ***SALE***",
    "dashes": "this-is-my-cute-cat — with – many ‒ dashes",
    "underscores": "this_is_my_cute_cat_photo",
    "punctuation": "a cat (sitting) [on] {a} mat | with / slashes \\ and... ellipsis.. «quotes» “curly” ‘single’",
    "files-and-ids": "image_1234.png photo jc6640 jc6640vc 6640vc231 1920x1080 free shipping page 12 192.168.0.1",
    "mixed-case-spaces": "   Lots   Of\tSpaces\n\nAnd Newlines \\n here   ",
    "quoted": "'a quoted caption'",
    "empty": "",
    "whitespace": "  \t\n  ",
    "300-tokens": _words(300),
    "301-tokens": _words(301),
    "400-tokens": _words(400),
    "long-url-mix": "A Photo of " + "https://x.com/a " * 50 + _words(200),
}


@pytest.fixture(scope="module")
def diffusers_pipe():
    """diffusers' PixArtSigmaPipeline preprocessing, with caption cleaning really available (no silent fallback)."""
    from diffusers import PixArtSigmaPipeline
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha
    from diffusers.utils import is_bs4_available, is_ftfy_available

    assert is_bs4_available() and is_ftfy_available(), "beautifulsoup4 and ftfy must be installed for the reference"
    assert hasattr(pipeline_pixart_alpha, "BeautifulSoup") and hasattr(pipeline_pixart_alpha, "ftfy")
    return PixArtSigmaPipeline.__new__(PixArtSigmaPipeline)  # only its text methods are used


def test_token_counts_of_the_long_prompts(tokenizer):
    for n in (300, 301, 400):
        assert len(tokenizer(HOSTILE[f"{n}-tokens"]).input_ids) == n


@pytest.mark.parametrize("key", list(HOSTILE))
def test_diffusers_mode_is_diffusers_clean_caption(diffusers_pipe, key):
    prompt = HOSTILE[key]
    want = diffusers_pipe._text_preprocessing(prompt, clean_caption=True)[0]
    assert captions.preprocess(prompt, "diffusers") == want


@pytest.mark.parametrize("key", list(HOSTILE))
def test_lowercase_mode_is_diffusers_without_cleaning(diffusers_pipe, key):
    prompt = HOSTILE[key]
    assert captions.preprocess(prompt, "lowercase") == diffusers_pipe._text_preprocessing(prompt, clean_caption=False)[0]


@pytest.mark.parametrize("key", list(HOSTILE))
def test_none_mode_is_the_original_sigma_script(key):
    # PixArt-sigma scripts/inference.py:70,75,209: prompts are only .strip()ped (no lowercasing, no cleaning).
    prompt = HOSTILE[key]
    assert captions.preprocess(prompt, "none") == prompt.strip()


def test_the_modes_really_differ_on_the_hostile_set(diffusers_pipe):
    """The hostile set exercises the cleaning: most prompts change under it, and lowercase differs from none."""
    cleaned = sum(captions.preprocess(p, "diffusers") != captions.preprocess(p, "lowercase") for p in HOSTILE.values())
    assert cleaned >= 12
    assert captions.preprocess(HOSTILE["plain"], "none") == "A Red Fox in the SNOW"
    assert captions.preprocess(HOSTILE["plain"], "lowercase") == "a red fox in the snow"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="caption_cleaning 'Lower' is not one of"):
        captions.preprocess("a cat", "Lower")


@pytest.mark.parametrize("pipeline,limit", [("PixArtSigmaPipeline", 300), ("PixArtAlphaPipeline", 120)])
@pytest.mark.parametrize("clean", [True, False])
@pytest.mark.parametrize("key", ["url", "html", "cjk", "emoji", "tags", "punctuation", "mixed-case-spaces", "empty",
                                 "whitespace", "300-tokens", "301-tokens", "400-tokens", "long-url-mix"])
def test_encoding_matches_diffusers_encode_prompt(tokenizer, pipeline, limit, clean, key):
    """Embeddings and mask as diffusers' pipeline encodes the prompt (same tiny T5; its padding to the limit)."""
    import diffusers

    t5 = tiny.make_t5()
    pipe = getattr(diffusers, pipeline)(tokenizer=tokenizer, text_encoder=t5, vae=None, transformer=None,
                                        scheduler=None)
    kw = dict(do_classifier_free_guidance=False, device=CPU, clean_caption=clean)
    if pipeline == "PixArtSigmaPipeline":
        kw["max_sequence_length"] = limit
    want, want_mask, _, _ = pipe.encode_prompt(HOSTILE[key], **kw)
    mode = "diffusers" if clean else "lowercase"
    got, mask = ct5.encode(ct5.LoadedT5(t5), tokenizer, HOSTILE[key], limit, CPU,
                           pad=True, cleaning=mode)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)  # fp32 defaults: the sums run in another order
