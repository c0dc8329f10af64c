"""Resolution node: snap a requested size to the model's trained aspect-ratio bins."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pixart_core import resolution
from .search_aliases import search_aliases
from .types import CATEGORY, DiT, DiTHandle

FROM_DIT = "from dit"


class Resolution(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaResolution",
            display_name="PixArt-Σ Resolution",
            category=f"{CATEGORY}/sampling",
            description="Snaps a requested width x height to the nearest trained aspect-ratio bin of the model family "
                        "(as diffusers' use_resolution_binning); decode can resize back to the requested size.",
            **search_aliases("pixart sigma resolution", "aspect ratio", "image size", "resolution bins"),
            inputs=[
                io.Int.Input("width", default=1024, min=16, max=16384, tooltip="Requested image width in pixels."),
                io.Int.Input("height", default=1024, min=16, max=16384, tooltip="Requested image height in pixels."),
                io.Combo.Input("family", options=[FROM_DIT, *map(str, resolution.FAMILIES)], default=FROM_DIT,
                               tooltip="Which bins to use: the connected DiT's resolution family, or one chosen here."),
                DiT.Input("dit", optional=True, tooltip="The DiT whose family gives the bins (for 'from dit')."),
            ],
            outputs=[io.Int.Output("WIDTH", display_name="width", tooltip="Bin width: sample at this size."),
                     io.Int.Output("HEIGHT", display_name="height", tooltip="Bin height: sample at this size."),
                     io.Int.Output("TARGET_WIDTH", display_name="target_width", tooltip="The requested width, for decode."),
                     io.Int.Output("TARGET_HEIGHT", display_name="target_height", tooltip="The requested height, for decode.")],
        )

    @classmethod
    def execute(cls, width: int, height: int, family: str, dit: DiTHandle | None = None) -> io.NodeOutput:
        if family == FROM_DIT:
            if dit is None:
                raise ValueError("PixArt resolution: family is 'from dit' but no DiT is connected; connect one or pick a family.")
            fam = dit.variant.resolution
        else:
            fam = int(family)
        bin_w, bin_h = resolution.snap(width, height, fam)
        return io.NodeOutput(bin_w, bin_h, width, height)
