"""T5 files and their settings: the config built from tensor shapes against the release's, the tokenizer's search,
bitsandbytes' settings (and the hint without it), folders of another model or with missing weights, sharded folders,
other text encoders named, and what a loaded T5 records."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import reference_settings as reference
from harness import models as tiny
from pixart_core import files
from pixart_core import t5 as ct5
from pixart_core import t5_spec


def test_tokenizer_candidates(tmp_path):
    assert ct5.tokenizer_candidates(tmp_path) == [tmp_path / "tokenizer", tmp_path]
    f = tmp_path / "t5.safetensors"
    f.write_bytes(b"x")
    assert ct5.tokenizer_candidates(f) == []


def _t5_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a T5-v1.1 encoder with config `c` (as transformers lays them out)."""
    from transformers import T5Config, T5EncoderModel

    from pixart_core.meta import empty_weights

    with empty_weights():
        model = T5EncoderModel(T5Config(**c))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["xxl", "tiny"])
def test_t5_config_from_shapes_is_the_released_config(which):
    """The config the single-file loader builds from tensor shapes equals the release's config, field by field."""
    want = reference.T5_XXL if which == "xxl" else {**reference.T5_XXL, **tiny.T5_CONFIG}
    cfg = t5_spec.config_from_shapes(_t5_shapes(want), "t5xxl_fp16.safetensors")
    # transformers 5 keeps tie_word_embeddings always True and reads a saved False as scale_decoder_outputs=False
    fields = [k for k in reference.T5_XXL if k != "tie_word_embeddings"]
    assert {k: getattr(cfg, k) for k in fields} == {k: want[k] for k in fields}
    assert cfg.scale_decoder_outputs is False  # what an untied (tie_word_embeddings false) config gives
    assert cfg.is_encoder_decoder is False and cfg.use_cache is False
    assert cfg.architectures == ["T5EncoderModel"]


def test_tokenizer_not_found_says_where_it_looked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ct5.load_tokenizer([a, b])
    msg = str(e.value)
    assert msg.startswith(f"No T5 tokenizer found (looked in: {a}, {b}). ")
    assert msg.endswith("Put tokenizer.json (from the T5-v1.1-XXL or PixArt-Sigma repository) next to the weights.")


def test_bitsandbytes_configs():
    """8-bit: LLM.int8; 4-bit: nf4 (the quantization named in the loader) computing in the chosen dtype."""
    q8 = t5_spec.bnb_config(t5_spec.QUANT_8BIT, torch.float32)
    assert q8.load_in_8bit and not q8.load_in_4bit
    q4 = t5_spec.bnb_config(t5_spec.QUANT_NF4, torch.bfloat16)
    assert q4.load_in_4bit and not q4.load_in_8bit
    assert (q4.bnb_4bit_quant_type, q4.bnb_4bit_compute_dtype, q4.bnb_4bit_use_double_quant) == (
        "nf4", torch.bfloat16, False)
    with pytest.raises(ValueError, match=r"^T5 quantization 'int4' is not one of \('none', "):
        t5_spec.bnb_config("int4", torch.float32)


def test_quantized_t5_without_bitsandbytes_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(RuntimeError) as e:
        t5_spec.bnb_config(t5_spec.QUANT_8BIT, torch.float32)
    assert str(e.value) == t5_spec.BNB_INSTALL_HINT and "pip install" in str(e.value)


