"""Text Encode cleans each prompt once per encode: the cleaned text keys the embedding cache and is what T5 reads,
at every token limit it encodes.

diffusers' caption cleaning is one `_clean_caption` pass applied twice per prompt (PixArtSigmaPipeline
._text_preprocessing: `text = self._clean_caption(text)` twice), so one cleaning of a prompt is two passes. The
passes are counted on the pack's own `clean_caption`, which keeps running (the count wraps it).
"""
from __future__ import annotations

import sys
import uuid

T5_FILE = "tiny_t5xxl_fp16.safetensors"
PASSES_PER_CLEANING = 2  # diffusers: _clean_caption twice per prompt


def test_text_encode_cleans_each_prompt_once_at_every_limit(comfy, monkeypatch):
    loader, encode = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"], comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTextEncode"]
    captions = sys.modules[encode.__module__].captions  # the pack's module, as ComfyUI imported it
    real, passes = captions.clean_caption, []

    def counted(caption: str) -> str:
        passes.append(caption)
        return real(caption)

    monkeypatch.setattr(captions, "clean_caption", counted)
    t5 = loader.execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    tag = uuid.uuid4().hex[:8]  # prompts no earlier encode cached
    positive = f"A Photo of a red fox {tag} " + " ".join(["cat"] * 200)  # over 120 tokens: encoded at 300 and 120
    negative = f"blurry {tag}"
    pos, neg = encode.execute(t5=t5, positive=positive, negative=negative, max_tokens=0,
                              caption_cleaning="diffusers").result
    assert 120 in pos.at_limit and pos.mask.shape[1] > 120  # both limits were encoded
    assert len(passes) == 2 * PASSES_PER_CLEANING, len(passes)
    passes.clear()
    again = encode.execute(t5=t5, positive=positive, negative=negative, max_tokens=0, caption_cleaning="diffusers")
    assert again.result[0] is pos  # read from the embedding cache, keyed by the cleaned text
    assert len(passes) == 2 * PASSES_PER_CLEANING, len(passes)
