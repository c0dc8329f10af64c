"""Writes example_workflows/*.json (ComfyUI UI format) from the compact specs below, taking each node's widget
order and defaults from the node definitions ComfyUI loads (so the files follow the nodes when inputs change).

    ./scripts/harness make_examples             # rewrite every example
    ./scripts/harness make_thumbnails           # then their .jpg thumbnails (real frontend, chromium)

A spec node of type "Note" is the frontend's own text note (not a server node): {"text": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid

from . import comfyui
from .download import CATALOG, DEFAULT_ENDPOINT, file_url
from .location import REPO
from .workflow import _is_widget, combo_options

EXAMPLES = REPO / "example_workflows"
PROMPT = "A small cactus with a happy face in the Sahara desert, golden hour, highly detailed photograph"

# node: (id, type, pos, size, {widget: value}); links: (from id, from slot, to id, to input name)
T5 = (1, "PixArtSigmaT5Loader", [40, 80], [340, 110])
ENC = (2, "PixArtSigmaTextEncode", [420, 80], [420, 300])
DIT = (3, "PixArtSigmaDiTLoader", [40, 260], [340, 110])
SAMPLER = (4, "PixArtSigmaSampler", [880, 80], [320, 360])
VAE = (5, "PixArtSigmaVAELoader", [880, 480], [320, 90])
DECODE = (6, "PixArtSigmaVAEDecode", [1240, 80], [300, 130])
SAVE = (7, "SaveImage", [1560, 80], [400, 420])
BASE_LINKS = [(1, 0, 2, "t5"), (2, 0, 4, "positive"), (2, 1, 4, "negative"), (3, 0, 4, "dit"), (4, 0, 6, "samples"),
              (5, 0, 6, "vae"), (6, 0, 7, "images")]


# The frontend's missing-models dialog downloads only these (MissingModelsWarning in comfyui-frontend-package).
DOWNLOADABLE_SUFFIXES = (".safetensors", ".sft")


def model_metadata(widget_values: list) -> list[dict]:
    """`properties.models` of a loader node, as ComfyUI's own templates carry it: for each widget value that names an
    official single file in harness/download.py's CATALOG, {name, url, directory}. The frontend lists an entry when
    its name is a widget value of the node and the file is not in that models folder. Diffusers folders (several
    files) do not fit this one-file schema, and .pth files are refused by the dialog: neither gets an entry."""
    out = []
    for value in widget_values:
        entry = CATALOG.get(value) if isinstance(value, str) else None
        if entry is None or len(entry.files) != 1 or not value.endswith(DOWNLOADABLE_SUFFIXES):
            continue
        hub_path, local = entry.files[0]
        directory, name = local.split("/", 1)
        if name == value:
            out.append({"name": name, "url": file_url(DEFAULT_ENDPOINT, entry.repo, hub_path), "directory": directory})
    return out


def sigma(t5_quant: str, dit_name: str, variant: str, size: int, prefix: str) -> dict:
    return {
        "nodes": [
            (*T5, {"t5_name": "t5xxl_fp16.safetensors", "quantization": t5_quant}),
            (*ENC, {"positive": PROMPT, "negative": "", "max_tokens": 0, "caption_cleaning": "diffusers"}),
            (*DIT, {"dit_name": dit_name, "variant": variant}),
            (*SAMPLER, {"seed": 0, "steps": 20, "cfg": 4.5, "scheduler": "dpm++ 2m", "width": size, "height": size}),
            (*VAE, {"vae_name": "sdxl_vae.safetensors"}),
            (*DECODE, {"tiling": "auto"}),
            (*SAVE, {"filename_prefix": prefix}),
        ],
        "links": BASE_LINKS,
    }


def t5_gguf() -> dict:
    """The T5 from a GGUF file (city96/t5-v1_1-xxl-encoder-gguf): already quantized, so quantization 'none'."""
    wf = sigma("none", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-t5-gguf")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaT5Loader":
            wf["nodes"][i] = (*n[:4], {**n[4], "t5_name": "t5-v1_1-xxl-encoder-Q8_0.gguf"})
    return wf


def img2img() -> dict:
    wf = sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-img2img")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaSampler":
            wf["nodes"][i] = (*SAMPLER[:2], [880, 460], SAMPLER[3], {**n[4], "denoise": 0.6})
        if n[1] == "PixArtSigmaVAELoader":
            wf["nodes"][i] = (*VAE[:2], [880, 880], VAE[3], n[4])
    wf["nodes"] += [
        (8, "LoadImage", [40, 480], [320, 360], {"image": "example.png"}),
        (9, "ImageScale", [400, 480], [300, 130], {"upscale_method": "lanczos", "width": 1024, "height": 1024,
                                                   "crop": "center"}),
        (10, "VAELoader", [400, 680], [300, 60], {"vae_name": "sdxl_vae.safetensors"}),
        (11, "VAEEncode", [740, 480], [120, 50], {}),
    ]
    wf["links"] = BASE_LINKS + [(8, 0, 9, "image"), (9, 0, 11, "pixels"), (10, 0, 11, "vae"), (11, 0, 4, "latent")]
    return wf


def sigma_4k() -> dict:
    """1024 -> 2K -> 4K: Σ-1024 at the 16:9 bin, Hires Upscale (VAE) to the 2K bin and img2img with the Σ-2K model,
    Hires Upscale to 3840x2160, Tiled Refine with the 2K model in 2K-bin tiles, tiled decode."""
    wf = sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-4K")
    nodes = {n[0]: n for n in wf["nodes"]}
    nodes[4] = (*SAMPLER[:4], {**nodes[4][4], "width": 1344, "height": 768})
    nodes[5] = (5, VAE[1], [40, 420], VAE[3], nodes[5][4])
    nodes[6] = (6, DECODE[1], [2040, 80], DECODE[3], {"tiling": "always"})
    nodes[7] = (7, SAVE[1], [2360, 80], SAVE[3], nodes[7][4])
    wf["nodes"] = list(nodes.values()) + [
        (8, "PixArtSigmaDiTLoader", [40, 560], [340, 110], {"dit_name": "PixArt-Sigma-XL-2-2K-MS.pth",
                                                             "variant": "sigma-2k"}),
        (9, "PixArtSigmaHiresUpscale", [1240, 80], [320, 200], {"family": "2048"}),
        (10, "PixArtSigmaSampler", [1240, 320], [320, 360],
         {"seed": 0, "steps": 20, "cfg": 4.5, "scheduler": "dpm++ 2m", "denoise": 0.5}),
        (11, "PixArtSigmaHiresUpscale", [1600, 80], [320, 200], {"family": "2048", "width": 3840, "height": 2160}),
        (12, "PixArtSigmaTiledRefine", [1600, 320], [320, 360],
         {"seed": 0, "steps": 20, "cfg": 4.5, "scheduler": "dpm++ 2m", "denoise": 0.35}),
    ]
    wf["links"] = [(1, 0, 2, "t5"), (2, 0, 4, "positive"), (2, 1, 4, "negative"), (3, 0, 4, "dit"),
                   (4, 0, 9, "samples"), (5, 0, 9, "vae"),
                   (8, 0, 10, "dit"), (2, 0, 10, "positive"), (2, 1, 10, "negative"), (9, 0, 10, "latent"),
                   (10, 0, 11, "samples"), (5, 0, 11, "vae"),
                   (8, 0, 12, "dit"), (2, 0, 12, "positive"), (2, 1, 12, "negative"), (11, 0, 12, "latent"),
                   (12, 0, 6, "samples"), (5, 0, 6, "vae"), (6, 0, 7, "images")]
    return wf


def alpha512() -> dict:
    wf = sigma("8-bit (bitsandbytes)", "PixArt-XL-2-512x512.pth", "alpha-512", 512, "PixArt-alpha-512")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaVAELoader":
            wf["nodes"][i] = (*n[:4], {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"})
    return wf


def lora() -> dict:
    """Two stacked LoRA loaders between the DiT loader and the sampler."""
    from .standins import EXAMPLE_LORAS

    wf = sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-LoRA")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaDiTLoader":
            wf["nodes"][i] = (*DIT[:2], [40, 440], DIT[3], n[4])
        if n[1] == "PixArtSigmaVAELoader":
            wf["nodes"][i] = (*VAE[:2], [880, 560], VAE[3], n[4])
    wf["nodes"] += [
        (8, "PixArtSigmaLoraLoader", [420, 440], [340, 130], {"lora_name": EXAMPLE_LORAS[0], "strength": 0.8}),
        (9, "PixArtSigmaLoraLoader", [420, 620], [340, 130], {"lora_name": EXAMPLE_LORAS[1], "strength": 0.5}),
    ]
    wf["links"] = [link for link in BASE_LINKS if link[2:] != (4, "dit")] + [
        (3, 0, 8, "dit"), (8, 0, 9, "dit"), (9, 0, 4, "dit")]
    return wf


def inpaint() -> dict:
    """Load Image (its MASK: the transparent part, or what the mask editor painted) -> VAE Encode -> Set Latent
    Noise Mask -> sampler: only the masked part is repainted."""
    wf = sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-inpaint")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaSampler":
            wf["nodes"][i] = (*SAMPLER[:2], [1240, 460], SAMPLER[3], n[4])
        if n[1] == "PixArtSigmaVAELoader":
            wf["nodes"][i] = (*VAE[:2], [400, 880], VAE[3], n[4])
    wf["nodes"] += [
        (8, "LoadImage", [40, 480], [320, 360], {"image": "example.png"}),
        (9, "ImageScale", [400, 480], [300, 130], {"upscale_method": "lanczos", "width": 1024, "height": 1024,
                                                   "crop": "disabled"}),
        (10, "PixArtSigmaVAEEncode", [740, 480], [300, 80], {}),
        (11, "SetLatentNoiseMask", [1000, 640], [200, 50], {}),
    ]
    wf["links"] = BASE_LINKS + [(8, 0, 9, "image"), (9, 0, 10, "image"), (5, 0, 10, "vae"), (10, 0, 11, "samples"),
                                (8, 1, 11, "mask"), (11, 0, 4, "latent")]
    return wf


ADVANCED = (4, "PixArtSigmaSamplerAdvanced", [880, 80], [340, 560])
EMPTY = (9, "EmptyLatentImage", [420, 420], [300, 110])


def pag() -> dict:
    """Perturbed-attention guidance with diffusers' PixArtSigmaPAGPipeline defaults (scale 3.0, layers 'blocks.1'),
    from an Empty Latent Image."""
    wf = sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024, "PixArt-Sigma-PAG")
    wf["nodes"] = [n for n in wf["nodes"] if n[1] != "PixArtSigmaSampler"] + [
        (*ADVANCED, {"seed": 0, "steps": 20, "cfg": 4.5, "scheduler": "dpm++ 2m", "pag_scale": 3.0,
                     "pag_layers": "blocks.1"}),
        (*EMPTY, {"width": 1024, "height": 1024, "batch_size": 1}),
    ]
    wf["links"] = BASE_LINKS + [(9, 0, 4, "latent")]
    return wf


def two_stage() -> dict:
    """The community PixArt-Σ 900M v0.7 experts: stage 1 runs the first 12 of 20 steps (timesteps 999 to ~450) and
    stops with its noise; stage 2, trained on the last 400 timesteps, finishes the same schedule."""
    stage = {"seed": 0, "steps": 20, "cfg": 4.5, "scheduler": "dpm++ 2m"}
    wf = sigma("8-bit (bitsandbytes)", "pixart-900m-1024-ft-v0.7-stage1", "auto", 1024, "PixArt-Sigma-two-stage")
    wf["nodes"] = [n for n in wf["nodes"] if n[1] not in ("PixArtSigmaSampler", "PixArtSigmaVAELoader",
                                                          "PixArtSigmaVAEDecode", "SaveImage")] + [
        (*ADVANCED, {**stage, "end_step": 12, "return_with_leftover_noise": "enable"}),
        (*EMPTY, {"width": 1024, "height": 1024, "batch_size": 1}),
        (8, "PixArtSigmaDiTLoader", [880, 680], [340, 110], {"dit_name": "pixart-900m-1024-ft-v0.7-stage2",
                                                             "variant": "auto"}),
        (10, "PixArtSigmaSamplerAdvanced", [1260, 80], [340, 560],
         {**stage, "add_noise": "disable", "start_step": 12}),
        (*VAE[:2], [1260, 680], VAE[3], {"vae_name": "sdxl_vae.safetensors"}),
        (*DECODE[:2], [1640, 80], DECODE[3], {"tiling": "auto"}),
        (*SAVE[:2], [1960, 80], SAVE[3], {"filename_prefix": "PixArt-Sigma-two-stage"}),
    ]
    wf["links"] = [(1, 0, 2, "t5"), (2, 0, 4, "positive"), (2, 1, 4, "negative"), (3, 0, 4, "dit"), (9, 0, 4, "latent"),
                   (2, 0, 10, "positive"), (2, 1, 10, "negative"), (8, 0, 10, "dit"), (4, 0, 10, "latent"),
                   (10, 0, 6, "samples"), (5, 0, 6, "vae"), (6, 0, 7, "images")]
    return wf


def ksampler() -> dict:
    """Our loaders and T5 into ComfyUI's KSampler through the bridges (PixArt-Σ DiT → MODEL, Conditioning →
    CONDITIONING), ComfyUI's Empty Latent Image, our VAE Decode."""
    return {
        "nodes": [
            (*T5, {"t5_name": "t5xxl_fp16.safetensors", "quantization": "8-bit (bitsandbytes)"}),
            (*ENC, {"positive": PROMPT, "negative": "", "max_tokens": 0, "caption_cleaning": "diffusers"}),
            (DIT[0], DIT[1], [40, 420], DIT[3], {"dit_name": "PixArt-Sigma-XL-2-1024-MS.safetensors", "variant": "auto"}),
            (8, "PixArtSigmaDiTToModel", [420, 440], [260, 50], {}),
            (9, "PixArtSigmaConditioningToComfy", [880, 80], [330, 50], {}),
            (10, "PixArtSigmaConditioningToComfy", [880, 180], [330, 50], {}),
            (11, "EmptyLatentImage", [880, 440], [300, 110], {"width": 1024, "height": 1024, "batch_size": 1}),
            (12, "KSampler", [1220, 80], [320, 480],
             {"seed": 0, "steps": 20, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "simple", "denoise": 1.0}),
            (VAE[0], VAE[1], [1220, 600], VAE[3], {"vae_name": "sdxl_vae.safetensors"}),
            (DECODE[0], DECODE[1], [1580, 80], DECODE[3], {"tiling": "auto"}),
            (SAVE[0], SAVE[1], [1920, 80], SAVE[3], {"filename_prefix": "PixArt-Sigma-KSampler"}),
        ],
        "links": [(1, 0, 2, "t5"), (2, 0, 9, "conditioning"), (2, 1, 10, "conditioning"), (3, 0, 8, "dit"),
                  (8, 0, 12, "model"), (9, 0, 12, "positive"), (10, 0, 12, "negative"), (11, 0, 12, "latent_image"),
                  (12, 0, 6, "samples"), (5, 0, 6, "vae"), (6, 0, 7, "images")],
    }


