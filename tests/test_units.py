"""Small pure functions of pixart_core against diffusers, ComfyUI or a hand computation (no ComfyUI started).
Written so that a changed number or rule in them fails (see tests/MUTATION.md)."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from pixart_core import dit_memory, resolution, sampling, schedulers
from pixart_core.conditioning import Conditioning
from pixart_core import t5 as ct5
from pixart_core import t5_spec
from pixart_core import transformer as cdit
from pixart_core import vae as cvae
from pixart_core.variants import variant_from_config, variant_from_name

CPU = torch.device("cpu")


def inspect_default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default
SIZES = [(1024, 1024), (1000, 1000), (1920, 1080), (1080, 1920), (512, 2048), (3000, 200), (200, 3000), (64, 64),
         (777, 555), (1216, 832)]


@pytest.mark.parametrize("family", [256, 512, 1024, 2048])
def test_snap_is_diffusers_classify_height_width_bin(family):
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    table = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
             2048: ASPECT_RATIO_2048_BIN}[family]
    assert resolution.bins(family) == table
    for width, height in SIZES:
        h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
        assert resolution.snap(width, height, family) == (w, h), (width, height)


def test_unknown_family_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match=r"No aspect-ratio bins for a 768px family; choose one of \(256, 512, 1024, 2048\)"):
        resolution.bins(768)
    for w, h in [(0, 64), (64, 0), (-16, 64)]:
        with pytest.raises(ValueError, match=f"Requested size {w}x{h} must be positive"):
            resolution.snap(w, h, 1024)


@pytest.mark.parametrize("src,dst", [((64, 96), (60, 80)), ((96, 64), (80, 60)), ((64, 64), (40, 56)),
                                     ((48, 80), (48, 80)), ((128, 64), (100, 30))])
def test_resize_and_crop_is_diffusers_binning_resize(src, dst):
    from diffusers.image_processor import PixArtImageProcessor

    torch.manual_seed(0)
    images = torch.rand(2, 3, *src)
    want = PixArtImageProcessor.resize_and_crop_tensor(images, dst[1], dst[0])
    got = resolution.resize_and_crop(images, dst[1], dst[0])
    assert got.shape == want.shape == (2, 3, *dst)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
@pytest.mark.parametrize("h,w", [(128, 128), (64, 96), (8, 8)])
def test_decode_memory_is_comfyuis_estimate(dtype, size, h, w):
    # ComfyUI 0.3.75 comfy/sd.py:291 (AutoencoderKL): (2178 * h * w * 64) * dtype_size * VAE_KL_MEM_RATIO (1.0 off AMD)
    want = 2178 * h * w * 64 * size
    assert cvae.decode_memory((1, 4, h, w), dtype) == want
    assert cvae.decode_memory((1, 4, h, w), dtype, base_channels=32) == want // 4  # a quarter-width decoder
    # comfy/sd.py:290: encode (1767 * H * W) * dtype_size for an image of H x W pixels
    assert cvae.encode_memory((1, h * 8, w * 8, 3), dtype) == 1767 * h * 8 * w * 8 * size
    assert cvae.encode_memory((1, h * 8, w * 8, 3), dtype, base_channels=64) == 1767 * h * 8 * w * 8 * size // 2
    for got in (cvae.decode_memory((1, 4, h, w), dtype), cvae.encode_memory((1, h * 8, w * 8, 3), dtype)):
        assert type(got) is int  # bytes, as ComfyUI's memory accounting takes them


def test_inference_memory_scales_as_activations_do():
    """No outside formula exists for this estimate; what any activation estimate must do: linear in the images run
    (CFG doubles them), proportional to bytes per element, growing with the token count, and a fixed reserve."""
    reserve = 64 << 20
    one = dit_memory.inference_memory(1, 256, 256, 1152, torch.float32, cfg=False) - reserve
    assert dit_memory.inference_memory(2, 256, 256, 1152, torch.float32, cfg=False) - reserve == 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 1152, torch.float32, cfg=True) - reserve == 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 1152, torch.bfloat16, cfg=False) - reserve == one // 2
    assert dit_memory.inference_memory(1, 512, 256, 1152, torch.float32, cfg=False) - reserve >= 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 2304, torch.float32, cfg=False) - reserve > one
    # at least the MLP activations of one forward: 256 tokens x 4 x 1152 fp32 values
    assert one >= (256 // 16) ** 2 * 4 * 1152 * 4
    tokens = (2048 // 16) ** 2
    big = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False) - reserve
    assert big <= 5 * tokens * 1152 * 12 * 4  # a fused attention kernel needs no more than the MLP part
    # SDPA's math kernel holds every head's tokens x tokens scores (16 heads in PixArt XL/2): counted whole
    math = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False, fused_attention=False) - reserve
    assert math >= 16 * tokens * tokens * 4 > big
    # one head's score matrix is tokens x tokens values: the default is PixArt XL/2's 16 heads (diffusers' default
    # num_attention_heads for PixArtTransformer2DModel)
    from diffusers import PixArtTransformer2DModel

    heads = inspect_default(PixArtTransformer2DModel.__init__, "num_attention_heads")
    assert heads == 16
    one_head_less = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False, fused_attention=False,
                                              heads=heads - 1) - reserve
    assert math - one_head_less == 2 * tokens * tokens * 4  # one head's fp32 scores and their softmax
    for args in [(1, 256, 256, 1152, torch.float32, False), (3, 1024, 512, 1152, torch.bfloat16, True)]:
        assert type(dit_memory.inference_memory(*args)) is int
        assert type(dit_memory.inference_memory(*args, fused_attention=False)) is int


def test_preview_x0_is_the_schedulers_clean_estimate():
    """on_step's x0 equals DDIM's pred_original_sample for the same latents and epsilon (diffusers)."""
    torch.manual_seed(3)
    dit = tiny.make_dit()
    pos = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    neg = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    seen, previews = [], []

    def hook(module, args, kwargs, output):
        seen.append((args[0].clone(), kwargs["timestep"][0].clone(), output[0].clone()))

    handle = dit.register_forward_hook(hook, with_kwargs=True)
    noise, gen = sampling.initial_noise(1, 1, 4, 64, 64)
    try:
        sampling.sample(dit, pos, neg, noise, steps=3, cfg=3.0, scheduler="ddim", generator=gen,
                        on_step=lambda i, n, x0: previews.append(x0()))
    finally:
        handle.remove()
    ref = reference.scheduler("ddim")
    ref.set_timesteps(3)
    assert len(previews) == len(seen) == 3
    for (x, t, out), got in zip(seen, previews):
        uncond, cond = out[:, :4].chunk(2)
        eps = uncond + 3.0 * (cond - uncond)
        want = ref.step(eps, t, x[1:], return_dict=True).pred_original_sample
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("module,choices,fp16_ok", [(ct5, ("auto", "bf16", "fp32"), False),
                                                    (cvae, ("auto", "bf16", "fp32"), False),
                                                    (cdit, ("auto", "bf16", "fp16", "fp32"), True)])
def test_dtype_choices(module, choices, fp16_ok):
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    assert module.DTYPES == choices
    assert module.compute_dtype("auto") == torch.float32
    for auto in (torch.bfloat16, torch.float32):
        assert module.compute_dtype("auto", auto) == auto
    # T5-XXL and the SDXL VAE overflow in fp16 (DESIGN facts): an fp16 "auto" becomes fp32 for them only
    assert module.compute_dtype("auto", torch.float16) == (torch.float16 if fp16_ok else torch.float32)
    for c in choices[1:]:
        assert module.compute_dtype(c, torch.bfloat16) == named[c]
    what = {ct5: "T5", cvae: "VAE", cdit: "DiT"}[module]
    with pytest.raises(ValueError, match=rf"^{what} dtype 'fp8' is not one of"):
        module.compute_dtype("fp8")


def test_tokenizer_candidates(tmp_path):
    assert ct5.tokenizer_candidates(tmp_path) == [tmp_path / "tokenizer", tmp_path]
    f = tmp_path / "t5.safetensors"
    f.write_bytes(b"x")
    assert ct5.tokenizer_candidates(f) == []


def test_token_limit_errors():
    assert ct5.token_limits(1) == [1]
    for bad in (-1, -300):
        with pytest.raises(ValueError, match=rf"^max_tokens {bad} must be 0 \(from the DiT\) or a token count"):
            ct5.token_limits(bad)


# Release and community file names (hand-read: family and resolution as the name states them).
NAMES = {
    "PixArt-Sigma-XL-2-1024-MS.pth": "sigma-1024", "pixart_sigma_xl_2_512_ms.safetensors": "sigma-512",
    "PixArt-Sigma-XL-2-2K-MS.pth": "sigma-2k", "PixArt_Sigma_XL_2_2048.safetensors": "sigma-2k",
    "PixArt-Sigma-XL-2-256x256.pth": "sigma-256", "PixArt-XL-2-1024-MS.pth": "alpha-1024",
    "PixArt-XL-2-512x512.pth": "alpha-512", "pixart_xl_2_256x256.safetensors": "alpha-256",
    "PixArt-alpha-512.safetensors": "alpha-512", "PIXART-ALPHA-1024": "alpha-1024",
    "2k_pixart_sigma.safetensors": "sigma-2k", "PixArt-Sigma-900M-1024": "sigma-1024",
    "sigma_finetune_512": "sigma-512", "PixArt-Alpha-DMD-XL-2-512x512": "alpha-512",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_variant_from_release_names(name):
    assert variant_from_name(name).name == NAMES[name]


@pytest.mark.parametrize("name", ["my_finetune.safetensors", "PixArt-Sigma-XL-2.safetensors", "model_1024.pth",
                                  "pixart-sigma-10240", "pixart-sigma-5120", "alpha_sigma_768", "PixArt-XL-3-512"])
def test_names_that_say_too_little_give_none(name):
    assert variant_from_name(name) is None


def test_pixart_xl_2_names_without_alpha_are_alpha_but_sigma_wins():
    assert variant_from_name("pixart-xl-2-512").family == "alpha"
    assert variant_from_name("pixart-sigma-xl-2-512").family == "sigma"
    assert variant_from_name("alpha and sigma 512").family == "sigma"


@pytest.mark.parametrize("sample_size", [32, 64, 128, 256])
@pytest.mark.parametrize("micro", [None, False, True])
def test_variant_from_config_follows_diffusers_defaults(sample_size, micro):
    """Micro-conditioning as diffusers' PixArtTransformer2DModel decides it from the same config (None: its default)."""
    from diffusers import PixArtTransformer2DModel

    if micro and sample_size != 128:
        return  # only 1024-MS has the embedders; no release pairs them with another size
    cfg = tiny.dit_config(sample_size=sample_size)
    cfg["use_additional_conditions"] = micro
    model = PixArtTransformer2DModel(**cfg)
    v = variant_from_config({"sample_size": sample_size, "use_additional_conditions": micro}, "some-folder")
    assert v.micro_conditioning == model.use_additional_conditions
    assert v.sample_size == sample_size
    assert v.family == ("alpha" if model.use_additional_conditions else "sigma")
    if sample_size <= 128:  # the α release names a family; its sizes are 256/512/1024 px
        alpha = variant_from_config({"sample_size": sample_size, "use_additional_conditions": micro},
                                    "PixArt-XL-2-512x512")
        assert alpha.family == "alpha" and alpha.sample_size == sample_size


