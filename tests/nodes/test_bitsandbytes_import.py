"""bitsandbytes is imported only when a quantized T5 is asked for (importing it logs a kernels warning on CPU
machines): not when ComfyUI starts with the pack, nor for an unquantized T5 load and encode (a single file and a
diffusers folder); an 8-bit load imports it. Run in a fresh ComfyUI process, whose sys.modules says what was
imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
from pathlib import Path

from harness.comfyui import Executor, init_comfy

def encode(t5_name, quantization):
    return {"1": {"class_type": "PixArtSigmaT5Loader",
                  "inputs": {"t5_name": t5_name, "quantization": quantization, "dtype": "auto"}},
            "2": {"class_type": "PixArtSigmaTextEncode",
                  "inputs": {"t5": ["1", 0], "positive": "a red fox in the snow", "negative": "", "max_tokens": 0}},
            "3": {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 0]}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}

seen = {"before": "bitsandbytes" in sys.modules}
init_comfy(Path(sys.argv[1]), quiet=True)
seen["start"] = "bitsandbytes" in sys.modules
ex = Executor()
for name, t5, quantization in (("file", "tiny_t5xxl_fp16.safetensors", "none"),
                               ("folder", "tiny-PixArt-Sigma-XL-2-1024-MS", "none"),
                               ("8-bit", "tiny_t5xxl_fp16.safetensors", "8-bit (bitsandbytes)")):
    result = ex.run(encode(t5, quantization))
    assert result["ok"], (name, result["error"])
    seen[name] = "bitsandbytes" in sys.modules
print("RESULT " + json.dumps(seen))
"""


def test_bitsandbytes_is_imported_only_for_a_quantized_t5(comfy_base):
    from harness.location import child_env

    r = subprocess.run([sys.executable, "-c", SCRIPT, str(comfy_base)], env=child_env(Path(__file__).parent),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    seen = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert seen == {"before": False, "start": False, "file": False, "folder": False, "8-bit": True}, seen
