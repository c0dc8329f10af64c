"""LoRA files for the tests, in the layouts trainers write, each with the change it makes by hand.

Each builder takes the tiny DiT (or T5) and returns the file's state dict, what goes beside it (a PEFT
adapter_config.json, diffusers' metadata header), and `deltas`: {weight name: delta W at strength 1}, computed by
hand from the formats' definitions (LoRA W + s·(alpha/rank)·B·A, LoHa W + s·(alpha/rank)·(w1a·w1b)⊙(w2a·w2b), LoKr
W + s·(alpha/rank)·kron(w1, w2a·w2b), as LyCORIS defines them; the original → diffusers layout of DESIGN.md §3 with
fused qkv rows in q, k, v order); the PEFT builders also return PEFT's own LoRA'd model, a reference of its own.
"""
from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

from . import models


def kohya_lora(shapes: dict[str, tuple[int, ...]], modules: list[str], rank: int = 4, alpha: float = 2.0,
               seed: int = 0, prefix: str = "lora_unet_", scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA (`<prefix><module with dots as underscores>.lora_down/lora_up.weight` + `.alpha`) with
    random weights for `modules` (module name -> weight shape from `shapes`, keyed `<module>.weight`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        rows, cols = shapes[m + ".weight"][0], int(torch.tensor(shapes[m + ".weight"][1:]).prod())
        name = prefix + m.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * scale
        out[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * scale
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


STANDIN_LORA_MODULES = [f"transformer_blocks.{n}.{m}" for n in range(models.TINY.dit_layers)
                        for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ff.net.0.proj")]


def standin_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA for the tiny DiT (what the runner and the example servers put in models/loras)."""
    shapes = {k: tuple(v.shape) for k, v in models.make_dit().state_dict().items()}
    return kohya_lora(shapes, STANDIN_LORA_MODULES, rank=4, alpha=4.0, seed=seed, scale=0.2)


def rand(*shape: int, seed: int) -> torch.Tensor:
    """Seeded normal values x 0.1 (LoRA factors of a size that keeps the tiny models' outputs finite)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{state dict key: shape} of a model, what pixart_core.lora.prepare reads."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lora_pair(rows: int, cols: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LoRA factors for a [rows, cols] weight: (down A [rank, cols], up B [rows, rank])."""
    return rand(rank, cols, seed=seed), rand(rows, rank, seed=seed + 1)


def rows_of_parts(full, parts, shapes):
    """A fused layer's change cut into its parts' rows, in order (q, k, v); a plain layer's change as it is."""
    out, start = {}, 0
    for p in parts:
        n = shapes[p + ".weight"][0]
        out[p + ".weight"] = full[start:start + n]
        start += n
    assert start == full.shape[0]
    return out


def kohya_diffusers(dit):
    """lora_unet_<diffusers module path>: lora_down / lora_up / alpha (alpha 2, rank 4)."""
    mods = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_k", "transformer_blocks.0.ff.net.2",
            "caption_projection.linear_1", "adaln_single.linear", "proj_out", "pos_embed.proj"]
    sd = kohya_lora(shapes_of(dit), mods, rank=4, alpha=2.0, seed=1, scale=0.1)
    deltas = {}
    for m in mods:
        k = "lora_unet_" + m.replace(".", "_")
        deltas[m + ".weight"] = 2.0 / 4 * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]
    return sd, {}, deltas


ORIGINAL_PLAIN = {"blocks.0.attn.proj": "transformer_blocks.0.attn1.to_out.0",
                  "blocks.1.cross_attn.q_linear": "transformer_blocks.1.attn2.to_q",
                  "blocks.0.mlp.fc1": "transformer_blocks.0.ff.net.0.proj",
                  "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
                  "y_embedder.y_proj.fc2": "caption_projection.linear_2",
                  "final_layer.linear": "proj_out", "t_block.1": "adaln_single.linear"}


def original_layout(dit, naming):
    """Original PixArt module names (DESIGN.md §3), fused qkv and kv included; rank 4, alpha 1."""
    shapes = shapes_of(dit)
    sd, deltas, seed = {}, {}, 10
    fused = {"blocks.0.attn.qkv": [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"],
             "blocks.1.cross_attn.kv_linear": [f"transformer_blocks.1.attn2.to_{c}" for c in "kv"]}
    for orig, ours in [*ORIGINAL_PLAIN.items(), *fused.items()]:
        parts = ours if isinstance(ours, list) else [ours]
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        down, up = lora_pair(rows, shapes[parts[0] + ".weight"][1], 4, seed)
        seed += 2
        name = naming(orig)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})
        full = 1.0 / 4 * up @ down  # a fused layer's change: its rows are q, k, v (kv: k, v)
        deltas.update(rows_of_parts(full, parts, shapes))
    return sd, {}, deltas


def kohya_original(dit):
    return original_layout(dit, lambda o: "lora_transformer_" + o.replace(".", "_"))


def dotted_original(dit):
    return original_layout(dit, lambda o: "diffusion_model." + o)


def loha(dit):
    """LyCORIS LoHa on a plain and a fused layer: (w1a·w1b)⊙(w2a·w2b)·alpha/rank (alpha 3, rank 4)."""
    shapes = shapes_of(dit)
    sd, deltas = {}, {}
    for i, (name, parts) in enumerate([("lora_unet_transformer_blocks_1_ff_net_2", ["transformer_blocks.1.ff.net.2"]),
                                       ("lycoris_blocks_1_attn_qkv", [f"transformer_blocks.1.attn1.to_{c}" for c in "qkv"])]):
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        cols = shapes[parts[0] + ".weight"][1]
        t = {"hada_w1_a": rand(rows, 4, seed=20 + i) * 4, "hada_w1_b": rand(4, cols, seed=30 + i) * 4,
             "hada_w2_a": rand(rows, 4, seed=40 + i) * 4, "hada_w2_b": rand(4, cols, seed=50 + i) * 4}
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        sd[f"{name}.alpha"] = torch.tensor(3.0)
        full = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 3.0 / 4
        deltas.update(rows_of_parts(full, parts, shapes))
    return sd, {}, deltas


def lokr(dit):
    """LyCORIS LoKr: kron(w1, w2a·w2b)·alpha/rank (w2 factored, rank 2, alpha 1), on ff.net.0.proj and a fused kv."""
    shapes = shapes_of(dit)
    sd, deltas = {}, {}
    for i, (name, parts) in enumerate([("lora_unet_transformer_blocks_0_ff_net_0_proj", ["transformer_blocks.0.ff.net.0.proj"]),
                                       ("lora_unet_blocks_0_cross_attn_kv_linear", [f"transformer_blocks.0.attn2.to_{c}" for c in "kv"])]):
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        cols = shapes[parts[0] + ".weight"][1]
        a, b = 4, 4  # w1 [4, 4]; w2 [rows/4, cols/4] = w2a [rows/4, 2] @ w2b [2, cols/4]
        t = {"lokr_w1": rand(a, b, seed=60 + i) * 4, "lokr_w2_a": rand(rows // a, 2, seed=70 + i) * 4,
             "lokr_w2_b": rand(2, cols // b, seed=80 + i) * 4}
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        sd[f"{name}.alpha"] = torch.tensor(1.0)
        full = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 1.0 / 2
        deltas.update(rows_of_parts(full, parts, shapes))
    return sd, {}, deltas


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "proj"]


def peft_adapter(dit, config, seed: int = 5):
    """A real PEFT adapter (LoRA, DoRA, LoHa, LoKr, OFT ... as `config` says) on a copy of the tiny DiT, every
    adapter tensor random (x 0.1 around its initial value, so none is left at PEFT's identity init): its state dict
    as PEFT names it, the config, PEFT's model."""
    from peft import get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(dit), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:  # DoRA's magnitude: PEFT sets it to the row norms; move it off them
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif any(a in n for a in ("lora_", "hada_", "lokr_", "oft_")):
                p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return sd, config, model


def peft_lora(dit, alpha, rank=4, alpha_pattern=None, rslora=False, rank_pattern=None, targets=PEFT_TARGETS):
    """A real PEFT LoRA on the tiny DiT (random A and B), its state dict as PEFT names it, its config, its model."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        alpha_pattern=alpha_pattern or {}, rank_pattern=rank_pattern or {}, use_rslora=rslora)
    return peft_adapter(dit, config)


def peft_deltas(model):
    """PEFT's own change of each weight it adapts (each layer's get_delta_weight: its scaling x B·A), by the
    weight's name in the DiT."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name[len("base_model.model."):] + ".weight": m.get_delta_weight("default").detach().clone()
            for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and "default" in m.scaling}


def peft_folder(dit):
    """PEFT's save_pretrained: adapter_model.safetensors (base_model.model. keys) + adapter_config.json (alpha 8,
    rank 4: scale 2, which only the json carries)."""
    sd, config, model = peft_lora(dit, alpha=8)
    return sd, {"adapter_config.json": json.dumps(config.to_dict(), default=list)}, peft_deltas(model), model


def diffusers_file(dit):
    """diffusers' writer (LoraBaseMixin.write_lora_layers): transformer.-prefixed keys, the config in the
    lora_adapter_metadata header (alpha 2, rank 4, alpha_pattern to_k: 12, rsLoRA)."""
    sd, config, model = peft_lora(dit, alpha=2, alpha_pattern={"to_k": 12}, rslora=True)
    sd = {"transformer." + k[len("base_model.model."):]: v for k, v in sd.items()}
    meta = {f"transformer.{k}": v for k, v in config.to_dict().items()}
    return sd, {"metadata": meta}, peft_deltas(model), model


def peft_bare(dit):
    """PEFT keys without any prefix and no alpha anywhere: alpha = rank (scale 1), as diffusers assumes."""
    sd, config, model = peft_lora(dit, alpha=4)
    sd = {k[len("base_model.model."):]: v for k, v in sd.items()}
    return sd, {}, peft_deltas(model), model


# alpha_pattern / rank_pattern keys where PEFT's rule (peft.utils.other.get_pattern_key: the key, a regex, must
# end the module name and start it or follow a dot; the first matching key wins) and a substring search
# (re.search) disagree on the tiny DiT's module names:
#   "to_out"                 ends no name (to_out.0); a search finds attn1/attn2.to_out.0
#   "blocks.1.attn1.to_q"    follows "transformer_", not a dot: no module; a search finds block 1's to_q
#   "1.attn2.to_[kv]"        a regex: block 1's attn2.to_k and to_v (before "to_k" below, so it wins for to_k)
#   "linear"                 adaln_single.linear only; a search also finds every linear_1 / linear_2
#   "proj"                   ff.net.0.proj and the conv pos_embed.proj; a search also finds proj_out and
#                            caption_projection.linear_1/2
PATTERN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "linear", "linear_1", "linear_2", "proj", "proj_out", "ff.net.2")
ALPHA_PATTERN = {"to_out": 3, "blocks.1.attn1.to_q": 5, "1.attn2.to_[kv]": 7, "to_k": 11, "linear": 13, "proj": 6}
RANK_PATTERN = {"to_out": 2, "blocks.1.attn1.to_q": 6, "1.attn2.to_[kv]": 2, "linear": 8, "proj": 3}


def peft_patterns(dit, rslora: bool):
    """A PEFT LoRA (rank 4, alpha 4) with ALPHA_PATTERN and RANK_PATTERN on PATTERN_TARGETS."""
    return peft_lora(dit, alpha=4, rank=4, alpha_pattern=ALPHA_PATTERN, rank_pattern=RANK_PATTERN, rslora=rslora,
                     targets=PATTERN_TARGETS)


FORMATS = {"kohya_diffusers": kohya_diffusers, "kohya_original_fused": kohya_original,
           "original_dotted_fused": dotted_original, "loha": loha, "lokr": lokr,
           "peft_folder": peft_folder, "diffusers_metadata": diffusers_file, "peft_no_prefix": peft_bare}


def merge(base: dict[str, torch.Tensor], *changes: tuple[float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Hand merge: W + strength * delta (a conv's delta reshaped to its kernel) for each (strength, deltas)."""
    out = {}
    for k, v in base.items():
        w = v.clone()
        for strength, deltas in changes:
            if k in deltas:
                w = w + strength * deltas[k].reshape(v.shape)
        out[k] = w.contiguous()
    return out


def write_lora(comfy_base, name, sd, extra=None):
    """Into models/loras: a .safetensors (name), or a PEFT folder (name/adapter_model.safetensors + json)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    extra = extra or {}
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    if "adapter_config.json" in extra:
        (loras / name).mkdir(exist_ok=True)
        save_file(sd, str(loras / name / "adapter_model.safetensors"))
        (loras / name / "adapter_config.json").write_text(extra["adapter_config.json"])
        return f"{name}/adapter_model.safetensors"
    if "metadata" in extra:
        LoraBaseMixin.write_lora_layers(sd, str(loras / name), True, "lora.safetensors", None, True,
                                        lora_adapter_metadata=dict(extra["metadata"]))
        return f"{name}/lora.safetensors"
    save_file(sd, str(loras / f"{name}.safetensors"))
    return f"{name}.safetensors"


def t5_lora(t5):
    """kohya lora_te_ keys on self-attention q and the gated-GELU wi_0, and PEFT text_encoder. keys on wo."""
    shapes = shapes_of(t5)
    sd, deltas = {}, {}
    kohya_mods = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0"]
    sd.update(kohya_lora(shapes, kohya_mods, rank=4, alpha=2.0, seed=90, prefix="lora_te_", scale=0.3))
    for m in kohya_mods:
        k = "lora_te_" + m.replace(".", "_")
        deltas[m + ".weight"] = 0.5 * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]
    m = "encoder.block.0.layer.1.DenseReluDense.wo"
    down, up = lora_pair(shapes[m + ".weight"][0], shapes[m + ".weight"][1], 4, 95)
    sd[f"text_encoder.{m}.lora_A.weight"], sd[f"text_encoder.{m}.lora_B.weight"] = down * 3, up * 3
    deltas[m + ".weight"] = 9 * up @ down  # no alpha: alpha = rank
    return sd, deltas


def write_comfy_keymap_lora(path, dit, rank=2, alpha=1.0, seed=0):
    """A LoRA in the layouts ComfyUI's PixArt key map reads: diffusers keys under `transformer.` (lora_A/lora_B +
    alpha) and one original-layout kohya key on the fused self-attention qkv (lora_down/lora_up); returns
    {diffusers weight name: delta W at strength 1}, the hand merge's deltas."""
    g = torch.Generator().manual_seed(seed)
    sd, delta = {}, {}
    width = dit.config.num_attention_heads * dit.config.attention_head_dim
    for name in ("transformer_blocks.0.attn1.to_k", "transformer_blocks.1.attn2.to_v", "transformer_blocks.1.ff.net.0.proj",
                 "transformer_blocks.0.attn2.to_q"):
        w = dit.get_submodule(name).weight
        a, b = torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
        delta[f"{name}.weight"] = (alpha / rank) * b @ a
    a, b = torch.randn(rank, width, generator=g) * 0.1, torch.randn(3 * width, rank, generator=g) * 0.1
    sd["lora_unet_blocks_1_attn_qkv.lora_down.weight"], sd["lora_unet_blocks_1_attn_qkv.lora_up.weight"] = a, b
    sd["lora_unet_blocks_1_attn_qkv.alpha"] = torch.tensor(float(rank))  # alpha = rank: scale 1
    for part, rows in zip("qkv", (b @ a).chunk(3)):
        delta[f"transformer_blocks.1.attn1.to_{part}.weight"] = rows
    save_file(sd, str(path))
    return delta