# google/t5-v1_1-small config.json: d_model 512, d_ff 1024, d_kv 64, num_heads 6, num_layers 8 (heads x d_kv != d_model)
T5_SMALL = {**reference.T5_XXL, "d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 6, "num_layers": 8}


def test_t5_config_from_shapes_when_heads_times_d_kv_is_not_the_width(caplog):
    cfg = t5_spec.config_from_shapes(_t5_shapes(T5_SMALL), "t5_small.safetensors")
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (512, 64, 6, 1024, 8)
    assert "t5_small.safetensors: T5 width 512, not T5-v1.1-XXL's 4096" in caplog.text
    caplog.clear()
    t5_spec.config_from_shapes(_t5_shapes(reference.T5_XXL), "t5xxl.safetensors")
    assert "T5 width" not in caplog.text


def test_t5_config_from_shapes_reads_the_position_buckets():
    """The relative-position bucket count is read from the bias table's rows (T5-v1.1 has 32, transformers' default,
    so only another count shows it is read)."""
    cfg = t5_spec.config_from_shapes(_t5_shapes({**T5_SMALL, "relative_attention_num_buckets": 16}), "t5.safetensors")
    assert cfg.relative_attention_num_buckets == 16


def _umt5_shapes() -> dict[str, tuple[int, ...]]:
    """A small umT5 encoder's shapes as transformers lays them out, with google/umt5-xxl's 256384-token vocabulary
    (its config.json's vocab_size)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from pixart_core.meta import empty_weights

    with empty_weights():
        model = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def test_t5_files_of_other_t5_kinds_are_refused_with_the_whole_message():
    """umT5 (its vocabulary), an original T5 (relu feed-forward: one `wi`, no gated `wi_0`/`wi_1`) and a umT5 cut
    short (no query in block 0), which is described as the umT5 it is, from the shapes."""
    cases = {
        "umt5": (_umt5_shapes(), "this is a umT5 encoder (256384-token vocabulary); PixArt needs T5-v1.1-XXL "
                                 "(32128 tokens), e.g. t5xxl_fp16.safetensors."),
        "t5": (_t5_shapes({**T5_SMALL, "feed_forward_proj": "relu", "dense_act_fn": "relu", "is_gated_act": False}),
               "this is an original T5 (no gated feed-forward), not T5-v1.1; PixArt needs T5-v1.1-XXL."),
        "cut": ({k: v for k, v in _umt5_shapes().items() if k != "encoder.block.0.layer.0.SelfAttention.q.weight"},
                "this is not a T5 encoder; it looks like a umT5 text encoder (256384-token vocabulary; PixArt needs "
                "T5-v1.1-XXL with 32128 tokens). Choose a T5-v1.1-XXL file (e.g. t5xxl_fp16.safetensors) in "
                "models/text_encoders."),
    }
    for what, (shapes, message) in cases.items():
        with pytest.raises(files.WeightFileError) as e:
            t5_spec.config_from_shapes(shapes, f"{what}.safetensors")
        assert str(e.value) == f"{what}.safetensors: {message}", what


def test_t5_shapes_missing_one_anchor_are_not_a_t5():
    from pixart_core import files

    shapes = _t5_shapes(tiny.T5_CONFIG)
    for key in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight"):
        partial = {k: v for k, v in shapes.items() if k != key and not (key == "shared.weight" and "embed" in k)}
        with pytest.raises(files.WeightFileError, match="this is not a T5 encoder"):
            t5_spec.config_from_shapes(partial, "odd.safetensors")
    only_embed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in shapes.items()}
    assert t5_spec.config_from_shapes(only_embed, "t5.safetensors").vocab_size == 32128


def test_loaded_t5_computes_in_the_dtype_asked_for(tmp_path):
    from safetensors.torch import save_file

    t5 = tiny.make_t5()
    t5.save_pretrained(tmp_path / "pipe" / "text_encoder")
    folder = ct5.load_t5(tmp_path / "pipe", "none", torch.bfloat16)
    assert folder.model.dtype == torch.bfloat16
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(tiny.t5_single_file_sd(t5), str(path))
    nf4 = ct5.load_t5(path, t5_spec.QUANT_NF4, torch.bfloat16)
    assert nf4.model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.uint8  # quantized
    assert nf4.model.encoder.block[0].layer[1].DenseReluDense.wi_0.compute_dtype == torch.bfloat16


def test_t5_folder_of_another_model_or_with_missing_weights(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from pixart_core import files

    t5 = tiny.make_t5()
    t5.save_pretrained(tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    cfg["model_type"] = "clip_text_model"
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(files.WeightFileError, match=r"config.json describes a 'clip_text_model' model, not a T5"):
        ct5.load_t5(tmp_path / "clip", "none", torch.float32)
    del cfg["model_type"]
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(files.WeightFileError, match=r"config.json describes a 'unknown' model"):
        ct5.load_t5(tmp_path / "clip", "none", torch.float32)
    t5.save_pretrained(tmp_path / "cut")
    sd = load_file(str(tmp_path / "cut" / "model.safetensors"))
    gone = sorted(k for k in sd if ".layer.1.DenseReluDense." in k)[:5]
    save_file({k: v for k, v in sd.items() if k not in gone}, str(tmp_path / "cut" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(tmp_path / "cut", "none", torch.float32)
    msg = str(e.value)
    assert msg.startswith("cut: weights are missing for [") and msg.endswith("(5 in all).")
    assert sum(k in msg for k in gone) == 4  # the first four named


def test_t5_file_with_only_encoder_embed_tokens_loads(tmp_path):
    """Some exports keep encoder.embed_tokens.weight instead of shared.weight: the same model."""
    from safetensors.torch import save_file

    t5 = tiny.make_t5()
    sd = tiny.t5_single_file_sd(t5)
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    path = tmp_path / "t5_embed_tokens.safetensors"
    save_file(sd, str(path))
    loaded = ct5.load_t5(path, "none", torch.float32)
    ids = torch.tensor([[100, 200, 1]])
    want = tiny.make_t5()
    want.load_state_dict({k: v.half().float() for k, v in want.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).last_hidden_state, want(input_ids=ids).last_hidden_state)


def test_t5_sharded_folder(tmp_path):
    t5 = tiny.make_t5()
    t5.save_pretrained(tmp_path / "t5-v1_1-xxl", max_shard_size="500KB")
    assert (tmp_path / "t5-v1_1-xxl" / "model.safetensors.index.json").is_file()
    loaded = ct5.load_t5(tmp_path / "t5-v1_1-xxl", "none", torch.float32)
    ids = torch.tensor([[100, 200, 1]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).last_hidden_state, t5(input_ids=ids).last_hidden_state)


def test_wrong_text_encoders_are_named(tmp_path):
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 2),
               "text_model.embeddings.token_embedding.weight": torch.zeros(49408, 2)}, str(clip))
    with pytest.raises(files.WeightFileError, match="a CLIP text encoder"):
        ct5.load_t5(clip, "none", torch.float32)
    base = tmp_path / "t5_base.safetensors"
    cfg = dict(tiny.T5_CONFIG, vocab_size=32100)
    from transformers import T5Config, T5EncoderModel

    save_file(tiny.t5_single_file_sd(T5EncoderModel(T5Config(**cfg))), str(base))
    with pytest.raises(files.WeightFileError, match="32100-token vocabulary"):
        ct5.load_t5(base, "none", torch.float32)


def test_no_tokenizer_anywhere_says_where_it_looked(tmp_path):
    from pixart_core import t5 as ct5

    with pytest.raises(FileNotFoundError, match="No T5 tokenizer found .*tokenizer.json"):
        ct5.load_tokenizer([tmp_path / "tokenizer", tmp_path])


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."], ids=["plain", "comfy-prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_file_t5_is_transformers_own_load(tmp_path, dtype, prefix):
    """A plain fp16 T5 file (ComfyUI's t5xxl_fp16 layout, with a decoder tensor beside it that is never read) loads
    as the model transformers' from_pretrained builds from the same tensors in a transformers folder: every tensor
    equal in `dtype`, one embedding Parameter under both names, config.dtype set, equal encodings."""
    from transformers import T5EncoderModel

    t5 = tiny.make_t5()
    sd = tiny.t5_single_file_sd(t5, prefix=prefix)
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file({**sd, prefix + "decoder.final_layer_norm.weight": torch.ones(t5.config.d_model).half()}, str(path))
    folder = tmp_path / "transformers"
    t5.config.save_pretrained(folder)
    save_file({k[len(prefix):]: v for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    want = T5EncoderModel.from_pretrained(str(folder), dtype=dtype).eval()

    got = ct5.load_t5(path, "none", dtype).model
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for k in want_sd:
        assert got_sd[k].dtype == dtype and torch.equal(got_sd[k], want_sd[k]), k
    assert got.shared.weight is got.encoder.embed_tokens.weight
    assert want.shared.weight is want.encoder.embed_tokens.weight
    assert got.config.dtype == want.config.dtype == dtype
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    ids = torch.tensor([[100, 200, 300, 1]])
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).last_hidden_state, want(input_ids=ids).last_hidden_state)


T5_PEAK_SCRIPT = """
import sys, torch
from transformers import T5EncoderModel  # imported before the peak mark, as ComfyUI has it imported
from pixart_core import t5

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak mark starts here
base = kib("VmRSS")
model = t5.load_t5(sys.argv[1], "none", torch.float32).model
print((kib("VmHWM") - base) * 1024, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(),
                    reason="needs Linux's peak-RSS reset")
def test_a_t5_file_with_two_different_embeddings_encodes_as_transformers_does(tmp_path):
    """A file whose `shared.weight` and `encoder.embed_tokens.weight` differ: transformers then leaves them untied
    (it warns) and its encoder embeds with `encoder.embed_tokens`; the encodings are equal."""
    from transformers import T5EncoderModel

    t5 = tiny.make_t5()
    sd = tiny.t5_single_file_sd(t5)  # shared.weight only
    other = torch.randn(sd["shared.weight"].shape, generator=torch.Generator().manual_seed(3)).half()
    sd["encoder.embed_tokens.weight"] = other
    assert not torch.equal(sd["shared.weight"], sd["encoder.embed_tokens.weight"])
    save_file(sd, str(tmp_path / "t5.safetensors"))
    folder = tmp_path / "transformers"
    t5.config.save_pretrained(folder)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    want = T5EncoderModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    got = ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32).model
    ids = torch.tensor([[5, 17, 3, 1]])
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).last_hidden_state, want(input_ids=ids).last_hidden_state)


