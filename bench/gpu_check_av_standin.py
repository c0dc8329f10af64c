"""A stand-in for PyAV (`av`) on the lent GPU machine, which has no PyAV and cannot install it (no network; the
wheel is 40 MB of FFmpeg). Installed as `av` by bench/gpu_carry.py only where `import av` finds nothing.

Why: ComfyUI 0.3.75 imports av when its API package loads (comfy_api/latest/_input_impl/video_types.py:
`from av.container import InputContainer`, `from av.subtitles.stream import SubtitleStream`, `import av`), and
this pack's nodes import that API package; a few comfy_extras node files (video, audio, LTXV) import it too.
bench/gpu_check never reads or writes a video or audio file, so every name exists (a class of that name, made on
first use) and anything that would touch a media file raises RuntimeError saying so. It is never on the path of
the test suite or of a user's ComfyUI.
"""
from __future__ import annotations

import sys
import types

STANDIN = True  # lets a caller tell this module from PyAV
MESSAGE = ("PyAV is not installed: this `av` is bench/gpu_check's stand-in (bench/gpu_check_av_standin.py), "
           "which reads and writes no video or audio. Install PyAV (`pip install av`) to use ComfyUI's video nodes.")


class _Unavailable:
    """Any PyAV class: exists for imports, isinstance checks and annotations; cannot be made."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(MESSAGE)


def open(*args, **kwargs):  # noqa: A001 - PyAV's name
    raise RuntimeError(MESSAGE)


time_base = 1_000_000  # PyAV's av.time_base (microseconds)


def _module(name: str) -> types.ModuleType:
    classes: dict[str, type] = {}

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in classes:
            classes[attr] = type(attr, (_Unavailable,), {"__module__": name})
        return classes[attr]

    module = types.ModuleType(name, f"stand-in for PyAV's {name} (see av.MESSAGE)")
    module.__getattr__ = __getattr__
    module.__path__ = []  # a package: `import av.x.y` finds the submodules registered below
    return module


def __getattr__(attr: str):
    return getattr(_ROOT_NAMES, attr)


_ROOT_NAMES = _module(__name__)
for _sub in ("container", "stream", "subtitles", "subtitles.stream", "audio", "audio.frame", "audio.stream", "video",
             "video.frame", "video.stream", "codec", "error", "logging", "packet", "frame", "filter"):
    _name = f"{__name__}.{_sub}"
    sys.modules[_name] = _module(_name)
    _parent, _, _leaf = _name.rpartition(".")
    setattr(sys.modules[_parent], _leaf, sys.modules[_name])  # `from av import container`, `av.subtitles.stream`
