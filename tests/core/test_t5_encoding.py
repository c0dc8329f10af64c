"""T5 encoding: truncation keeps EOS last (against T5 run on hand-built token ids), the embedding-cache key changes
with every input that changes the encoding, and the token limits (the DiT's, or a count)."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from cases import LONG_PROMPT as LONG
from cases import words as _words
from harness import models as tiny
from pixart_core import t5 as ct5

CPU = torch.device("cpu")


@pytest.mark.parametrize("limit,n", [(300, 299), (300, 300), (300, 301), (300, 400), (120, 120), (120, 121),
                                     (120, 300)])
def test_truncation_keeps_eos_at_the_last_position(tokenizer, limit, n):
    """A prompt over the limit keeps its first limit-1 tokens and EOS last: checked on the embeddings, against T5 run on
    the hand-built token ids."""
    t5 = tiny.make_t5()
    prompt = _words(n)
    full = tokenizer(prompt).input_ids
    assert len(full) == n and full[-1] == tokenizer.eos_token_id
    kept = full if n <= limit else full[:limit - 1] + [tokenizer.eos_token_id]
    with torch.no_grad():
        want = t5(input_ids=torch.tensor([kept])).last_hidden_state
    got, mask = ct5.encode(ct5.LoadedT5(t5), tokenizer, prompt, limit, CPU,
                           cleaning="none")
    assert got.shape[1] == len(kept) == min(n, limit) and int(mask.sum()) == len(kept)
    assert (got - want).abs().max() <= 1e-5


def test_cache_key_changes_with_every_input_that_changes_the_encoding(tokenizer):
    """For each input of an encoding (T5 identity, prompt, caption cleaning, token limit): a change that changes the
    embeddings changes the key."""
    models = {("t5-a",): tiny.make_t5(seed=0), ("t5-b",): tiny.make_t5(seed=1)}
    base = {"identity": ("t5-a",), "prompt": LONG, "cleaning": "diffusers", "max_tokens": 300}
    changes = {"identity": ("t5-b",), "prompt": LONG + " at night", "cleaning": "none", "max_tokens": 120}

    def encoding(s):
        t5 = ct5.LoadedT5(models[s["identity"]])
        return ct5.encode(t5, tokenizer, s["prompt"], s["max_tokens"], CPU, cleaning=s["cleaning"])[0]

    def key(s):
        return ct5.cache_key(s["identity"], ct5.preprocess(s["prompt"], s["cleaning"]), s["cleaning"], s["max_tokens"])

    for field, value in changes.items():
        changed = {**base, field: value}
        a, b = encoding(base), encoding(changed)
        assert a.shape != b.shape or not torch.equal(a, b), f"{field}: the change should change the encoding"
        assert key(base) != key(changed), f"the cache key ignores {field}"
    # max_tokens 0 (from the DiT) carries extra encodings: its key is not the 300-token one.
    assert key(base) != key({**base, "max_tokens": ct5.AUTO_TOKENS})
    # cleaning modes whose text happens to agree still differ in the key (the mode is part of what was encoded)
    assert ct5.cache_key(("t5-a",), "a cat", "diffusers", 300) != ct5.cache_key(("t5-a",), "a cat", "lowercase", 300)


def test_token_limits_from_the_dit():
    assert ct5.token_limits(ct5.AUTO_TOKENS) == [reference.MAX_TOKENS["sigma"], reference.MAX_TOKENS["alpha"]]
    assert ct5.token_limits(77) == [77]
    with pytest.raises(ValueError, match="must be 0"):
        ct5.token_limits(-1)


def test_token_limit_errors():
    assert ct5.token_limits(1) == [1]
    for bad in (-1, -300):
        with pytest.raises(ValueError, match=rf"^max_tokens {bad} must be 0 \(from the DiT\) or a token count"):
            ct5.token_limits(bad)


def test_cache_key_of_strip_only_prompts_keeps_case():
    """Under caption_cleaning 'none' the case reaches T5, so prompts differing in case are different encodings."""
    def key(prompt, cleaning):  # as Text Encode keys an encoding: by the cleaned text
        return ct5.cache_key(("t5",), ct5.preprocess(prompt, cleaning), cleaning, 300)

    assert key("A Cat", "none") != key("a cat", "none")
    assert key("A Cat", "lowercase") == key("a cat", "lowercase")
