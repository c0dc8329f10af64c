"""PixArt-Σ nodes for ComfyUI.

ComfyUI calls `comfy_entrypoint`; the ComfyUI-facing modules are imported only then, so importing this
package (or its `pixart_core`) outside ComfyUI never fails.
"""


async def comfy_entrypoint():
    from .nodes import PixArtExtension

    return PixArtExtension()
