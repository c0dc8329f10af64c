"""PixArt LoRA files: which of our parameters each LoRA key modifies (pure key conversion, no ComfyUI).

A LoRA file names modules in one of several conventions; `prepare` rewrites every key to one canonical form,
`<our module path><the file's own suffix>` (e.g. `transformer_blocks.0.attn1.to_q.lora_down.weight`), and returns
the map from each canonical module to the parameter it patches. ComfyUI's `comfy.lora.load_lora(tensors, map)`
then builds the weight adapters (LoRA, LoHa, LoKr, ...) from it. Conventions read:

    diffusers / PEFT   transformer.transformer_blocks.0.attn1.to_q.lora_A.weight (also base_model.model., unet.,
                       or none); alpha from the file's PEFT metadata (lora_adapter_metadata) or adapter_config.json
    kohya / LyCORIS    lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight (+ .alpha), lora_transformer_,
                       lycoris_; hada_w1_a... (LoHa), lokr_w1... (LoKr)
    original layout    blocks.0.attn.qkv / cross_attn.kv_linear / attn.proj / mlp.fc1 / t_embedder.mlp.0 ...
                       (PixArt's own module names, also kohya-style lora_unet_blocks_0_attn_qkv); the fused qkv
                       and kv weights are split into our q/k/v rows exactly (the down weight is shared)
    T5 encoder         lora_te_encoder_block_0_layer_0_SelfAttention_q (lora_te1_), text_encoder.encoder.block...
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable

import torch

from . import files
from .lora_keys import (
    BY_LENGTH,
    MAGNITUDE_SUFFIXES,
    PEFT_ONLY,
    PEFT_SUFFIXES,
    SUFFIXES,
    T5_LIKE,
    Target,
    describe_lora,
    dit_targets,
    missing_factor,
    split_key,
    t5_targets,
)


class LoraError(files.WeightFileError):
    """A LoRA that cannot be applied to this model; the message says what it is and what to do."""


@dataclasses.dataclass
class Plan:
    """A LoRA file read against a DiT (and a T5): canonical tensors and key maps for comfy.lora.load_lora."""

    dit: dict[str, torch.Tensor]
    dit_map: dict[str, str]  # canonical module -> our DiT parameter
    t5: dict[str, torch.Tensor]
    t5_map: dict[str, str]
    t5_keys: list[str]  # file keys that belong to the text encoder (placed or not)
    unplaced: list[str]  # "key: why" for every file key placed nowhere
    formats: list[str]  # what was found: "diffusers/PEFT", "kohya", "original layout", "LoHa", "LoKr", ...


def _split_lokr(tensors: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]] | str:
    """LoKr's delta is kron(w1, w2) (w1 = w1_a @ w1_b when factored): with w1 [a, b] and w2 [c, d] its rows are
    a blocks of c. Splitting the rows into `parts` equal parts is exact when a divides by `parts` (split w1's rows)
    or a == 1 and c divides (split w2's rows)."""
    w1 = tensors.get(".lokr_w1", tensors.get(".lokr_w1_a"))
    w2 = tensors.get(".lokr_w2", tensors.get(".lokr_w2_a"))
    if w1 is None or w2 is None:
        return "LoKr without both factors"
    a, c = w1.shape[0], w2.shape[0]
    if a % parts == 0:
        split = (".lokr_w1", ".lokr_w1_a")
    elif a == 1 and c % parts == 0:
        split = (".lokr_w2", ".lokr_w2_a")
    else:
        return f"its LoKr factors ({a} x {c} rows) cannot be split into {parts} equal parts exactly"
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for s, t in tensors.items():
        t = t.contiguous()  # a pickle keeps strides, and torch.kron (ComfyUI's LoKr) fails on a strided factor
        for o, ch in zip(out, t.chunk(parts, dim=0) if s in split else [t] * parts):
            o[s] = ch
    return out


def split_fused(tensors: dict[str, torch.Tensor], rows: tuple[int, ...]) -> list[dict[str, torch.Tensor]] | str:
    """One fused layer's LoRA tensors (suffix -> tensor) as one set per part: the rows of the delta split exactly.
    A string says why it cannot be split."""
    roles = {s: SUFFIXES[s] for s in tensors}
    bad = sorted(s for s, r in roles.items() if r == "other")
    if bad:
        return f"{', '.join(bad)} on a fused layer cannot be split into its q/k/v parts"
    if any(r.startswith("kron") for r in roles.values()):
        if len(set(rows)) != 1:
            return "LoKr on a fused layer with unequal parts"
        return _split_lokr(tensors, len(rows))
    out: list[dict[str, torch.Tensor]] = [{} for _ in rows]
    for s, t in tensors.items():
        if roles[s] == "up":
            if t.shape[0] != sum(rows):
                return f"{s} has {t.shape[0]} rows, the fused layer {sum(rows)}"
            chunks = [c.contiguous() for c in t.split(list(rows), dim=0)]
        else:
            chunks = [t] * len(rows)
        for o, ch in zip(out, chunks):
            o[s] = ch
    return out


_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          ("_lora.up.weight", "_lora.down.weight"), (".lora.up.weight", ".lora.down.weight"),
          (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
          (".lora_B.default.weight", ".lora_A.default.weight"), (".lora_B", ".lora_A"), (".hada_w1_a", ".hada_w1_b"))


def _factor(t: dict[str, torch.Tensor], whole: str, a: str, b: str) -> tuple[int, int] | None:
    if whole in t and t[whole].ndim == 2:
        return t[whole].shape[0], t[whole].shape[1]
    if a in t and b in t and t[a].ndim == 2 and t[b].ndim == 2:
        return t[a].shape[0], t[b].shape[1]
    return None


def delta_shape(t: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(rows, columns) of the weight change one module's tensors (suffix -> tensor) make, for the plain matrix
    forms of LoRA, LoHa, LoKr and full diffs; None where the layout does not say (conv, tucker, OFT ...)."""
    if ".lora_mid.weight" in t or ".lokr_t2" in t or ".hada_t1" in t:
        return None
    for up, down in _PAIRS:
        if up in t and down in t:
            return t[up].shape[0], t[down][0].numel()
    if ".diff" in t:
        return t[".diff"].shape[0], t[".diff"][0].numel()
    w1 = _factor(t, ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b")
    w2 = _factor(t, ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
    if w1 is not None and w2 is not None:
        return w1[0] * w2[0], w1[1] * w2[1]
    return None


def _format_of(layout: str, suffixes: Iterable[str]) -> str:
    suffixes = set(suffixes)
    if any(s.startswith(".hada_") for s in suffixes):
        kind = "LoHa"
    elif any(s.startswith(".lokr_") for s in suffixes):
        kind = "LoKr"
    elif suffixes & set(PEFT_SUFFIXES):
        kind = "LoRA (PEFT/diffusers)"
    elif any("lora" in s for s in suffixes):
        kind = "LoRA"
    else:
        kind = "/".join(sorted(s.strip("._") for s in suffixes))
    return f"{kind}, {layout} names"


def _peft_kind(conf: dict) -> str:
    """A PEFT config's adapter type ("LORA", "LOHA", "LOKR" ...; LoRA where it does not say)."""
    return str(conf.get("peft_type") or "LORA").rsplit(".", 1)[-1].upper()


def _alpha_key(conf: dict) -> str | None:
    """Where a PEFT config keeps its alpha: `lora_alpha` (LoRA), `alpha` (LoHa, LoKr)."""
    if "lora_alpha" in conf:
        return "lora_alpha"
    return "alpha" if _peft_kind(conf) in ("LOHA", "LOKR") and "alpha" in conf else None


def peft_settings(metadata: dict | None, component: str) -> dict | None:
    """The PEFT config (LoRA, LoHa or LoKr) a file's metadata gives for `component` ("transformer",
    "text_encoder"): diffusers' `lora_adapter_metadata` (keys prefixed by the component) or PEFT's own
    adapter_config.json (no prefix)."""
    if not metadata:
        return None
    raw = metadata.get("lora_adapter_metadata", metadata)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, dict):
        return None
    mine = {k[len(component) + 1:]: v for k, v in raw.items() if k.startswith(component + ".")}
    conf = mine or ({k: v for k, v in raw.items() if "." not in k} if _alpha_key(raw) else {})
    return conf if _alpha_key(conf) else None


def _pattern_value(patterns: dict | None, module: str, default):
    """A rank_pattern / alpha_pattern value for a module, as PEFT matches them (peft.utils.other.get_pattern_key):
    the first key that, as a regex, ends the module name at its start or after a dot."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def peft_alpha(conf: dict, module: str, rank: int | None = None) -> float:
    """The `.alpha` ComfyUI needs (it scales by alpha / rank) for PEFT's scaling of a module: alpha / r, or for a
    LoRA of that rank alpha / sqrt(r) with use_rslora (PEFT's LoHa and LoKr have no rsLoRA); alpha_pattern entries
    override the config's alpha by module name."""
    alpha = float(_pattern_value(conf.get("alpha_pattern"), module, conf[_alpha_key(conf)]))
    return alpha * math.sqrt(rank) if rank is not None and conf.get("use_rslora") else alpha


@dataclasses.dataclass
class _Groups:
    """A file's keys sorted by the module they name: (model, file module) -> suffix -> tensor, and what is left."""

    tensors: dict[tuple[str, str], dict[str, torch.Tensor]]
    keys: dict[tuple[str, str], list[str]]
    unplaced: list[str]  # "key: why"
    t5_keys: list[str]  # file keys that belong to the text encoder (placed or not)
    unread: list[str] = dataclasses.field(default_factory=list)  # tensors that name our layers in an unread form
    unread_modules: dict[str, str] = dataclasses.field(default_factory=dict)  # module -> its unread tensor


def _unread_form(key: str, targets: Iterable[dict[str, Target]]) -> tuple[str, str] | None:
    """The module a key names and its tensor part, where that tensor is one no weight adapter reads (PEFT's OFT
    `oft_R.weight` ...), with whose it is where known; None if the key names none of our modules."""
    for i in (i for i, c in enumerate(key) if c == "."):
        if any(key[:i] in t for t in targets):
            tensor = key[i + 1:]
            whose = PEFT_ONLY.get(tensor.split(".")[0])
            return key[:i], f"{tensor} ({whose})" if whose else tensor
    return None


def _group(sd: dict[str, torch.Tensor], dit_t: dict[str, Target], t5_t: dict[str, Target], with_t5: bool) -> _Groups:
    """Each key under the DiT or T5 module it names (the longest adapter suffix first), or why it is placed nowhere."""
    g = _Groups({}, {}, [], [])
    for key in sd:
        found = None
        for s in BY_LENGTH:
            if key.endswith(s) and len(key) > len(s):
                m = key[: -len(s)]
                found = ("dit", m, s) if m in dit_t else ("t5", m, s) if m in t5_t else None
                if found:
                    break
        if found is None:
            if T5_LIKE.match(key):
                g.t5_keys.append(key)
                if with_t5:
                    g.unplaced.append(f"{key}: names no module of the T5 encoder")
                continue
            unread = _unread_form(key, (dit_t, t5_t))
            if unread is not None:
                module, form = unread
                g.unread.append(form)
                g.unread_modules[module] = form
                g.unplaced.append(f"{key}: {form} is not a tensor any weight adapter of ComfyUI reads")
                continue
            why = "no module of the PixArt DiT has this name" if split_key(key) else "not a tensor name a LoRA adapter reads"
            g.unplaced.append(f"{key}: {why}")
            continue
        model, m, s = found
        if model == "t5":
            g.t5_keys.append(key)
        g.tensors.setdefault((model, m), {})[s] = sd[key]
        g.keys.setdefault((model, m), []).append(key)
    return g


def _with_peft_alpha(part: dict[str, torch.Tensor], conf: dict | None, canon: str) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors (LoRA, LoHa, LoKr) with the `.alpha` its config gives (PEFT files carry none)."""
    if conf is None or ".alpha" in part:
        return part
    kind = _peft_kind(conf)
    if kind == "LORA" and set(part) & set(PEFT_SUFFIXES):
        rank = next(part[s] for s in (".lora_A.weight", ".lora_A.default.weight", ".lora_A") if s in part).shape[0]
        return {**part, ".alpha": torch.tensor(peft_alpha(conf, canon, rank))}
    # PEFT scales LoHa and LoKr by alpha / r, ComfyUI by alpha / the rank of the file's factors (which is r)
    if kind == "LOHA" and ".hada_w1_b" in part or kind == "LOKR" and {".lokr_w1_b", ".lokr_w2_b"} & set(part):
        return {**part, ".alpha": torch.tensor(peft_alpha(conf, canon))}
    if kind == "LOKR" and ".lokr_w1" in part:  # both whole: ComfyUI scales them by 1, PEFT by alpha / r (8: its default)
        r = int(_pattern_value(conf.get("rank_pattern"), canon, conf.get("r", 8)))
        return {**part, ".lokr_w1": part[".lokr_w1"] * (peft_alpha(conf, canon) / r)}
    return part


def _magnitude_as_dora_scale(part: dict[str, torch.Tensor], want: tuple[int, ...]) -> dict[str, torch.Tensor] | str:
    """PEFT's DoRA magnitude (one value per output row or channel, [out] or [1, out, 1, 1]) as the dora_scale
    ComfyUI's adapters read ([out, 1, ...]: one per output row); a string says why it does not fit."""
    key = next((s for s in MAGNITUDE_SUFFIXES if s in part), None)
    if key is None:
        return part
    if part[key].numel() != want[0]:
        return f"its DoRA magnitude has {part[key].numel()} values for {want[0]} output rows"
    rest = {s: t for s, t in part.items() if s != key}
    return {**rest, ".dora_scale": part[key].reshape(want[0], *[1] * (len(want) - 1))}


def prepare(sd: dict[str, torch.Tensor], dit_shapes: dict[str, tuple[int, ...]],
            t5_shapes: dict[str, tuple[int, ...]] | None = None, metadata: dict | None = None,
            name: str = "LoRA") -> Plan:
    """Place every tensor of a LoRA file on a DiT (and a T5, when given); fused original-layout layers split.

    Raises LoraError when the file is a LoRA for another model (SDXL, SD1.5, Flux, SD3 ...), when nothing in it
    matches this DiT or T5, or when a module's delta has another shape than our weight (another model size).
    Keys placed nowhere are returned in `unplaced`, with the reason.
    """
    dit_t = dit_targets(dit_shapes)
    t5_t = t5_targets(t5_shapes) if t5_shapes is not None else {}
    g = _group(sd, dit_t, t5_t, t5_shapes is not None)
    placed = {k for keys in g.keys.values() for k in keys}
    _refuse_foreign(name, [k for k in sd if k not in placed and not T5_LIKE.match(k)], len(sd) - len(g.t5_keys))
    _refuse_incomplete(name, g)
    out = {"dit": ({}, {}), "t5": ({}, {})}
    shape_errors: list[str] = []
    formats: set[str] = set()
    peft = {"dit": peft_settings(metadata, "transformer"), "t5": peft_settings(metadata, "text_encoder")}
    for (model, m), tensors in g.tensors.items():
        target = (dit_t if model == "dit" else t5_t)[m]
        formats.add(_format_of("original-layout" if target.layout == "original" else target.layout, tensors))
        # contiguous: a pickle keeps strides, and torch.kron (ComfyUI's LoKr) fails on a strided factor
        parts = split_fused(tensors, target.rows) if target.rows else [{s: t.contiguous() for s, t in tensors.items()}]
        if isinstance(parts, str):
            g.unplaced.extend(f"{k}: {parts}" for k in g.keys[(model, m)])
            continue
        shapes = dit_shapes if model == "dit" else t5_shapes
        tensors_out, key_map = out[model]
        for param, part in zip(target.params, parts):
            canon, want, got = param[: -len(".weight")], shapes[param], delta_shape(part)
            if got is not None and len(want) >= 2 and got != (want[0], math.prod(want[1:])):
                shape_errors.append(f"{m} makes a {list(got)} change for {param} {list(want)}")
                continue
            bias = shapes.get(canon + ".bias")
            if ".diff_b" in part and (bias is None or tuple(part[".diff_b"].shape) != tuple(bias)):
                shape_errors.append(f"{m} makes a {list(part['.diff_b'].shape)} change for {canon}.bias "
                                    f"{list(bias) if bias is not None else '(none)'}")
                continue
            part = _magnitude_as_dora_scale(part, want)
            if isinstance(part, str):
                shape_errors.append(f"{m}: {part} of {param} {list(want)}")
            elif canon in key_map:
                g.unplaced.extend(f"{k}: {param} is already patched by another key of this file" for k in g.keys[(model, m)])
            else:
                tensors_out.update({canon + s: t for s, t in _with_peft_alpha(part, peft[model], canon).items()})
                key_map[canon] = param
    if shape_errors:
        raise LoraError(f"{name}: {len(shape_errors)} layer(s) of this LoRA do not fit this model, e.g. "
                        f"{'; '.join(shape_errors[:3])}. The LoRA was made for a PixArt of another size (or another "
                        "model): use a LoRA trained on this checkpoint's architecture.")
    if not out["dit"][1] and not out["t5"][1]:
        _refuse_unmatched(sd, g, t5_shapes is not None, name)
    return Plan(out["dit"][0], out["dit"][1], out["t5"][0], out["t5"][1], g.t5_keys, sorted(g.unplaced),
                sorted(formats))


def _refuse_unmatched(sd: dict[str, torch.Tensor], g: _Groups, with_t5: bool, name: str) -> None:
    """Nothing of the file matched: say what it is (a T5-only LoRA without a T5 connected, an adapter in a form
    ComfyUI does not read, or another model's)."""
    if g.t5_keys and not with_t5 and len(g.t5_keys) == len(sd):
        raise LoraError(f"{name}: this LoRA has only text-encoder (T5) keys. Connect the T5 from PixArt-Σ T5 "
                        "Loader to this node's t5 input (and use its t5 output for Text Encode).")
    if g.unread:
        raise LoraError(f"{name}: its tensors name PixArt layers, but in a form no weight adapter of ComfyUI reads: "
                        f"{', '.join(sorted(set(g.unread)))}. ComfyUI applies LoRA/LoCon, LoHa, LoKr, LyCORIS's OFT "
                        "and BOFT, GLoRA, DoRA and full differences (diff); merge this adapter into the DiT (PEFT: "
                        "merge_and_unload()) and load the merged checkpoint instead.")
    what = describe_lora(sd) or files.describe(sd, files.shapes_of(sd))
    raise LoraError(f"{name}: no key of this file names a module of the PixArt DiT or T5 (it looks like {what}; "
                    f"first keys: {', '.join(sorted(sd)[:3])}). Choose a LoRA trained on PixArt-Σ/α.")


def _refuse_incomplete(name: str, g: _Groups) -> None:
    """A LoHa/LoKr module without a factor of its product, or a module whose adapter has, beside tensors we read,
    one we cannot (PEFT's AdaLoRA `lora_E` beside its `lora_A`/`lora_B`): applied, its change would be wrong."""
    half = sorted((m, miss) for (_, m), t in g.tensors.items() if (miss := missing_factor(t)))
    if half:
        raise LoraError(f"{name}: {half[0][0]} (and {len(half) - 1} more) has no {half[0][1]}, which its LoHa/LoKr "
                        "product needs: the file is damaged or cut short. Download or export it again.")
    both = sorted(m for (_, m) in g.tensors if m in g.unread_modules)
    if both:
        raise LoraError(f"{name}: {both[0]} (and {len(both) - 1} more) has {g.unread_modules[both[0]]} beside the "
                        "LoRA tensors; no weight adapter of ComfyUI reads it, and without it the change is wrong. "
                        "Merge this adapter into the DiT (PEFT: merge_and_unload()) and load the merged checkpoint.")


def _refuse_foreign(name: str, unplaced: list[str], total: int) -> None:
    """A LoRA for another model: most of its (non-T5) keys are placed nowhere and they name that model's layers."""
    other = describe_lora(unplaced)
    if other is not None and 2 * len(unplaced) >= total:
        raise LoraError(f"{name}: this is {other}, not a PixArt LoRA (e.g. {sorted(unplaced)[0]}). Use it with the "
                        "model it was made for; PixArt-Σ/α needs a LoRA trained on PixArt.")


def read_metadata(path: str | Path) -> dict:
    """A LoRA file's safetensors metadata, plus PEFT's adapter_config.json where one sits beside it (PEFT's
    save_pretrained folder), whose lora_alpha the tensors themselves do not carry."""
    path = Path(path)
    meta: dict = dict(files.read_safetensors_metadata(path))
    config = path.parent / "adapter_config.json"
    if "lora_adapter_metadata" not in meta and config.is_file():
        try:
            meta["lora_adapter_metadata"] = json.loads(config.read_text())
        except ValueError:
            pass
    return meta
