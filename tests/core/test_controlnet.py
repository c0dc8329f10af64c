"""PixArt ControlNet forward and hint latents (pixart_core, no ComfyUI), against the published composition written
out with diffusers' own modules (harness/controlnet_reference.py): the research project's PixArtControlNetTransformerModel.forward
(diffusers examples/research_projects/pixart/controlnet_pixart_alpha.py) and the authors' ControlPixArtHalf.forward
(PixArt-alpha diffusion/model/nets/pixart_controlnet.py): the hint through the DiT's own pos_embed; before base block
i (i = 1..N) control block i-1 runs on the stream entering block i (block 0 on that stream + before_proj(hint)) with
the same embedded timestep, projected captions and masks; its after_proj output is added to the stream."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import controlnet_files as cfiles
from harness import models as tiny
from harness.controlnet_reference import ReferenceAdapter, reference_forward
from pixart_core import controlnet as cn
from pixart_core import controlnet_files as cnf
from pixart_core import guidance
from pixart_core.files import WeightFileError

LAYERS = 4  # the tiny DiT with room for 3 control blocks (they act before blocks 1..3)


def _dit(variant: str = "sigma-1024"):
    return tiny.make_dit(layers=LAYERS, variant=variant)


def _load(tmp_path, dit, blocks: int, seed: int, **kw):
    sd = cfiles.adapter_state_dict(dit, blocks, seed=seed, **kw)
    path = cfiles.write_adapter_file(tmp_path / f"adapter-{blocks}-{seed}.safetensors", sd)
    return sd, cnf.load_controlnet(path)[0]


def _inputs(dit, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 12, generator=g)  # a non-square latent: the patch grid is not its transpose
    embeds = torch.randn(n, 5, dit.config.caption_channels, generator=g)
    mask = torch.ones(n, 5)
    mask[0, 3:] = 0  # padded caption tokens in one row: the mask reaches the control blocks too
    added = {"resolution": None, "aspect_ratio": None}
    if dit.config.use_additional_conditions:
        added = {"resolution": torch.tensor([[64.0, 96.0]]).repeat(n, 1),
                 "aspect_ratio": torch.tensor([[64 / 96]]).repeat(n, 1)}
    return x, {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "timestep": torch.full((n,), 400),
               "added_cond_kwargs": added}


@pytest.mark.parametrize("variant,images,hint_batch,specs", [
    ("sigma-1024", 1, 1, [(3, 1.0)]),  # CFG batch [uncond, cond] with one hint
    ("alpha-1024", 1, 1, [(3, 0.7)]),  # micro-conditioning, a strength
    ("sigma-1024", 2, 2, [(3, 1.0), (2, 0.5)]),  # two adapters of different depth, one hint per image
    ("sigma-1024", 1, 1, [(2, 0.5), (3, 1.0)]),  # the shallower first: the deeper one still acts before block 3
])
@torch.no_grad()
def test_forward_equals_the_published_composition(tmp_path, variant, images, hint_batch, specs):
    dit = _dit(variant)
    x, kwargs = _inputs(dit, 2 * images)
    hints, refs, controls = [], [], []
    for k, (blocks, strength) in enumerate(specs):
        sd, adapter = _load(tmp_path, dit, blocks, seed=10 + k)
        hint = torch.randn(hint_batch, 4, 8, 12, generator=torch.Generator().manual_seed(20 + k))
        hints.append(hint)
        refs.append(ReferenceAdapter(dit, sd, blocks, strength))
        controls.append(cn.Control(adapter, hint, strength))
    expected = reference_forward(dit, refs, hints, x, kwargs)
    base = dit(x, return_dict=False, **kwargs)[0]
    got = cn.ControlledDiT(dit, controls)(x, return_dict=False, **kwargs)[0]
    assert not torch.allclose(expected, base, atol=1e-3)  # the controls do something
    assert torch.equal(got, expected)


@torch.no_grad()
def test_zero_after_proj_and_zero_strength_give_the_base_output_exactly(tmp_path):
    dit = _dit()
    x, kwargs = _inputs(dit, 2)
    base = dit(x, return_dict=False, **kwargs)[0]
    hint = torch.randn(1, 4, 8, 12)
    _, zero = _load(tmp_path, dit, 3, seed=3, zero_after=True)
    # the controlled forward itself (not a shortcut to the DiT): its own steps equal diffusers' forward bit for bit
    assert torch.equal(cn.controlled_forward(dit, [cn.Control(zero, hint)], x, **kwargs), base)
    _, adapter = _load(tmp_path, dit, 3, seed=4)
    assert torch.equal(cn.ControlledDiT(dit, [cn.Control(adapter, hint, 0.0)])(x, return_dict=False, **kwargs)[0], base)
    assert torch.equal(cn.controlled_forward(dit, [cn.Control(adapter, hint, 0.0)], x, **kwargs), base)
    assert torch.equal(cn.controlled_forward(dit, [], x, **kwargs), base)


def test_active_steps_are_the_named_fraction_of_the_schedule(tmp_path):
    dit = _dit()
    _, adapter = _load(tmp_path, dit, 1, seed=5)
    control = cn.Control(adapter, torch.zeros(1, 4, 8, 12), strength=0.8, start=0.2, end=0.5)
    # 10 steps: steps 2, 3, 4 start at 0.2, 0.3, 0.4 (inside [0.2, 0.5)); step 5 starts at 0.5
    assert [s for s in range(10) if control.active(s, 10)] == [2, 3, 4]
    controlled = cn.ControlledDiT(dit, [control])
    assert controlled.at_step(1, 10).controls == () and controlled.at_step(4, 10).controls == (control,)
    assert not cn.Control(adapter, control.hint, strength=0.0).active(3, 10)


@torch.no_grad()
def test_pag_perturbs_only_the_dit_and_the_controls_still_act(tmp_path):
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    dit = _dit()
    sd, adapter = _load(tmp_path, dit, 3, seed=6)
    ref = ReferenceAdapter(dit, sd, 3, 1.0)  # copied before any processor is swapped: the control blocks keep theirs
    hint = torch.randn(1, 4, 8, 12)
    controlled = cn.ControlledDiT(dit, [cn.Control(adapter, hint)])
    targets = guidance.pag_targets(controlled, ["blocks.1"])  # the sampler's own lookup
    assert targets == [dit.transformer_blocks[1].attn1]  # not controlnet_blocks.1's self-attention
    x, kwargs = _inputs(dit, 3)  # [uncond, cond, perturbed]
    old = targets[0].processor
    targets[0].processor = PAGCFGIdentitySelfAttnProcessor2_0()
    try:
        expected = reference_forward(dit, [ref], [hint], x, kwargs)
        got = controlled(x, return_dict=False, **kwargs)[0]
    finally:
        targets[0].processor = old
    assert torch.equal(got, expected)


def test_controlled_dit_looks_like_the_dit_to_the_sampler(tmp_path):
    dit = _dit()
    _, adapter = _load(tmp_path, dit, 2, seed=7)
    controlled = cn.ControlledDiT(dit, [cn.Control(adapter, torch.zeros(1, 4, 8, 12))])
    assert controlled.config is dit.config and controlled.transformer_blocks is dit.transformer_blocks
    assert [p for p in controlled.parameters()] == [p for p in dit.parameters()]  # the adapter is loaded apart
    assert controlled.use_additional_conditions == dit.use_additional_conditions


@torch.no_grad()
def test_hint_of_another_size_or_batch_is_refused(tmp_path):
    dit = _dit()
    _, adapter = _load(tmp_path, dit, 2, seed=8)
    x, kwargs = _inputs(dit, 2)
    with pytest.raises(ValueError, match=r"hint is \(8, 8\) latent pixels but the latents are \(8, 12\)"):
        cn.controlled_forward(dit, [cn.Control(adapter, torch.zeros(1, 4, 8, 8))], x, **kwargs)
    x, kwargs = _inputs(dit, 4)
    with pytest.raises(ValueError, match=r"^ControlNet hint batch 3 does not divide the model batch 4: give one "
                                         r"control image, or one per image of the batch\.$"):
        cn.controlled_forward(dit, [cn.Control(adapter, torch.zeros(3, 4, 8, 12))], x, **kwargs)


@torch.no_grad()
def test_controlled_dit_returns_what_the_dit_returns(tmp_path):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    dit = _dit()
    sd, adapter = _load(tmp_path, dit, 3, seed=11)
    hint = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(11))
    x, kwargs = _inputs(dit, 2)
    expected = reference_forward(dit, [ReferenceAdapter(dit, sd, 3, 1.0)], [hint], x, kwargs)
    base = dit(x, return_dict=False, **kwargs)[0]
    assert type(dit(x, **kwargs)) is Transformer2DModelOutput and type(dit(x, return_dict=False, **kwargs)) is tuple
    for strength, want in ((1.0, expected), (0.0, base)):  # the controlled forward, and the DiT's own one
        controlled = cn.ControlledDiT(dit, [cn.Control(adapter, hint, strength)])
        out = controlled(x, **kwargs)  # diffusers' default: return_dict=True
        assert type(out) is Transformer2DModelOutput and torch.equal(out.sample, want)
        out = controlled(x, return_dict=False, **kwargs)
        assert type(out) is tuple and len(out) == 1 and torch.equal(out[0], want)


@torch.no_grad()
def test_masks_are_taken_as_diffusers_takes_them(tmp_path):
    """0/1 masks in another dtype than the DiT's (a half-precision one; a tokenizer's int64), for the image tokens too
    (attention_mask [N, T]): turned into additive biases in the dtype the DiT computes in, as
    PixArtTransformer2DModel.forward does."""
    dit = _dit()
    sd, adapter = _load(tmp_path, dit, 3, seed=12)
    hint = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(12))
    x, kwargs = _inputs(dit, 2)
    image_mask = torch.ones(2, 24, dtype=torch.bfloat16)  # 4 x 6 patches of the 8 x 12 latent
    image_mask[1, ::3] = 0
    kwargs.update(encoder_attention_mask=kwargs["encoder_attention_mask"].bfloat16(), attention_mask=image_mask)
    expected = reference_forward(dit, [ReferenceAdapter(dit, sd, 3, 1.0)], [hint], x, kwargs)
    without = reference_forward(dit, [ReferenceAdapter(dit, sd, 3, 1.0)], [hint], x, {**kwargs, "attention_mask": None})
    assert not torch.allclose(expected, without, atol=1e-3)  # the image-token mask does something
    assert torch.equal(cn.controlled_forward(dit, [cn.Control(adapter, hint)], x, **kwargs), expected)
    # a bf16 DiT: the biases in bf16 (diffusers' own forward; a zero after_proj adds exactly nothing)
    half = copy.deepcopy(dit).to(torch.bfloat16)
    _, zero = _load(tmp_path, dit, 3, seed=13, zero_after=True)
    kwargs.update(encoder_hidden_states=kwargs["encoder_hidden_states"].bfloat16(),
                  encoder_attention_mask=kwargs["encoder_attention_mask"].long(), attention_mask=image_mask.long())
    base = half(x.bfloat16(), return_dict=False, **kwargs)[0]
    assert torch.equal(cn.controlled_forward(half, [cn.Control(zero, hint)], x.bfloat16(), **kwargs), base)


def test_missing_micro_conditions_are_refused_as_diffusers_refuses_them(tmp_path):
    dit = _dit("alpha-1024")  # PixArt-α 1024: resolution and aspect-ratio embeddings
    _, adapter = _load(tmp_path, dit, 2, seed=14)
    x, kwargs = _inputs(dit, 2)
    kwargs["added_cond_kwargs"] = None
    with pytest.raises(ValueError) as theirs:
        dit(x, **kwargs)
    with pytest.raises(ValueError) as ours:
        cn.controlled_forward(dit, [cn.Control(adapter, torch.zeros(1, 4, 8, 12))], x, **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert "`added_cond_kwargs` cannot be None" in str(ours.value)


def test_control_blocks_are_set_up_as_diffusers_sets_up_pixart_blocks(tmp_path):
    """Each control block's transformer_block is configured like the DiT's own blocks (diffusers'
    PixArtTransformer2DModel builds them from its config: no dropout, 1000 timestep embeddings, no upcast, norms
    without affine): every plain setting of every submodule equal."""
    def settings(module):
        return {name: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
                for name, m in module.named_modules()}

    dit = _dit()
    _, adapter = _load(tmp_path, dit, 3, seed=15)
    for i, block in enumerate(adapter.controlnet_blocks):
        assert settings(block.transformer_block) == settings(dit.transformer_blocks[i])
        assert repr(block.transformer_block) == repr(dit.transformer_blocks[i])


# --- the adapter's config from its state dict ------------------------------------------------------------------

def _shapes(blocks: int, width: int, cross: int | None = None) -> dict[str, tuple[int, ...]]:
    """Some of an adapter file's key shapes (the research project's layout): each block's after_proj [width, width]
    and, with `cross`, block 0's cross-attention key projection [width, cross]."""
    sd = {f"controlnet_blocks.{i}.after_proj.weight": (width, width) for i in range(blocks)}
    sd.update({f"controlnet_blocks.{i}.after_proj.bias": (width,) for i in range(blocks)})
    if cross is not None:
        sd["controlnet_blocks.0.transformer_block.attn2.to_k.weight"] = (width, cross)
    return sd


