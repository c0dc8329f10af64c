"""Measurement inside a bench worker (time and memory per label, ComfyUI prompts timed per node) and around it
(worker processes, waiting for a quiet machine, repeating disturbed runs)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from harness.location import REPO, child_env


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM: of this exec's address space only, unlike ru_maxrss,
    which can carry the parent's size across fork+exec)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryPeak:
    """While the block runs, a thread samples this process's VmRSS (page cache of mapped files included) and
    RssAnon (memory the process itself allocated) every `interval` seconds: `base` holds them at entry, `peak` the
    highest seen, in bytes."""

    FIELDS = ("VmRSS", "RssAnon")

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.base: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def _sample(self) -> None:
        for k in self.FIELDS:
            self.peak[k] = max(self.peak[k], _status_kib(k) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "MemoryPeak":
        import threading

        self.base = {k: _status_kib(k) * 1024 for k in self.FIELDS}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def kernel_usage(before: resource.struct_rusage, after: resource.struct_rusage) -> tuple[float, int]:
    """Kernel CPU seconds and minor page faults (first touches of new pages) between two getrusage(RUSAGE_SELF)."""
    return after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


class Timers:
    """Sum of wall time per label, by wrapping methods of classes (e.g. every DiT forward)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.sys_seconds: dict[str, float] = {}  # kernel CPU time: mostly page faults of new memory
        self.minor_faults: dict[str, int] = {}  # first touches of new pages (a cold VAE decode: 0 to ~430k)
        self.memory: list[tuple[str, int, int]] = []  # (after what, RSS, peak RSS so far)

    def mark(self, label: str) -> None:
        self.memory.append((label, rss_bytes(), peak_rss_bytes()))

    def wrap(self, owner, name: str, label: str) -> None:
        import functools

        fn = getattr(owner, name)
        timers = self

        @functools.wraps(fn)
        def timed(*a, **k):
            t, c, r = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            try:
                return fn(*a, **k)
            finally:
                timers.add(label, time.perf_counter() - t, time.process_time() - c)
                sys_s, faults = kernel_usage(r, resource.getrusage(resource.RUSAGE_SELF))
                timers.sys_seconds[label] = timers.sys_seconds.get(label, 0.0) + sys_s
                timers.minor_faults[label] = timers.minor_faults.get(label, 0) + faults

        setattr(owner, name, timed)

    def add(self, label: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + cpu_seconds
        self.calls[label] = self.calls.get(label, 0) + 1


def run_prompt(prompt: dict, node_timers: Timers) -> dict:
    """Validate and execute an API-format prompt with ComfyUI's PromptExecutor (ComfyUI initialised with
    harness.comfyui.init_comfy); time every node. Returns the outputs by node."""
    from harness.comfyui import Executor

    def on_node(node_id, class_type, seconds, cpu_seconds):
        label = f"node {node_id} {class_type}"
        node_timers.add(label, seconds, cpu_seconds)
        node_timers.mark(label)

    result = Executor(on_node=on_node, client_id="bench").run(prompt)
    if not result["ok"]:
        raise RuntimeError(f"prompt {'failed' if result['valid'] else 'invalid'}: {result['error']} "
                           f"{result['node_errors'] or ''}")
    return result["outputs"]


def emit(result: dict) -> None:
    """The worker's result: one JSON line on stdout, found by run_worker."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- orchestration


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_busy_seconds() -> float:
    """CPU-seconds all processes on this machine (every container sharing the kernel) spent busy, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def warm_files(paths) -> float:
    """Read files (or every file under folders) once so a run finds them in the page cache, as stated for every
    measurement; other people's jobs can evict them between runs. Returns the seconds it took (not measured time)."""
    t = time.perf_counter()
    for p in paths:
        p = Path(p)
        for f in ([x for x in p.rglob("*") if x.is_file()] if p.is_dir() else [p]):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(_WARM_BUF):
                    pass
    return time.perf_counter() - t


_WARM_BUF = bytearray(16 << 20)


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# Other people's jobs on the same cores disturb wall times. Before each measured run we wait (up to QUIET_WAIT s)
# until others use at most MAX_OTHERS of the CPUs, and a run during which they used more is repeated (up to RETRIES
# times; the last try is kept and flagged by its others_cpu_share). Set BENCH_MAX_OTHERS=1 to measure regardless.
MAX_OTHERS = float(os.environ.get("BENCH_MAX_OTHERS", "0.10"))
QUIET_WAIT = float(os.environ.get("BENCH_QUIET_WAIT", "120"))
RETRIES = int(os.environ.get("BENCH_RETRIES", "2"))
# A 2-thread P1 worker keeps ~1.7-1.95 cores busy during its measured part on a quiet machine; far less means it
# was held up by something /proc/stat does not show (another VM on the host, disk reads). Checked for P1 only.
MIN_PARALLEL = float(os.environ.get("BENCH_MIN_PARALLEL", str(0.7 * (os.cpu_count() or 1))))


def others_share(window: float = 2.0) -> float:
    """Share of the machine's CPUs that other processes keep busy, over `window` seconds (we sleep meanwhile)."""
    b, c = machine_busy_seconds(), time.process_time() + children_cpu_seconds()
    time.sleep(window)
    own = time.process_time() + children_cpu_seconds() - c
    return max(0.0, (machine_busy_seconds() - b - own) / (window * (os.cpu_count() or 1)))


def wait_for_quiet() -> dict:
    """Wait until others use at most MAX_OTHERS of the CPUs, at most QUIET_WAIT seconds; returns what was seen."""
    t0 = time.perf_counter()
    share = others_share(1.0)
    while share > MAX_OTHERS and time.perf_counter() - t0 < QUIET_WAIT:
        share = others_share(5.0)
    waited = time.perf_counter() - t0
    if share > MAX_OTHERS:
        log(f"machine still busy (others use {share:.0%} of the CPUs) after {waited:.0f} s; measuring anyway")
    return {"waited_s": waited, "others_share_before": share}


def measure(fn: Callable[[], Any]) -> dict:
    """Time fn() in this process after waiting for quiet; repeat when others used more than MAX_OTHERS meanwhile.
    Returns {"s": wall seconds, "others_cpu_share": ..., "attempts": n, "value": fn's result}."""
    for attempt in range(RETRIES + 1):
        gate = wait_for_quiet()
        b, c, t = machine_busy_seconds(), time.process_time(), time.perf_counter()
        value = fn()
        wall = time.perf_counter() - t
        share = max(0.0, (machine_busy_seconds() - b - (time.process_time() - c)) / (wall * (os.cpu_count() or 1)))
        if share <= MAX_OTHERS or attempt == RETRIES:
            return {"s": wall, "others_cpu_share": share, "attempts": attempt + 1, **gate, "value": value}
        log(f"disturbed (others used {share:.0%} of the CPUs): measuring again")


def run_quiet(module: str, args: list[str], log_file: Path, timeout: float = 900, warm=()) -> dict:
    """run_worker after reading `warm` into the page cache and waiting for quiet; rerun when the run was disturbed:
    others used more than MAX_OTHERS of the CPUs, or the worker kept its cores busy less than MIN_PARALLEL of the
    time (someone outside this machine's view, e.g. another VM on the host, or disk reads, held it up)."""
    for attempt in range(RETRIES + 1):
        warm_s = warm_files(warm)
        gate = wait_for_quiet()
        out = run_worker(module, args, log_file, timeout)
        out.update(gate, attempts=attempt + 1, warm_s=warm_s)
        # workers that time their measured part report total_s / total_cpu_s (P1); the others are not checked
        out["cpu_per_wall"] = out["total_cpu_s"] / out["total_s"] if "total_cpu_s" in out else None
        held_up = out["cpu_per_wall"] is not None and out["cpu_per_wall"] < MIN_PARALLEL
        if (out["others_cpu_share"] <= MAX_OTHERS and not held_up) or attempt == RETRIES:
            return out
        log(f"{' '.join(args)}: disturbed (others used {out['others_cpu_share']:.0%} of the CPUs; the worker's CPU time / "
            f"wall time {out['cpu_per_wall'] or 0:.2f}): running again")


def worker_result(module: str, args: list[str], timeout: float) -> tuple[dict | None, str, float]:
    """Run `python -m module args` (the tooling's import path); (the dict it emitted or None when it failed,
    its stderr, seconds)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                       env=child_env())
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("RESULT ")), None)
    out = None if r.returncode or line is None else json.loads(line[len("RESULT "):])
    return out, r.stderr, time.perf_counter() - t


def run_worker(module: str, args: list[str], log_file: Path, timeout: float = 900) -> dict:
    """Run `python -m module args` in a fresh process; return the dict it emitted (raises on failure), with
    process_cpu_s (the worker's CPU time) and others_cpu_share: the share of the machine's CPUs that other
    processes used during the run (0 = undisturbed; 0.5 = half the cores were busy with someone else's work)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = child_env(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    t, busy0, child0 = time.perf_counter(), machine_busy_seconds(), children_cpu_seconds()
    majflt0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_majflt
    with open(log_file, "a") as errf:
        errf.write(f"\n==== {' '.join(args)}\n")
        errf.flush()
        p = subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=errf, text=True,
                           timeout=timeout, env=env, cwd=str(REPO))
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed (rc {p.returncode}); see {log_file}")
    out = json.loads(lines[-1][len("RESULT "):])
    wall = time.perf_counter() - t
    child = children_cpu_seconds() - child0
    out["process_wall_s"] = wall
    out["process_cpu_s"] = child
    out["major_page_faults"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_majflt - majflt0  # file reads from disk
    out["others_cpu_share"] = max(0.0, (machine_busy_seconds() - busy0 - child) / (wall * (os.cpu_count() or 1)))
    return out