def test_variant_from_config_without_sample_size_is_diffusers_default():
    from diffusers import PixArtTransformer2DModel

    default = PixArtTransformer2DModel(**{k: v for k, v in tiny.dit_config().items() if k != "sample_size"})
    assert variant_from_config({}, "PixArt-Sigma-XL-2").sample_size == default.config.sample_size == 128
    with pytest.raises(ValueError, match=r"odd-folder: sample_size 48 matches no PixArt variant \(expected one of 32, 64, 128, 256\)"):
        variant_from_config({"sample_size": 48}, "odd-folder")
    with pytest.raises(ValueError, match=r"^config: sample_size 48"):
        variant_from_config({"sample_size": 48})


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


def _diffusers_tiling_vae(vae, tile_latent: int):
    """The same weights in an AutoencoderKL whose own tile size is `tile_latent` latent pixels (diffusers derives it
    from sample_size: sample_size / 2**(blocks - 1)), tiling enabled: diffusers' tiled encode/decode geometry."""
    from diffusers import AutoencoderKL

    blocks = len(vae.config.block_out_channels)
    ref = AutoencoderKL.from_config({**vae.config, "sample_size": tile_latent * 2 ** (blocks - 1)}).eval()
    ref.load_state_dict(vae.state_dict())
    ref.enable_tiling()
    return ref


