"""The same workflow 20 times in one ComfyUI server: memory stays flat, every run succeeds."""
from __future__ import annotations

import psutil

from harness.graphs import graph
from conftest import queue_prompt


def test_twenty_runs_in_one_server_keep_memory_flat(comfy_server):
    proc = psutil.Process(comfy_server.pid)
    rss = []
    for i in range(20):
        prompt = graph(seed=9000 + i)  # a new seed each time (control_after_generate), so the graph really runs
        hist = queue_prompt(comfy_server.url, prompt)
        assert hist["status"]["status_str"] == "success", hist["status"]
        rss.append(proc.memory_info().rss)
    after_second = max(rss[:2])
    growth = max(rss[2:]) / after_second - 1
    print(f"RSS MiB per run: {[r >> 20 for r in rss]}; growth after run 2: {growth:.2%}")
    assert growth <= 0.02, f"RSS grew {growth:.1%} after the second run: {[r >> 20 for r in rss]} MiB"
