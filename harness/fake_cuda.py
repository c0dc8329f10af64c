"""A fake CUDA GPU on the CPU, for tests of what the pack does with a GPU's memory.

Inside `FakeCuda(total)` (a torch function mode), tensors moved to "cuda:0" are copies in host memory that the mode
counts as allocated on the fake GPU: they report `device == cuda:0`, a move back to the CPU copies them again (as a
real transfer does; the fake GPU's copy lives on while anything references it), and the operations on them give
fake-GPU results; an operation that mixes fake-GPU tensors with CPU tensors (other than 0-dim ones, which CUDA
kernels take as scalars) raises CUDA's "Expected all tensors to be on the same device" error, as on a real GPU. The
GPU's memory in use is the bytes of its live storages (each freed when torch frees it), and an
allocation that would pass `total` raises torch.OutOfMemoryError with CUDA's message. So a reference that keeps a
"GPU" tensor alive after a move keeps its bytes counted, as on a real GPU.

`comfy_sees(fake)` makes ComfyUI's model management see the same GPU: its free-memory query answers from the fake
GPU's bytes in use, and its VRAM mode is NORMAL_VRAM (ComfyUI itself runs with --cpu).

Operations run on the CPU's kernels (bitsandbytes and torch pick kernels by where the data really is); only what
device a tensor reports, where it is counted and the moves are simulated.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
# what a tensor on the fake GPU answers (the descriptors' __get__ compare equal, not identical, on each access)
_DEVICE_QUERIES = {torch.Tensor.device.__get__: CUDA, torch.Tensor.is_cuda.__get__: True,
                   torch.Tensor.is_cpu.__get__: False}
# operations that take their operands from either device on a real GPU (a copy across devices, indexing a GPU tensor
# with CPU indices or writing CPU values into it)
_CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.set_}


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


class FakeCuda(TorchFunctionMode):
    """A `total`-byte fake CUDA GPU (see the module docstring); `used` / `free` / `peak` in bytes."""

    def __init__(self, total: int):
        super().__init__()
        self.total, self.peak = int(total), 0
        self._live: dict[int, int] = {}  # id of a live storage object -> its bytes

    @property
    def used(self) -> int:
        return sum(self._live.values())

    @property
    def free(self) -> int:
        return self.total - self.used

    def holds(self, t: torch.Tensor) -> bool:
        """Whether the tensor's data is on the fake GPU."""
        return id(t.untyped_storage()) in self._live

    def bytes_of(self, tensors) -> int:
        """Bytes of fake-GPU storage these tensors reach, each storage once."""
        seen = {id(t.untyped_storage()) for t in tensors} & set(self._live)
        return sum(self._live[k] for k in seen)

    def _oom(self, nbytes: int) -> torch.OutOfMemoryError:
        mib = 1 << 20
        return torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {nbytes / mib:.2f} MiB. GPU 0 has a total capacity of "
            f"{self.total / mib:.2f} MiB of which {max(self.free, 0) / mib:.2f} MiB is free. (fake GPU)")

    def _adopt(self, t: torch.Tensor) -> torch.Tensor:
        """Count a new CPU tensor as allocated on the fake GPU (OOM if it does not fit)."""
        s = t.untyped_storage()
        if id(s) in self._live:
            return t
        n = s.nbytes()
        if n > self.free:
            raise self._oom(n)
        self._live[id(s)] = n
        weakref.finalize(s, self._live.pop, id(s), None)
        self.peak = max(self.peak, self.used)
        return t

    def _check_one_device(self, func, tensors: list[torch.Tensor]) -> None:
        """Raise as CUDA does when an operation gets GPU tensors and CPU tensors that are not 0-dim scalars."""
        gpu = [t for t in tensors if self.holds(t)]
        cpu = [t for t in tensors if not self.holds(t) and t.device.type == "cpu" and t.dim() > 0]
        if gpu and cpu:
            name = getattr(func, "__name__", repr(func))
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (in {name} on the fake GPU: a CPU tensor of shape "
                               f"{tuple(cpu[0].shape)})")

    def _move(self, func, args, kwargs):
        src, rest = args[0], args[1:]
        if func is torch.Tensor.cuda:
            device, dtype, non_blocking = CUDA, None, bool(kwargs.get("non_blocking", False))
        elif func is torch.Tensor.cpu:
            device, dtype, non_blocking = torch.device("cpu"), None, False
        else:
            kw = {k: v for k, v in kwargs.items() if k != "copy"}
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kw)
        here = self.holds(src)
        there = _is_cuda(device) if device is not None else here
        dtype = dtype or src.dtype
        if here == there and not kwargs.get("copy", False):
            out = torch.Tensor.to(src, dtype=dtype, non_blocking=non_blocking)
            return self._adopt(out) if there and out.untyped_storage() is not src.untyped_storage() else out
        if there:
            need = src.numel() * dtype.itemsize
            if need > self.free:
                raise self._oom(need)
        out = torch.Tensor.to(src, device="cpu" if device is None or there else device, dtype=dtype, copy=True)
        return self._adopt(out) if there else out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DEVICE_QUERIES:
            return _DEVICE_QUERIES[func] if self.holds(args[0]) else func(*args)
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if _is_cuda(kwargs.get("device")):  # a factory function allocating on the GPU
            out = func(*args, **{**kwargs, "device": "cpu"})
            return self._adopt(out) if isinstance(out, torch.Tensor) else out
        out = func(*args, **kwargs)
        outs = list(_tensors(out if isinstance(out, (list, tuple)) else (out,)))
        if outs and func not in _CROSS_DEVICE:  # a computation (not a query such as nn.Module's shallow-copy check)
            self._check_one_device(func, [*_tensors(args), *_tensors(kwargs.values())])
        if any(self.holds(a) for a in _tensors(args)):  # an operation on GPU tensors gives GPU tensors
            for t in outs:
                self._adopt(t)
        return out


@contextlib.contextmanager
def comfy_sees(fake: FakeCuda, state: str = "NORMAL_VRAM") -> Iterator[FakeCuda]:
    """ComfyUI's model management, in VRAM mode `state`, with the fake GPU as cuda:0: its free-memory query answers
    from the fake GPU's bytes in use. Models ComfyUI still lists on cuda:0 afterwards are dropped from its list."""
    import comfy.model_management as mm

    real_free, real_state = mm.get_free_memory, mm.vram_state

    def free(dev=None, torch_free_too=False):
        if dev is None or torch.device(dev).type != "cuda":
            return real_free(dev, torch_free_too)
        return (fake.free, 0) if torch_free_too else fake.free

    mm.get_free_memory, mm.vram_state = free, mm.VRAMState[state]
    try:
        with fake:
            yield fake
    finally:
        mm.get_free_memory, mm.vram_state = real_free, real_state
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.device != CUDA]
