"""The mutation run's pytest plugin: `-p harness.mutation` in pyproject.toml's [tool.mutmut] (scripts/mutation).

mutmut 3.8 runs every pytest session of a run in one process tree: its stats and clean runs in its own process,
then each mutant in a child forked from it. Three things make the tests that start ComfyUI (tests/nodes) count there:

- Names. mutmut names a mutant after its file (`nodes.text.x_f__mutmut_3`) and switches it on in the function whose
  module has that name. ComfyUI imports this pack under its folder's path (`/base/custom_nodes/pixart_sigma_nodes`,
  then `.nodes.text`, `.pixart_core.sampling`, ...), a second copy of the pixart_core the core tests import. The
  trampolines mutmut put in the pack's modules are given the file's module name here, so a mutant is switched on in
  both copies, and a test that reaches a function through ComfyUI is recorded as covering it.
- One ComfyUI. ComfyUI is initialised once per process: the first session that needs it starts it, the forked
  children inherit it started, and a later session moves ComfyUI's folders (models/, output/, ...) to its own base
  directory (harness.comfyui.init_comfy), so two children side by side never share one. The tiny models are written
  once ($PIXART_TEST_MODELS, tests/conftest.py's comfy_base) and copied into each session's base directory.
- A fresh session. What an earlier session of the process left behind is cleared when a session starts: the pack's
  caches (the embedding cache, functools caches: filled by the parent without the mutant, they would hand a child
  the unmutated result), the models ComfyUI holds and its lists of model files; the same before each test, which
  mutmut runs in its own order (the fastest first), not the order of a whole run. Each session gets its own
  --basetemp, removed at its end (a forked child leaves by os._exit, so pytest's own clean-up of its numbered
  temporary folders never runs there).
"""
from __future__ import annotations

import atexit
import gc
import itertools
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from . import location, mutation_lines

# A module of the pack as ComfyUI names it: the pack folder's path with `.` replaced (ComfyUI's load_custom_node),
# then the module inside the pack.
_PACK_MODULE = re.compile(rf"^(?:.*/)?{re.escape(location.PACK)}\.(?=(?:pixart_core|nodes)(?:\.|$))")
_ROOT = Path(tempfile.mkdtemp(prefix="pixart-mutation-"))  # made by mutmut's own process, before any fork
_SESSIONS = itertools.count()
_OWN_BASETEMP = pytest.StashKey[str]()
_RECORDER = pytest.StashKey[mutation_lines.Recorder]()
_CONFIGS: list = []  # the session's config, for the hooks that get none
_pack_checked = False
atexit.register(shutil.rmtree, _ROOT, True)  # in mutmut's process only: a forked child ends with os._exit
os.environ.setdefault("PIXART_TEST_MODELS", str(_ROOT / "models"))  # tests/conftest.py: written once, then copied


def file_module(name: str) -> str:
    """The module name mutmut gives a pack file (`nodes.text`), from the name ComfyUI imported it under (or a
    qualified name inside it); any other name unchanged."""
    return _PACK_MODULE.sub("", name, count=1)


def _use_file_module_names() -> None:
    """mutmut's trampolines compare and record the file's module name for the pack's modules."""
    from mutmut.mutation import trampoline

    if getattr(trampoline.wrap_in_trampoline, "file_module_names", False):
        return
    wrap, record = trampoline.wrap_in_trampoline, trampoline.record_trampoline_hit

    def wrap_in_trampoline(mutants_dict, is_classmethod=False):
        decorate = wrap(mutants_dict, is_classmethod)

        def mutated(func):
            imported_as = func.__module__
            func.__module__ = file_module(imported_as)  # what the trampoline compares with the mutant's name
            wrapper = decorate(func)
            wrapper.__module__ = imported_as
            return wrapper

        return mutated

    def record_trampoline_hit(name: str, caller: str | None = None) -> None:
        record(file_module(name), caller=None if caller is None else file_module(caller))

    wrap_in_trampoline.file_module_names = True
    trampoline.wrap_in_trampoline = wrap_in_trampoline
    trampoline.record_trampoline_hit = record_trampoline_hit


def _pack_modules():
    for name, module in list(sys.modules.items()):
        if module is not None and (name.split(".")[0] == "pixart_core" or _PACK_MODULE.match(name)):
            yield module