def test_tiled_and_whole_decode_are_diffusers_decodes():
    vae = tiny.make_vae()
    torch.manual_seed(2)
    z = torch.randn(2, 4, 24, 20)
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    ref = _diffusers_tiling_vae(vae, 8)
    with torch.no_grad():
        want_tiled = (ref.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        want_whole = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    done = []
    tiled = cvae.decode(vae, z, tiled=True, tile_latent=8, on_image=lambda i, n: done.append((i, n)))
    whole = cvae.decode(vae, z)
    assert tiled.dtype == whole.dtype == torch.float32 and tiled.shape == (2, 192, 160, 3)
    assert (tiled - want_tiled).abs().max() <= 1e-5
    assert (whole - want_whole).abs().max() <= 1e-5
    assert (tiled - whole).abs().max() > 1e-3  # the tiles really differ from one pass (blended seams)
    assert done == [(1, 2), (2, 2)]
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == before  # restored


def test_tiled_and_whole_encode_are_diffusers_posterior_means():
    vae = tiny.make_vae()
    torch.manual_seed(4)
    images = torch.rand(1, 192, 160, 3)
    ref = _diffusers_tiling_vae(vae, 8)
    x = images.movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        want_tiled = ref.encode(x).latent_dist.mode()
        want_whole = vae.encode(x).latent_dist.mode()
    tiled = cvae.encode(vae, images, tiled=True, tile_latent=8)
    whole = cvae.encode(vae, images)
    assert tiled.shape == whole.shape == (1, 4, 24, 20)
    assert (tiled - want_tiled).abs().max() <= 1e-5 and (whole - want_whole).abs().max() <= 1e-5
    assert (tiled - whole).abs().max() > 1e-4


def test_decode_resizes_back_as_diffusers_binning():
    from diffusers.image_processor import PixArtImageProcessor

    vae = tiny.make_vae()
    torch.manual_seed(5)
    z = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        image = vae.decode(z).sample
    want = (PixArtImageProcessor.resize_and_crop_tensor(image, 70, 50) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = cvae.decode(vae, z, target=(70, 50))
    assert got.shape == (1, 50, 70, 3) and (got - want).abs().max() <= 1e-5


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


@pytest.mark.parametrize("bad_call", [2, 3])
def test_nan_error_names_the_step_and_its_timestep(bad_call):
    """The message names the first step whose output is not finite and that step's timestep (the release scheduler's
    20-step schedule: diffusers)."""
    dit = tiny.make_dit()
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return (output[0] * float("nan"),) if len(calls) >= bad_call else output

    handle = dit.register_forward_hook(poison)
    ref = reference.scheduler("dpmpp_2m")
    ref.set_timesteps(20)
    cond = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    noise, gen = sampling.initial_noise(0, 1, 4, 32, 32)
    try:
        with pytest.raises(FloatingPointError, match=rf"NaN/inf at step {bad_call} of 20 \(timestep "
                                                     rf"{int(ref.timesteps[bad_call - 1])}\)"):
            sampling.sample(dit, cond, cond, noise, steps=20, cfg=4.5, generator=gen)
    finally:
        handle.remove()


VAE_NAMES = {"sdxl_vae.safetensors": "sdxl", "sd_xl_base_1.0_vae.safetensors": "sdxl", "SDXL-VAE-fp16-fix": "sdxl",
             "pixart_sigma_vae.safetensors": "sdxl", "vae-ft-mse-840000-ema-pruned.safetensors": "sd",
             "vae-ft-ema-560000-ema-pruned.safetensors": "sd", "sd15_vae.pt": "sd", "sd-vae-ft-ema": "sd",
             "PixArt-alpha-vae.safetensors": "sd", "my_vae.safetensors": None, "ae.safetensors": None}


@pytest.mark.parametrize("name", list(VAE_NAMES))
def test_vae_family_from_name(name):
    """File names of the SDXL VAE (PixArt-Σ) and the SD 1.x VAEs (PixArt-α) as they are published."""
    assert cvae.family_from_name(name) == VAE_NAMES[name]


def test_vae_family_from_config_scaling_factor():
    assert cvae.family_from_config({"scaling_factor": reference.VAE_SCALING["sdxl"]}) == "sdxl"
    assert cvae.family_from_config({"scaling_factor": reference.VAE_SCALING["sd"]}) == "sd"
    assert cvae.family_from_config({"scaling_factor": 0.3611}) is None  # e.g. a Flux VAE
    assert cvae.family_from_config({}) is None


@pytest.mark.parametrize("file_name,family", [("sdxl_vae.safetensors", "sdxl"), ("vae-ft-mse-840000.safetensors", "sd"),
                                               ("some_vae.safetensors", None)])
def test_single_file_vae_config_is_the_saved_models_config(tmp_path, file_name, family):
    """The config built from an LDM-layout file's shapes: the saved AutoencoderKL's, field by field (a VAE whose
    levels differ in width and have 2 resnets each, as the real ones)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    cfg = dict(tiny.vae_config(), block_out_channels=[32, 64, 64, 64], layers_per_block=2)
    torch.manual_seed(0)
    saved = AutoencoderKL(**cfg).eval()
    path = tmp_path / file_name
    save_file(tiny.vae_to_ldm(saved.state_dict()), str(path))
    vae, found = cvae.load_vae(path)
    assert found == family
    for field in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                  "layers_per_block", "act_fn", "latent_channels", "norm_num_groups"):
        assert vae.config[field] == saved.config[field], field
    assert vae.config.scaling_factor == reference.VAE_SCALING[family or "sdxl"]  # unknown: PixArt-Σ's
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, saved.decode(z).sample)


def test_vae_folder_with_bin_weights_and_private_config_keys(tmp_path):
    vae = tiny.make_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=False)
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.bin").is_file()
    loaded, family = cvae.load_vae(tmp_path / "pipe")
    assert family == "sdxl" and loaded.config.scaling_factor == reference.VAE_SCALING["sdxl"]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_vae_folder_errors_name_the_folder(tmp_path):
    from pixart_core import files

    (tmp_path / "empty").mkdir()
    with pytest.raises(files.WeightFileError, match=r"empty: no config.json here or in vae/; not a diffusers VAE folder"):
        cvae.load_vae(tmp_path / "empty")
    tiny.make_vae().save_config(tmp_path / "noweights" / "vae")
    with pytest.raises(files.WeightFileError, match=r"vae: no diffusion_pytorch_model.safetensors in this folder"):
        cvae.load_vae(tmp_path / "noweights")
    (tmp_path / "t5").mkdir()
    with pytest.raises(files.WeightFileError, match=r"t5: no config.json here or in text_encoder/; not a transformers/diffusers T5 folder"):
        t5_spec.weights_folder(tmp_path / "t5")


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


def test_cache_key_of_strip_only_prompts_keeps_case():
    """Under caption_cleaning 'none' the case reaches T5, so prompts differing in case are different encodings."""
    def key(prompt, cleaning):  # as Text Encode keys an encoding: by the cleaned text
        return ct5.cache_key(("t5",), ct5.preprocess(prompt, cleaning), cleaning, 300)

    assert key("A Cat", "none") != key("a cat", "none")
    assert key("A Cat", "lowercase") == key("a cat", "lowercase")


# google/t5-v1_1-small config.json: d_model 512, d_ff 1024, d_kv 64, num_heads 6, num_layers 8 (heads x d_kv != d_model)
T5_SMALL = {**reference.T5_XXL, "d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 6, "num_layers": 8}


def test_t5_config_from_shapes_when_heads_times_d_kv_is_not_the_width(caplog):
    cfg = t5_spec.config_from_shapes(_t5_shapes(T5_SMALL), "t5_small.safetensors")
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (512, 64, 6, 1024, 8)
    assert "t5_small.safetensors: T5 width 512, not T5-v1.1-XXL's 4096" in caplog.text
    caplog.clear()
    t5_spec.config_from_shapes(_t5_shapes(reference.T5_XXL), "t5xxl.safetensors")
    assert "T5 width" not in caplog.text


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


@pytest.mark.parametrize("marker", ["encoder.block.1.layer.0.SelfAttention.q.scale_weight", "scaled_fp8"])
def test_each_scaled_fp8_marker_makes_fp8_weights_need_scales(tmp_path, marker):
    """Either sign of ComfyUI's scaled fp8 layout (a scale, or the marker) on fp8 weights: the missing scales are
    named (a plain fp8 file, with neither, loads: test_low_vram)."""
    from safetensors.torch import save_file

    from pixart_core import files

    sd = tiny.t5_single_file_sd(tiny.make_t5(), dtype=torch.float8_e4m3fn)
    sd[marker] = torch.ones(())
    path = tmp_path / "t5xxl_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(files.WeightFileError, match=r"scales are missing for 1[34] weight\(s\) \(e.g. encoder.block.0"):
        ct5.load_t5(path, "none", torch.float32)


def test_loaded_t5_records_how_it_was_loaded(tmp_path):
    from safetensors.torch import save_file

    t5 = tiny.make_t5()
    t5.save_pretrained(tmp_path / "pipe" / "text_encoder")
    folder = ct5.load_t5(tmp_path / "pipe", "none", torch.bfloat16)
    assert (folder.compute_dtype, folder.quantization, folder.source) == (torch.bfloat16, "none", str(tmp_path / "pipe"))
    assert folder.model.dtype == torch.bfloat16
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(tiny.t5_single_file_sd(t5), str(path))
    nf4 = ct5.load_t5(path, t5_spec.QUANT_NF4, torch.bfloat16)
    assert (nf4.compute_dtype, nf4.quantization, nf4.source) == (torch.bfloat16, t5_spec.QUANT_NF4, str(path))
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


def test_snap_takes_any_positive_size():
    assert resolution.snap(1, 1, 1024) == (1024, 1024)
    assert resolution.snap(1, 3, 256) == resolution.snap(16, 48, 256)


def test_nan_check_is_deferred_only_off_the_cpu():
    assert sampling.defers_nan_check(torch.device("cpu")) is False
    assert sampling.defers_nan_check(torch.device("cuda", 0)) is True
    assert sampling.defers_nan_check(torch.device("mps")) is True


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


def test_vae_single_files_in_every_layout_load_as_the_saved_vae(tmp_path):
    """LDM keys, LDM keys under a full checkpoint's prefix, diffusers keys: the same VAE; bf16 when asked; frozen."""
    from safetensors.torch import save_file

    from pixart_core import files

    vae = tiny.make_vae()
    ldm = tiny.vae_to_ldm(vae.state_dict())
    layouts = {"sdxl_vae.safetensors": ldm, "sdxl_vae_prefixed.safetensors": {f"first_stage_model.{k}": v
                                                                             for k, v in ldm.items()},
               "sdxl_vae_diffusers.safetensors": vae.state_dict(),
               "sdxl_vae_diffusers_prefixed.safetensors": {f"vae.{k}": v for k, v in vae.state_dict().items()}}
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
    for name, sd in layouts.items():
        save_file(sd, str(tmp_path / name))
        loaded, family = cvae.load_vae(tmp_path / name)
        assert family == "sdxl" and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert (loaded.decode(z).sample - want).abs().max() <= 1e-6, name
    half, _ = cvae.load_vae(tmp_path / "sdxl_vae.safetensors", torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    save_file({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "stub.safetensors"))
    with pytest.raises(files.WeightFileError, match="stub.safetensors: this is not a VAE"):
        cvae.load_vae(tmp_path / "stub.safetensors")


def test_vae_folder_family_from_its_name_when_the_config_does_not_say(tmp_path):
    vae = tiny.make_vae()
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "my-sdxl-vae")
    assert cvae.load_vae(tmp_path / "my-sdxl-vae")[1] == "sdxl"
    vae.save_pretrained(tmp_path / "sd-vae")
    assert cvae.load_vae(tmp_path / "sd-vae")[1] == "sd"
    assert cvae.family_from_name("sd-vae.safetensors") == "sd"


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


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError) as e:
        schedulers.make("heun")
    assert str(e.value) == f"Unknown scheduler 'heun'; choose one of {list(reference.SCHEDULERS)}."


def test_check_denoise_refuses_exactly_what_runs_nothing():
    """The denoise rules by hand: text-to-image needs denoise 1; img2img runs int(steps * denoise) steps, so
    0.04 of 20 steps runs none (the smallest that runs one is 1/20 = 0.05)."""
    from pixart_core.request import check_denoise

    check_denoise(1.0, 20, img2img=False)
    check_denoise(0.05, 20, img2img=True)
    check_denoise(1.0, 1, img2img=True)
    cases = [
        ((0.99, 20, False), "PixArt sampler: denoise below 1.0 needs an input latent (connect 'latent' for img2img)."),
        ((0.0, 20, True), "PixArt sampler: denoise 0 runs no step; use a value in (0, 1]."),
        ((0.04, 20, True), "denoise 0.04 of 20 steps runs no step; use denoise >= 0.05 or more steps."),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            check_denoise(*args[:2], img2img=args[2])
        assert str(e.value) == message


def test_check_size_refuses_exactly_what_the_dit_cannot_take():
    """The size rule by hand: sides are multiples of 16 (patch 2 x VAE 8) from 16 to 4096 (the largest side of any
    trained bin, the 2K family's 4096 x 1024), and the message names the two neighbouring multiples."""
    from pixart_core.resolution import check_size

    for w, h in ((16, 16), (4096, 4096), (1024, 1008)):
        check_size(w, h)
    cases = [
        ((0, 64), "PixArt sampler: width 0 is outside 16..4096."),
        ((64, 4112), "PixArt sampler: height 4112 is outside 16..4096."),
        ((1000, 64), "PixArt sampler: width 1000 is not a multiple of 16 (patch 2 x VAE 8); use 992 or 1008."),
        ((64, 8), "PixArt sampler: height 8 is not a multiple of 16 (patch 2 x VAE 8); use 16 or 16."),
        ((1, 64), "PixArt sampler: width 1 is not a multiple of 16 (patch 2 x VAE 8); use 16 or 16."),
        ((64, 50), "PixArt sampler: height 50 is not a multiple of 16 (patch 2 x VAE 8); use 48 or 64."),
    ]
    for (w, h), message in cases:
        with pytest.raises(ValueError) as e:
            check_size(w, h)
        assert str(e.value) == message