CONTROLNET_PROMPT = ("A girl with long blonde hair in a pink dress standing on a green hill under a blue sky with "
                     "white clouds, storybook illustration")

CONTROLNET_NOTE = (
    "PixArt-δ ControlNet (PixArt-alpha/PixArt-ControlNet) was trained on HED edge maps. ComfyUI's core Canny node "
    "(here) works, but HED edges fit it best: a HED node comes from a preprocessor pack, e.g. comfyui_controlnet_aux's "
    "HED Soft-Edge Lines (HEDPreprocessor); put it in place of Canny.\n\n"
    "The control image is scaled to cover the generation's size and centre-cropped, then encoded with the VAE (the "
    "SD VAE for PixArt-α). strength scales the ControlNet's output; start/end_percent choose the part of the schedule "
    "it acts on. The ControlNet Loader reads only the control blocks of the .pth; the DiT comes from the DiT Loader.")


def alpha_controlnet() -> dict:
    """The authors' PixArt-δ ControlNet on the α-1024 DiT at 1024x1024: Load Image -> Image Scale -> Canny ->
    PixArt-Σ ControlNet Apply (with the SD VAE) -> the sampler's DiT; a Note names the HED alternative."""
    wf = sigma("8-bit (bitsandbytes)", "PixArt-XL-2-1024-MS.pth", "auto", 1024, "PixArt-alpha-ControlNet")
    for i, n in enumerate(wf["nodes"]):
        if n[1] == "PixArtSigmaTextEncode":
            wf["nodes"][i] = (*n[:4], {**n[4], "positive": CONTROLNET_PROMPT})
        if n[1] == "PixArtSigmaSampler":
            wf["nodes"][i] = (*SAMPLER[:2], [1240, 440], SAMPLER[3], n[4])
        if n[1] == "PixArtSigmaVAELoader":
            wf["nodes"][i] = (*VAE[:2], [40, 420], VAE[3], {"vae_name": "vae-ft-mse-840000-ema-pruned.safetensors"})
        if n[1] == "PixArtSigmaVAEDecode":
            wf["nodes"][i] = (*DECODE[:2], [1600, 80], DECODE[3], n[4])
        if n[1] == "SaveImage":
            wf["nodes"][i] = (*SAVE[:2], [1920, 80], SAVE[3], n[4])
    wf["nodes"] += [
        (8, "LoadImage", [40, 560], [320, 360], {"image": "example.png"}),
        (9, "ImageScale", [400, 560], [300, 130], {"upscale_method": "lanczos", "width": 1024, "height": 1024,
                                                   "crop": "center"}),
        (10, "Canny", [400, 740], [300, 90], {"low_threshold": 0.4, "high_threshold": 0.8}),
        (11, "PixArtSigmaControlNetLoader", [400, 420], [340, 90],
         {"controlnet_name": "PixArt-XL-2-1024-ControlNet.pth"}),
        (12, "PixArtSigmaControlNetApply", [880, 440], [320, 200],
         {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}),
        (13, "Note", [740, 720], [460, 230], {"text": CONTROLNET_NOTE}),
    ]
    wf["links"] = [link for link in BASE_LINKS if link[2:] != (4, "dit")] + [
        (8, 0, 9, "image"), (9, 0, 10, "image"), (3, 0, 12, "dit"), (11, 0, 12, "controlnet"), (10, 0, 12, "image"),
        (5, 0, 12, "vae"), (12, 0, 4, "dit")]
    return wf