def test_config_of_the_released_adapter_from_its_shapes():
    # PixArt-δ's adapter: 13 copied blocks of PixArt XL/2 (PixArt-alpha diffusion/model/nets/PixArt.py PixArt_XL_2:
    # hidden_size 1152, num_heads 16, so heads of 72; the captions projected to 1152 before cross-attention)
    sd = _shapes(13, 1152, cross=1152)
    sd["transformer_blocks.27.ff.net.2.weight"] = (1152, 4608)  # not a control block: not counted
    sd["scale_shift_table"] = (2, 1152)
    config = cn.config_from_state_dict(sd, "adapter.safetensors")
    assert (config.blocks, config.heads, config.head_dim, config.width) == (13, 16, 72, 1152)
    assert config.cross_attention_dim == 1152
    # tensors as well as shapes; the heads a config.json gives split the width
    sd = {k: torch.zeros(v) for k, v in _shapes(3, 144).items()}
    config = cn.config_from_state_dict(sd, "folder", heads=4)
    assert (config.blocks, config.heads, config.head_dim, config.width) == (3, 4, 36, 144)
    assert config.cross_attention_dim is None


def test_state_dicts_that_are_no_whole_adapter_are_refused():
    sd = {k: v for k, v in _shapes(2, 144).items() if k != "controlnet_blocks.0.after_proj.weight"}
    with pytest.raises(WeightFileError, match=r"^x.safetensors: no controlnet_blocks.0.after_proj.weight; this is "
                                              r"not a PixArt ControlNet adapter\.$"):
        cn.config_from_state_dict(sd, "x.safetensors")
    sd = {k: v for k, v in _shapes(4, 144).items() if not k.startswith("controlnet_blocks.2.")}
    with pytest.raises(WeightFileError, match=r"^gap.safetensors: the control blocks are numbered \[0, 1, 3\], not "
                                              r"0\.\.2; the file is incomplete\. Download it again\.$"):
        cn.config_from_state_dict(sd, "gap.safetensors")
    with pytest.raises(WeightFileError, match=r"^odd: control width 100 is not a multiple of PixArt's head size 72\.$"):
        cn.config_from_state_dict(_shapes(2, 100), "odd")
    with pytest.raises(WeightFileError, match=r"^odd: control width 144 does not split into 5 heads\.$"):
        cn.config_from_state_dict(_shapes(2, 144), "odd", heads=5)


