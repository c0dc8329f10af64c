"""A VAE job under out-of-memory errors (nodes/vae_jobs.run_tiled, shared by VAE Decode, VAE Encode and Hires
Upscale): the whole job first, then in tiles after an out-of-memory error unless tiling is 'never', with messages
that say what to do. The jobs here raise torch's own OutOfMemoryError (what a CUDA allocation raises) at once;
tests/nodes/test_gpu_readiness.py and test_reliability.py cause real ones under a capped address space."""
from __future__ import annotations

import logging

import pytest
import torch

from harness.comfyui import pack

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _job(fail_when: set[bool], calls: list):
    def job(tiled: bool):
        calls.append(tiled)
        if tiled in fail_when:
            raise torch.OutOfMemoryError(OOM)
        return "tiles" if tiled else "whole"
    return job


def test_a_job_that_fits_runs_once(comfy):
    run_tiled, calls = pack("nodes.vae_jobs").run_tiled, []
    assert run_tiled(_job(set(), calls), False, "auto", "decode", "1024x1024") == "whole"
    assert run_tiled(_job(set(), calls), True, "always", "decode", "1024x1024") == "tiles"
    assert calls == [False, True]


@pytest.mark.parametrize("tiling", ["auto", "always"])
def test_out_of_memory_retries_in_tiles_with_a_warning(comfy, caplog, tiling):
    run_tiled, calls = pack("nodes.vae_jobs").run_tiled, []
    caplog.set_level(logging.WARNING)
    assert run_tiled(_job({False}, calls), False, tiling, "encode", "1280x1280") == "tiles"
    assert calls == [False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "PixArt VAE encode ran out of memory at 1280x1280; retrying in tiles."]


def test_out_of_memory_messages_say_what_to_do(comfy):
    run_tiled = pack("nodes.vae_jobs").run_tiled
    calls = []
    with pytest.raises(torch.OutOfMemoryError) as e:
        run_tiled(_job({False}, calls), False, "never", "decode", "2048x2048")
    assert str(e.value) == ("PixArt VAE decode ran out of memory at 2048x2048. Set tiling to 'auto' (decodes in "
                            "tiles when memory runs short) or 'always'.")
    assert str(e.value.__cause__) == OOM and calls == [False]
    with pytest.raises(torch.OutOfMemoryError) as e:
        run_tiled(_job({True}, calls), True, "always", "encode", "4096x4096")
    assert str(e.value) == ("PixArt VAE encode ran out of memory at 4096x4096 even in tiles. Free memory (close "
                            "other programs, or unload models from ComfyUI's menu) or encode a smaller image.")
    assert calls == [False, True]


def test_an_out_of_memory_error_that_cannot_take_a_message_becomes_a_runtime_error(comfy):
    class DeviceError(Exception):  # a library's error with its own constructor
        def __init__(self, code: int, text: str):
            super().__init__(f"{text} (code {code})")

    def job(tiled):
        raise DeviceError(2, "out of memory")

    with pytest.raises(RuntimeError) as e:
        pack("nodes.vae_jobs").run_tiled(job, True, "auto", "decode", "1024x1024")
    assert type(e.value) is RuntimeError
    assert str(e.value).startswith("PixArt VAE decode ran out of memory at 1024x1024 even in tiles.")


def test_other_errors_pass_through_without_a_retry(comfy):
    calls, error = [], ValueError("NaN in the latent")

    def job(tiled):
        calls.append(tiled)
        raise error

    with pytest.raises(ValueError) as e:
        pack("nodes.vae_jobs").run_tiled(job, False, "auto", "decode", "1024x1024")
    assert e.value is error and calls == [False]


def test_what_counts_as_out_of_memory(comfy):
    """nodes/comfy/loading.is_oom, which decides the retry in tiles (and the advice of the loaders): torch's
    OutOfMemoryError whatever its words, the CPU allocator's own failure (a real one: torch asked for 2**62 bytes),
    a backend's error that says "out of memory"; nothing else."""
    is_oom = pack("nodes.comfy.loading").is_oom
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**62, dtype=torch.uint8)
    assert type(cpu.value) is RuntimeError and "can't allocate memory" in str(cpu.value)  # torch's CPU allocator
    assert is_oom(cpu.value)
    assert is_oom(torch.OutOfMemoryError("Tried to allocate 2.00 GiB"))  # the type alone
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"))
    assert not is_oom(RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu"))
    assert not is_oom(MemoryError())  # Python's own, which no allocation on a device raises
