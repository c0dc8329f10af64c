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
    with pytest.raises(ValueError, match="hint batch 3 does not divide the model batch 4"):
        cn.controlled_forward(dit, [cn.Control(adapter, torch.zeros(3, 4, 8, 12))], x, **kwargs)


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
    kwargs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    got = cn.controlled_forward(half, [cn.Control(adapter, hint)], x.bfloat16(), **kwargs)
    assert got.dtype == torch.bfloat16
    # bf16 through 4 blocks: 0.01 off here; without the control the output is 0.54 off
    assert (got.float() - expected).abs().max() < 0.05
