"""PixArt-Σ nodes for ComfyUI.

ComfyUI calls `comfy_entrypoint`; the ComfyUI-facing modules are imported only then, so importing this
package (or its `pixart_core`) outside ComfyUI never fails. ComfyUI serves WEB_DIRECTORY under /extensions/<pack>/;
it holds no JavaScript, only the node help pages the frontend reads (web/docs/<node id>.md).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PixArtExtension

    return PixArtExtension()
