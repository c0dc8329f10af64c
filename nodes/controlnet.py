"""ControlNet nodes: a PixArt ControlNet (the authors' PixArt-δ checkpoint for PixArt-α, or an adapter file or folder
in the diffusers research project / SimpleTuner layout) loaded under ComfyUI's model management, and applied to the
DiT like a model patch: the DiT that comes out carries the ControlNet, its control image and settings to the
samplers (Sampler, Sampler (Advanced), Tiled Refine), which encode the hint and run the controlled forward."""
from __future__ import annotations

import dataclasses
import logging

from comfy_api.v0_0_2 import io, ui

from ..pixart_core import controlnet_files as core_cn
from ..pixart_core import transformer as core_dit
from ..pixart_core.logs import logger_name
from ..pixart_core.vae import FAMILY_NAMES
from .comfy import devices, loading, paths
from .search_aliases import search_aliases
from .types import CATEGORY, VAE, AppliedControl, ControlNet, ControlNetHandle, DiT, DiTHandle, VAEHandle

log = logging.getLogger(logger_name(__name__))
CONTROLNET_FOLDERS = ("controlnet",)


class ControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaControlNetLoader",
            display_name="PixArt-Σ ControlNet Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a PixArt ControlNet: the authors' PixArt-XL-2-1024-ControlNet.pth (only its control "
                        "blocks; the DiT comes from PixArt-Σ DiT Loader), or an adapter file or folder "
                        "(controlnet_blocks.*, diffusers research project / SimpleTuner).",
            **search_aliases("pixart sigma controlnet loader", "pixart alpha controlnet", "controlnet", "pixart-delta"),
            inputs=[
                io.Combo.Input("controlnet_name",
                               options=paths.files(*CONTROLNET_FOLDERS)
                               + paths.model_folders(CONTROLNET_FOLDERS, "controlnet"),
                               tooltip="A PixArt ControlNet in models/controlnet: a .pth/.safetensors file, or an "
                                       "adapter folder (config.json + diffusion_pytorch_model.safetensors)."),
                io.Combo.Input("dtype", options=list(core_dit.DTYPES), default="auto",
                               tooltip="auto: what the DiT Loader's auto picks on this device; use the DiT's dtype."),
            ],
            outputs=[ControlNet.Output(display_name="controlnet",
                                       tooltip="The ControlNet, for PixArt-Σ ControlNet Apply (loaded with the DiT "
                                               "when a sampler runs).")],
        )

    @classmethod
    def execute(cls, controlnet_name: str, dtype: str) -> io.NodeOutput:
        path = paths.resolve(controlnet_name, CONTROLNET_FOLDERS)
        load_device, offload_device = devices.dit_devices()
        compute = core_dit.compute_dtype(dtype, devices.auto_dtype("dit", load_device))
        adapter, base, layout = core_cn.load_controlnet(path, compute)
        config = adapter.config
        text = (f"{controlnet_name}: {layout}, {config.blocks} control blocks, {config.width} wide"
                + (f", trained with PixArt {base.name}" if base else ""))
        handle = ControlNetHandle(loading.wrap(adapter, load_device, offload_device), controlnet_name, base, layout)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class ControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaControlNetApply",
            display_name="PixArt-Σ ControlNet Apply",
            category=f"{CATEGORY}/controlnet",
            description="Applies a PixArt ControlNet to the DiT, like a model patch: every pass of each step (with "
                        "and without the prompt, PAG) gets the same control, as the reference does. Chain Apply "
                        "nodes for several ControlNets. For PixArt-Σ Sampler, Sampler (Advanced) and Tiled Refine; "
                        "DiT → MODEL refuses a controlled DiT (ComfyUI's PixArt has no ControlNet hook).",
            **search_aliases("pixart sigma controlnet apply", "apply controlnet", "controlnet", "edge", "hed",
                             "canny"),
            inputs=[
                DiT.Input("dit", tooltip="The transformer (from PixArt-Σ DiT Loader, a LoRA loader or another Apply)."),
                ControlNet.Input("controlnet", tooltip="The ControlNet from PixArt-Σ ControlNet Loader."),
                io.Image.Input("image", tooltip="The control image, e.g. an edge map (the α ControlNet was trained on "
                                                "HED edges; ComfyUI's Canny works too). Scaled to cover the "
                                                "generation's size and centre-cropped, then VAE-encoded."),
                VAE.Input("vae", tooltip="The VAE of the DiT's latent space (PixArt-α: the SD VAE; PixArt-Σ: SDXL), "
                                         "which encodes the control image."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scales what the ControlNet adds to the DiT (0: nothing; 1: as trained)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="It acts on the steps that start from this fraction of the WHOLE schedule "
                                       "(img2img and later stages count in the whole schedule too)..."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="...up to (not including) this one. 10 steps, 0.2 to 0.5: steps 2, 3, 4."),
            ],
            outputs=[DiT.Output(display_name="dit", tooltip="The DiT with this ControlNet (and any applied before it), "
                                                            "for the PixArt-Σ samplers; the input DiT is unchanged.")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, controlnet: ControlNetHandle, image, vae: VAEHandle, strength: float,
                start_percent: float, end_percent: float) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"PixArt ControlNet Apply: start_percent {start_percent} is after end_percent "
                             f"{end_percent}; the ControlNet acts from start to end of the schedule.")
        adapter = controlnet.patcher.model.inner
        core_cn.check_base(adapter.config, dit.patcher.model.inner.config, controlnet.name, controlnet.base,
                           dit.variant)
        space = dit.variant.vae
        if vae.family and vae.family != space:
            raise ValueError(f"PixArt ControlNet Apply: {vae.name} is {FAMILY_NAMES[vae.family]}, but {dit.name} "
                             f"({dit.variant.name}) works in the {space.upper()} latent space: connect "
                             f"{FAMILY_NAMES[space]}, which the control image must be encoded with.")
        if start_percent == end_percent or strength == 0:
            log.warning("PixArt ControlNet %s: strength %g, from %g to %g of the schedule: it acts on no step.",
                        controlnet.name, strength, start_percent, end_percent)
        applied = AppliedControl(controlnet, image.detach(), vae, strength, start_percent, end_percent)
        out = dataclasses.replace(dit, controls=(*dit.controls, applied))
        text = (f"{controlnet.name} on {dit.name}: strength {strength:g} from {start_percent:g} to {end_percent:g} "
                f"of the schedule; {len(out.controls)} ControlNet(s) applied")
        return io.NodeOutput(out, ui=ui.PreviewText(text))