def test_a_misshapen_anchor_or_missing_cross_attention_is_named_by_the_key_check(tmp_path):
    dit = _dit()
    sd = cfiles.adapter_state_dict(dit, 2, seed=16)
    bad = {**sd, "controlnet_blocks.0.after_proj.weight": torch.zeros(144, 100)}
    with pytest.raises(WeightFileError, match=r"bad.safetensors: 1 tensor shape.*controlnet_blocks.0.after_proj.weight "
                                              r"is \[144, 100\], expected \[144, 144\]"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "bad.safetensors", bad))
    key = "controlnet_blocks.0.transformer_block.attn2.to_k.weight"
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(WeightFileError, match=rf"missing.safetensors: .*1 missing \(e.g. {key}\)"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "missing.safetensors", missing))


# --- hint latents: the reference app's preprocessing (PixArt-alpha app/app_controlnet.py generate():
#     image -> [-1, 1] -> vae.encode(...).latent_dist.sample() -> * scale_factor) ------------------------------------

@pytest.fixture(scope="module")
def vae():
    return tiny.make_vae(family="sd")


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_hint_is_the_scaled_vae_latent_of_the_image_in_minus_one_to_one(vae):
    image = _image(64, 48)
    x = image.permute(0, 3, 1, 2) * 2 - 1
    dist = vae.encode(x).latent_dist
    assert torch.equal(cn.encode_hint(vae, image, (8, 6)), dist.mode() * vae.config.scaling_factor)
    sampled = dist.sample(torch.Generator().manual_seed(5)) * vae.config.scaling_factor  # as the reference draws it
    assert torch.equal(cn.encode_hint(vae, image, (8, 6), generator=torch.Generator().manual_seed(5)), sampled)
    assert vae.config.scaling_factor == 0.18215  # the SD VAE of PixArt-α (its config's own value is what counts)


