"""bench/gpu.py (P4) cannot run here (no GPU), so its --cpu-smoke mode runs it end to end on tiny models: both
systems' worker processes, the FLOP count, the table and the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.location import REPO, child_env


def test_gpu_bench_cpu_smoke(tmp_path):
    out = tmp_path / "p4.json"
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--configs", "bf16", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=child_env())
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    rows = {row["system"]: row for row in data["rows"]}
    assert set(rows) == {"ours", "diffusers"} and not any("error" in row for row in rows.values())
    for row in rows.values():
        assert row["image"] == [1, 64, 64, 3] and len(row["sampler_s"]) == 1 and row["sampler_s"][0] > 0
    # Ours computes on the prompt's real tokens, diffusers on 300 padded ones: fewer FLOPs per forward.
    assert 0 < rows["ours"]["flops_per_forward"] < rows["diffusers"]["flops_per_forward"]
    assert rows["ours"]["caption_tokens"] < 300 == rows["diffusers"]["caption_tokens"]
    assert "| bf16 | ours |" in r.stdout and "ours / diffusers" in r.stdout


def test_gpu_check_cpu_smoke(tmp_path):
    """bench/gpu_check.sh --cpu-smoke: every part of the GPU check on tiny models, on the CPU: the 8-bit
    reload keeps one int8 copy per layer, quantized embeddings stay close to bf16, whole images run, the SDPA
    kernels of self- and cross-attention are found, and P4 runs both systems."""
    out = tmp_path / "check.json"
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert not data["skipped"] and "error" not in data["reference"]
    assert data["memory"]["8-bit"]["reload"]["int8_copies_per_layer"] == [1]
    for q, floor in (("8-bit", 0.99), ("nf4", 0.97)):
        m = data["memory"][q]
        assert all(c > floor for c in m["cosine_vs_bf16"]), (q, m["cosine_vs_bf16"])
        assert [c["ok"] for c in m["caps"]] == [True] and m["caps"][0]["image"] == [1, 64, 64, 3]
    kernels = data["sdpa"]["kernels"]
    assert all(any("scaled_dot_product" in k for k in kernels[w]) for w in ("self_attention", "cross_attention"))
    assert set(data["p4"]["median_s_per_image"]) == {"bf16/ours", "bf16/diffusers"}
    assert "| (a) | 8-bit T5 peak VRAM" in r.stdout and "| (d) | cross_attention" in r.stdout
    # (f) the three hires stages ran, the 4K one in four tiles
    assert {k: v["tiles"] for k, v in data["hires"]["stages"].items()} == {"1024": 1, "2048": 1, "3840x2160 tiled": 4}
    assert "| (f) | DiT forward 3840x2160 tiled (4 tile(s))" in r.stdout
