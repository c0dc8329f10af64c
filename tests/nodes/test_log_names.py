"""The pack's console lines are named `pixart_sigma` (or a child such as `pixart_sigma.t5`), not by the file-system
path ComfyUI imports the pack under (`/…/custom_nodes/pixart_sigma_nodes.pixart_core.t5`)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from conftest import REPO, Executor


def test_a_node_run_by_comfyui_logs_under_pixart_sigma(comfy, caplog):
    executor = Executor(client_id="log-names")  # its own output cache: the loader runs even if another test ran it
    prompt = {"1": {"class_type": "PixArtSigmaDiTLoader",
                    "inputs": {"dit_name": "tiny-PixArt-Sigma-XL-2-1024-MS.safetensors", "variant": "auto",
                               "dtype": "fp32"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}  # an output node: makes it run
    with caplog.at_level(logging.INFO):
        result = executor.run(prompt)
    assert result["ok"], result["error"]
    ours = [r for r in caplog.records if r.getMessage().startswith("PixArt DiT")]
    assert ours, [r.getMessage() for r in caplog.records]
    for record in ours:
        assert record.name == "pixart_sigma" or record.name.startswith("pixart_sigma."), record.name


def test_every_pack_module_logger_is_named_pixart_sigma(comfy):
    """Every `log` of a pack module ComfyUI imported (from custom_nodes/, under its file-system path)."""
    loggers = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if ("custom_nodes" in name and path and Path(path).resolve().is_relative_to(REPO)
                and isinstance(getattr(module, "log", None), logging.Logger)):
            loggers[name] = module.log.name
    assert len(loggers) >= 10, loggers  # pixart_core and nodes modules that log
    for module, logger in loggers.items():
        assert logger.split(".")[0] == "pixart_sigma", (module, logger)
