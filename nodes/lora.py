"""LoRA loader node: a LoRA file (PEFT/diffusers, kohya, original PixArt layout, LoHa, LoKr; optional T5 part)
applied through ComfyUI's weight patches on copies of the DiT (and T5) handles."""
from __future__ import annotations

import dataclasses
import logging

from comfy_api.v0_0_2 import io, ui

from ..pixart_core import files, t5_spec
from ..pixart_core import lora as core_lora
from .comfy import patches, paths
from .search_aliases import search_aliases
from .text import QUANTIZATION_NAMES
from .types import CATEGORY, T5, DiT, DiTHandle, T5Handle
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))
LORA_FOLDERS = ("loras",)


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaLoraLoader",
            display_name="PixArt-Σ LoRA Loader",
            category=f"{CATEGORY}/loaders",
            description="Applies a PixArt LoRA (PEFT/diffusers, kohya, original PixArt layout, LoHa, LoKr) to the DiT, "
                        "and its T5 part to the T5, through ComfyUI's weight patches. Chain loaders to stack LoRAs.",
            **search_aliases("pixart sigma lora loader", "lora", "lycoris", "loha", "lokr"),
            inputs=[
                DiT.Input("dit", tooltip="The transformer from PixArt-Σ DiT Loader (or another LoRA loader)."),
                io.Combo.Input("lora_name", options=paths.files(*LORA_FOLDERS),
                               tooltip="A LoRA trained on PixArt-Σ/α, in models/loras."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to change the DiT (0: not at all). May be negative."),
                T5.Input("t5", optional=True,
                         tooltip="Optional: the T5 from PixArt-Σ T5 Loader, for LoRAs with a text-encoder part "
                                 "(quantization 'none' only)."),
                io.Float.Input("t5_strength", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="How strongly to change the T5, when one is connected and the LoRA has T5 keys."),
            ],
            outputs=[DiT.Output(display_name="dit", tooltip="The DiT with the LoRA (a patched copy; the input DiT "
                                                            "is unchanged)."),
                     T5.Output(display_name="t5", tooltip="The T5 with the LoRA's T5 part (only when a T5 is connected).")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, lora_name: str, strength: float, t5: T5Handle | None = None,
                t5_strength: float = 1.0) -> io.NodeOutput:
        path = paths.resolve(lora_name, LORA_FOLDERS)
        sd = files.read_state_dict(path)
        t5_shapes = patches.param_shapes(t5.patcher) if t5 is not None else None
        plan = core_lora.prepare(sd, patches.param_shapes(dit.patcher), t5_shapes, core_lora.read_metadata(path),
                                 lora_name)
        lines = [f"{lora_name}: {' + '.join(plan.formats)}"]
        new_dit = dit
        if strength != 0 and plan.dit_map:
            patcher, n, unread = patches.with_weight_patches(dit.patcher, plan.dit, plan.dit_map, strength)
            new_dit = dataclasses.replace(dit, patcher=patcher)
            plan.unplaced.extend(f"{m}: no weight adapter reads these tensors" for m in unread)
        else:
            n = 0
        lines.append(f"DiT: {n} weights patched (strength {strength:g})")
        new_t5, t5_line = cls._t5(t5, plan, path, t5_strength)
        lines.append(t5_line)
        if plan.unplaced:
            log.warning("PixArt LoRA %s: %d keys NOT applied (they match no PixArt layer):\n  %s", lora_name,
                        len(plan.unplaced), "\n  ".join(plan.unplaced))
            lines.append(f"{len(plan.unplaced)} keys not applied (listed in the log), e.g. {plan.unplaced[0]}")
        text = "; ".join(lines)
        log.info("PixArt LoRA %s", text)
        return io.NodeOutput(new_dit, new_t5, ui=ui.PreviewText(text))

    @staticmethod
    def _t5(t5: T5Handle | None, plan: core_lora.Plan, path, strength: float) -> tuple[T5Handle | None, str]:
        """The T5 handle with the LoRA's T5 part, and what happened, in words."""
        if not plan.t5_keys:
            return t5, "T5: no T5 keys in this LoRA"
        if t5 is None:
            log.warning("PixArt LoRA %s: its %d T5 (text encoder) keys were NOT applied: no T5 is connected to the "
                        "LoRA loader. Connect the T5 loader to its t5 input and use its t5 output.", path.name,
                        len(plan.t5_keys))
            return None, f"T5: {len(plan.t5_keys)} keys not applied (no T5 connected)"
        if t5.quantization != t5_spec.QUANT_NONE:
            log.warning("PixArt LoRA %s: its %d T5 (text encoder) keys were NOT applied: the T5 is quantized (%s), and "
                        "a LoRA cannot be merged into bitsandbytes weights. Load the T5 with quantization 'none' to "
                        "use the LoRA's T5 part (the DiT part is applied).", path.name, len(plan.t5_keys),
                        QUANTIZATION_NAMES[t5.quantization])
            return t5, f"T5: {len(plan.t5_keys)} keys NOT applied (T5 is quantized: use quantization 'none')"
        if strength == 0 or not plan.t5_map:
            return t5, f"T5: 0 weights patched (t5_strength {strength:g})"
        patcher, n, unread = patches.with_weight_patches(t5.patcher, plan.t5, plan.t5_map, strength)
        plan.unplaced.extend(f"{m}: no weight adapter reads these tensors" for m in unread)
        stat = path.stat()
        # the embedding cache is keyed by identity: a LoRA'd T5 must not reuse the base T5's embeddings
        identity = (*t5.identity, ("lora", str(path.resolve()), stat.st_mtime_ns, stat.st_size, strength))
        return dataclasses.replace(t5, patcher=patcher, identity=identity), f"T5: {n} weights patched (strength {strength:g})"
