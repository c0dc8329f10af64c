"""bench/gpu.py (P4) cannot run here (no GPU), so its --cpu-smoke mode runs it end to end on tiny models: both
systems' worker processes, the FLOP count, the table and the JSON."""
from __future__ import annotations

import json
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