def _fresh_state() -> None:
    """Clear what earlier tests of this process computed: the pack's module-level caches (both copies), the
    models ComfyUI's model management holds and its lists of model files."""
    for module in _pack_modules():
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)):  # functools.cache / lru_cache
                value.cache_clear()
            elif type(value).__name__ == "LRUCache" and type(value).__module__.endswith("pixart_core.cache"):
                value.clear()
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is not None:  # its file lists name folders an earlier session's tests made (and removed)
        folder_paths.filename_list_cache.clear()


_use_file_module_names()
_MATH_SDP_REDUCTION = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()  # before ComfyUI


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads --basetemp
def pytest_configure(config) -> None:
    _CONFIGS[:] = [config]
    if config.option.basetemp is None:
        config.option.basetemp = str(_ROOT / f"session-{os.getpid()}-{next(_SESSIONS)}")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_sessionstart(session) -> None:
    _fresh_state()
    gc.collect()
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":  # mutmut's run that finds which tests call what
        session.config.stash[_RECORDER] = mutation_lines.Recorder(Path.cwd().resolve())


def pytest_collection_modifyitems(config, items) -> None:
    """In a mutant's child: only the tests that executed a statement the mutant changes (harness/mutation_lines.py);
    none left is mutmut's "no tests"."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    found = mutation_lines.tests_for(mutant, Path.cwd().resolve()) if "__mutmut_" in mutant else None
    if found is None:
        return
    executed, known = found
    keep = [i for i in items if i.nodeid in executed or i.nodeid not in known]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _torch_flags(item) -> None:
    """torch's global switches as the test's own tier sets them: importing ComfyUI lets SDPA's math kernel reduce in
    fp16/bf16 (comfy.model_management, torch >= 2.5), which a core test run after a node test must not inherit (it
    changes what tests/core/test_dit_memory.py measures)."""
    mm = sys.modules.get("comfy.model_management")
    comfy = mm is not None and "tests/nodes/" in item.nodeid and getattr(mm, "torch_version_numeric", (0,)) >= (2, 5)
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True if comfy else _MATH_SDP_REDUCTION)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Each test starts from the state a fresh process gives it: mutmut runs a mutant's tests in its own order (the
    fastest first), so a test must not find what the test before it left (a T5 still loaded, a cached embedding,
    ComfyUI's torch switches)."""
    recorder = item.config.stash.get(_RECORDER, None)
    if recorder is not None:
        recorder.test(item.nodeid)
    _fresh_state()
    _torch_flags(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item) -> None:
    """ComfyUI's executor forgets the outputs of the tests before (the session's executor fixture keeps them)."""
    for value in item.funcargs.values():
        if type(value).__name__ == "Executor" and type(value).__module__ == "harness.comfyui":
            value.executor.reset()


def pytest_runtest_logfinish(nodeid, location) -> None:
    for config in _CONFIGS:
        recorder = config.stash.get(_RECORDER, None)
        if recorder is not None:
            recorder.between()


def pytest_sessionfinish(session) -> None:
    recorder = session.config.stash.get(_RECORDER, None)
    if recorder is not None:
        recorder.save()
        del session.config.stash[_RECORDER]


def pytest_runtest_teardown(item) -> None:
    """Once ComfyUI has loaded the pack: it must be the mutated copy this run tests (mutmut runs in mutants/), or
    the node tests would test the unmutated code."""
    global _pack_checked
    pack = _loaded_pack()
    if _pack_checked or pack is None:
        return
    where = Path(pack.__file__).resolve().parent
    if where != Path.cwd().resolve() or where.name != "mutants":
        pytest.exit(f"ComfyUI loaded the pack from {where}, not from the mutated copy {Path.cwd().resolve()}", 3)
    _pack_checked = True


def pytest_unconfigure(config) -> None:
    """The session's --basetemp goes, unless ComfyUI loaded the pack from a base directory in it (its custom_nodes/
    link stays until mutmut's process ends)."""
    own = config.stash.get(_OWN_BASETEMP, None)
    pack = _loaded_pack()
    if own is not None and (pack is None or Path(own) not in Path(pack.__file__).parents):
        shutil.rmtree(own, ignore_errors=True)


def _loaded_pack():
    return next((m for n, m in list(sys.modules.items()) if n.endswith("/" + location.PACK)), None)