def test_single_file_t5_load_never_holds_the_file_beside_the_model(tmp_path):
    """A 16-block, 512-wide T5-v1.1 (32128-token vocabulary) in an fp16 file of 159.4 MiB, loaded in fp32 (318.8 MiB)
    in a fresh process: the peak resident memory over the start stays under the model plus half the file. Keeping
    the file's pages mapped until the last tensor is converted (transformers' loader) needs the model plus the whole
    file (478 MiB); here only the tensors being converted are mapped at once (the largest, the embedding, is
    32128 x 512 x 2 bytes = 31.4 MiB)."""
    import subprocess
    import sys

    from transformers import T5Config, T5EncoderModel

    from harness.location import child_env

    config = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=16, num_heads=8,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in T5EncoderModel(config).state_dict().items()
                 if k != "encoder.embed_tokens.weight"}
    torch.manual_seed(0)
    path = tmp_path / "t5_fp16.safetensors"
    save_file({k: torch.randn(s).half() for k, s in names.items()}, str(path))
    file_bytes = sum(2 * torch.Size(s).numel() for s in names.values())
    # embedding 32128*512; per block q,k,v,o 4*512*512, wi_0,wi_1,wo 3*2048*512, two norms 2*512; block 0's
    # relative attention bias 32*8; final norm 512; 2 bytes each
    assert file_bytes == 2 * (32128 * 512 + 16 * (4 * 512 * 512 + 3 * 2048 * 512 + 2 * 512) + 32 * 8 + 512)
    r = subprocess.run([sys.executable, "-c", T5_PEAK_SCRIPT, str(path)], env=child_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak, model = (int(v) for v in r.stdout.split())
    assert model == 2 * file_bytes
    assert peak <= model + file_bytes // 2, f"peak {peak / 2**20:.1f} MiB over the start for a {model / 2**20:.0f} MiB model"


def test_a_t5_file_with_a_missing_tensor_is_refused_naming_it_and_what_it_should_be():
    """The whole message: the file, what its weights should match, the count and the name of the missing tensor."""
    config = tiny.make_t5().config
    shapes = dict(t5_spec.expected_shapes(config))
    del shapes["encoder.final_layer_norm.weight"]
    with pytest.raises(files.WeightFileError) as e:
        t5_spec.check_against("t5.safetensors", shapes, config)
    assert str(e.value) == ("t5.safetensors: the weights do not match a T5-v1.1 encoder: 1 missing "
                            "(e.g. encoder.final_layer_norm.weight).")


def test_a_t5_file_with_a_tensor_of_another_shape_is_refused_naming_it_and_what_it_should_be():
    """The whole message: the file, what its weights should match, the count and the first tensor with its shape and
    the shape transformers' T5EncoderModel gives it."""
    config = tiny.make_t5().config
    shapes = _t5_shapes(config.to_dict())
    del shapes["encoder.embed_tokens.weight"]  # tied to shared.weight: a file stores it once (save_pretrained too)
    want = shapes["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    shapes["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = (want[0], want[1] + 1)
    with pytest.raises(files.WeightFileError) as e:
        t5_spec.check_against("t5.safetensors", shapes, config)
    assert str(e.value) == ("t5.safetensors: 1 tensor shape(s) do not match a T5-v1.1 encoder, e.g. "
                            f"encoder.block.1.layer.1.DenseReluDense.wo.weight is [{want[0]}, {want[1] + 1}], "
                            f"expected [{want[0]}, {want[1]}].")