SPECS = {
    "pixart_sigma_1024_t5_8bit": sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024,
                                       "PixArt-Sigma"),
    "pixart_sigma_1024_lowvram_t5_nf4": sigma("4-bit nf4 (bitsandbytes)", "PixArt-Sigma-XL-2-1024-MS", "auto", 1024,
                                              "PixArt-Sigma-lowvram"),
    "pixart_sigma_2k": sigma("8-bit (bitsandbytes)", "PixArt-Sigma-XL-2-2K-MS.pth", "sigma-2k", 2048,
                             "PixArt-Sigma-2K"),
    "pixart_sigma_img2img": img2img(),
    "pixart_sigma_1024_t5_gguf": t5_gguf(),
    "pixart_alpha_512": alpha512(),
    "pixart_sigma_lora": lora(),
    "pixart_sigma_inpaint": inpaint(),
    "pixart_sigma_pag": pag(),
    "pixart_sigma_two_stage": two_stage(),
    "pixart_sigma_4k": sigma_4k(),
    "pixart_sigma_ksampler": ksampler(),
    "pixart_alpha_controlnet": alpha_controlnet(),
}


def build(name: str, spec: dict, info: dict) -> dict:
    """A UI-format workflow (the layout ComfyUI's frontend saves) from a spec."""
    link_rows = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    types = {n[0]: n[1] for n in spec["nodes"]}
    for i, (src, slot, dst, inp) in enumerate(spec["links"], 1):
        out_type = info[types[src]]["output"][slot]
        out_links.setdefault((src, slot), []).append(i)
        in_links[(dst, inp)] = i
        link_rows.append([i, src, slot, dst, None, out_type])  # the target slot is filled in below
    nodes = []
    for order, (nid, ntype, pos, size, values) in enumerate(spec["nodes"]):
        if ntype == "Note":
            nodes.append(_note(nid, pos, size, order, values["text"]))
            continue
        node_info = info[ntype]
        specs = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}
        optional = set(node_info["input"].get("optional", {}))
        order_names = node_info["input_order"].get("required", []) + node_info["input_order"].get("optional", [])
        inputs, widgets = [], []
        for inp in order_names:
            s = specs[inp]
            if _is_widget(s):
                opts = s[1] if len(s) > 1 else {}
                choices = combo_options(s)
                value = values.get(inp, opts.get("default", choices[0] if choices else None))
                widgets.append(value)
                if opts.get("control_after_generate") or inp in ("seed", "noise_seed"):
                    widgets.append("fixed")
                if opts.get("image_upload"):
                    widgets.append("image")
            else:
                link = in_links.get((nid, inp))
                if link is None and inp not in optional:
                    raise ValueError(f"{ntype} #{nid}: required input {inp!r} is not connected")
                entry = {"name": inp, "type": s[0], "link": link}
                if inp in optional:
                    entry["shape"] = 7
                if link is not None:
                    link_rows[link - 1][4] = len(inputs)
                inputs.append(entry)
        unknown = set(values) - set(order_names)
        if unknown:
            raise ValueError(f"{ntype} #{nid}: no inputs named {sorted(unknown)}")
        outputs = [{"name": oname, "type": otype, "links": out_links.get((nid, slot), [])}
                   for slot, (otype, oname) in enumerate(zip(node_info["output"], node_info["output_name"]))]
        properties = {"Node name for S&R": ntype}
        models = model_metadata(widgets)
        if models:
            properties["models"] = models
        nodes.append({"id": nid, "type": ntype, "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
                      "inputs": inputs, "outputs": outputs, "properties": properties, "widgets_values": widgets})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "pixart-sigma-nodes/" + name)), "revision": 0,
            "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(link_rows),
            "nodes": nodes, "links": link_rows, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _note(nid: int, pos: list, size: list, order: int, text: str) -> dict:
    """The frontend's Note node as it saves one (a virtual node: never sent to the server)."""
    return {"id": nid, "type": "Note", "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
            "inputs": [], "outputs": [], "properties": {"text": ""}, "widgets_values": [text], "color": "#432",
            "bgcolor": "#653"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"which examples (default: all): {', '.join(SPECS)}")
    opts = p.parse_args(argv)
    nodes = comfyui.init_comfy(quiet=True)
    for name in opts.names or SPECS:
        spec = SPECS[name]
        info = comfyui.object_info(nodes, {n[1] for n in spec["nodes"]})
        path = EXAMPLES / f"{name}.json"
        path.write_text(json.dumps(build(name, spec, info), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