@torch.no_grad()
def test_hint_image_of_another_size_is_fitted_like_the_reference(vae):
    import torchvision.transforms.functional as TF

    # The reference app picks the bin from the image's aspect ratio, then T.Resize(short side) + T.CenterCrop(bin).
    image = _image(80, 120, seed=1)
    x = TF.center_crop(TF.resize(image.permute(0, 3, 1, 2), 32, antialias=True), [32, 48])
    expected = vae.encode(x * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    assert torch.equal(cn.encode_hint(vae, image, (4, 6)), expected)
    # Another aspect ratio: scaled to cover the generation (96x96 -> 64x64), then centre-cropped to 48x64.
    image = _image(96, 96, seed=2)
    x = TF.center_crop(TF.resize(image.permute(0, 3, 1, 2), [64, 64], antialias=True), [48, 64])
    expected = vae.encode(x * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    assert torch.equal(cn.encode_hint(vae, image, (6, 8)), expected)


@torch.no_grad()
def test_an_adapter_kept_in_another_dtype_than_the_dit_still_runs(tmp_path):
    dit = _dit()
    sd, adapter = _load(tmp_path, dit, 3, seed=9)  # fp32
    hint = torch.randn(1, 4, 8, 12)
    x, kwargs = _inputs(dit, 2)
    expected = reference_forward(dit, [ReferenceAdapter(dit, sd, 3, 1.0)], [hint], x, kwargs)  # all fp32
    half = copy.deepcopy(dit).to(torch.bfloat16)
    kw16 = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    got = cn.controlled_forward(half, [cn.Control(adapter, hint)], x.bfloat16(), **kw16)
    assert got.dtype == torch.bfloat16
    # bf16 through 4 blocks: 0.01 off here; without the control the output is 0.54 off
    assert (got.float() - expected).abs().max() < 0.05
    # the other way round: a bf16 adapter on the fp32 DiT
    adapter16 = cnf.load_controlnet(tmp_path / "adapter-3-9.safetensors", dtype=torch.bfloat16)[0]
    got = cn.controlled_forward(dit, [cn.Control(adapter16, hint)], x, **kwargs)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < 0.05


def test_fit_image_covers_then_crops_the_centre_like_torchvision():
    import torchvision.transforms.functional as TF

    images = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(3))
    # 64x128 onto 48x64: scaled by 0.75 to 48x96 (covers), the middle 64 columns kept (16 cut on each side)
    expected = TF.center_crop(TF.resize(images, [48, 96], antialias=True), [48, 64])
    assert torch.equal(cn.fit_image(images, 48, 64), expected)
    # 128x64 onto 64x48: scaled to 96x48, the middle 64 rows kept
    tall = images.transpose(-1, -2)
    assert torch.equal(cn.fit_image(tall, 64, 48), TF.center_crop(TF.resize(tall, [96, 48], antialias=True), [64, 48]))


@torch.no_grad()
def test_a_partly_loaded_dit_runs_the_controlled_forward_on_the_gpu(tmp_path):
    """The DiT and its ControlNet on a GPU, but the DiT's output scale_shift_table left in system memory (a partly
    loaded DiT; diffusers' forward moves it to the stream and back the same way): the result is on the GPU and
    equal to the CPU's. The GPU is simulated (harness/fake_cuda.py refuses an operation that mixes GPU and CPU
    tensors, as CUDA does)."""
    from harness.fake_cuda import CUDA, FakeCuda

    dit = _dit()
    x, kwargs = _inputs(dit, 2)
    _, adapter = _load(tmp_path, dit, 3, seed=5)
    hint = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(6))
    want = cn.controlled_forward(dit, [cn.Control(adapter, hint)], x, **kwargs)
    with FakeCuda(1 << 30) as fake:
        gpu_dit, gpu_adapter = copy.deepcopy(dit).to(CUDA), copy.deepcopy(adapter).to(CUDA)
        gpu_dit.scale_shift_table.data = gpu_dit.scale_shift_table.data.cpu()
        assert not fake.holds(gpu_dit.scale_shift_table)
        moved = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items() if k != "added_cond_kwargs"}
        got = cn.controlled_forward(gpu_dit, [cn.Control(gpu_adapter, hint.cuda())], x.cuda(),
                                    added_cond_kwargs=kwargs["added_cond_kwargs"], **moved)
        assert fake.holds(got)
    assert torch.equal(got, want)
