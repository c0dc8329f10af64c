"""Shared bench helpers: one set of random full-size weights written in every layout, subprocess workers, stats.

The weight set (made once, reused until its spec changes) is a PixArt-Σ XL/2 512-family transformer
(28 blocks, hidden 1152, 16 heads, caption width 4096; parameters scaled down so outputs stay finite),
a T5-v1.1 encoder with the real width 4096 / FFN 10240 / 64 heads / 32128 vocab but only a few blocks,
and a full SDXL VAE architecture, all random. The 512 family is used because ComfyUI's built-in PixArt
cannot run a 256 px image with 1024-family weights (its position-embedding scale rounds to 0).

Files are written under a ComfyUI base folder (default bench/out/w-dit28-t5l2/), so ComfyUI workers use it
directly as --base-directory:
  models/diffusion_models/PixArt-Sigma-XL-2-512-MS.safetensors   original key layout (+ pos_embed, y_embedding)
  models/checkpoints/PixArt-Sigma-XL-2-512-MS.pth                 the same, as torch.save (the release format)
  models/diffusion_models/PixArt-Sigma-XL-2-512-MS-diffusers.safetensors  diffusers keys, one file
  models/text_encoders/t5-w4096-l2_fp16.safetensors               T5 single file (encoder keys + shared), fp16
  models/vae/sdxl_vae.safetensors                                 LDM keys, fp32 (as stabilityai/sdxl-vae)
  models/diffusers/PixArt-Sigma-XL-2-512-MS/                      diffusers pipeline folder (same weights)
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui-0.3.75")
OUT = REPO / "bench" / "out"
SPEC_VERSION = 1

DIT_NAME = "PixArt-Sigma-XL-2-512-MS"
DIT_FILE = f"{DIT_NAME}.safetensors"
DIT_PTH = f"{DIT_NAME}.pth"
DIT_DIFFUSERS_FILE = f"{DIT_NAME}-diffusers.safetensors"
VAE_FILE = "sdxl_vae.safetensors"
PROMPT = "A small cactus with a happy face in the Sahara desert, photorealistic, golden hour"
DIT_SCALE = 0.2  # random init x 0.2 keeps 28 blocks' outputs finite

SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                force_upcast=True)


def t5_file(t5_layers: int) -> str:
    return f"t5-w4096-l{t5_layers}_fp16.safetensors"


def dit_config(layers: int) -> dict[str, Any]:
    return dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
                cross_attention_dim=1152, attention_bias=True, sample_size=64, patch_size=2,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1.0,
                use_additional_conditions=False, caption_channels=4096)


def t5_config(layers: int) -> dict[str, Any]:
    return dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


def work_dir(dit_layers: int, t5_layers: int) -> Path:
    return OUT / f"w-dit{dit_layers}-t5l{t5_layers}"


# ---------------------------------------------------------------- weights


def make_dit(layers: int):
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**dit_config(layers)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(DIT_SCALE)
    return model


def make_t5(layers: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    return T5EncoderModel(T5Config(**t5_config(layers))).eval()


def make_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(**SDXL_VAE).eval()


def dit_to_original(sd: dict, tokens: int = 300, pos_tokens: int = 1024) -> dict:
    """diffusers PixArt keys -> the original release's keys (the tiny-model builder's converter), with pos_embed and
    y_embedding shaped as released (the pos_embed's token count tells ComfyUI the family: 1024 tokens = 512 px)."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import tiny_models

    width = sd["pos_embed.proj.weight"].shape[0]
    return tiny_models.dit_to_original(
        sd, pos_embed=torch.zeros(1, pos_tokens, width),
        y_embedding=torch.randn(tokens, sd["caption_projection.linear_1.weight"].shape[1]) * 0.02)


def vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> original (LDM) keys: the tiny-model builder's converter, shared."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from tiny_models import vae_to_ldm as convert

    return convert(sd)


def ensure_weights(dit_layers: int = 28, t5_layers: int = 2, rebuild: bool = False) -> Path:
    """Write the weight set under work_dir() once; returns that ComfyUI base folder."""
    base = work_dir(dit_layers, t5_layers)
    marker = base / "models" / "complete.json"
    spec = {"version": SPEC_VERSION, "dit_layers": dit_layers, "t5_layers": t5_layers, "dit_scale": DIT_SCALE}
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == spec:
        _link_pack(base)
        return base
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    if base.exists():
        shutil.rmtree(base)
    m = base / "models"
    for d in ("diffusion_models", "checkpoints", "text_encoders", "vae", "diffusers"):
        (m / d).mkdir(parents=True)
    log(f"building weights in {base} (DiT {dit_layers} blocks, T5 width 4096 x {t5_layers} blocks, SDXL VAE)")

    dit = make_dit(dit_layers)
    dsd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    orig = dit_to_original(dsd)
    save_file(orig, str(m / "diffusion_models" / DIT_FILE))
    torch.save(orig, str(m / "checkpoints" / DIT_PTH))
    del orig
    save_file(dsd, str(m / "diffusion_models" / DIT_DIFFUSERS_FILE))
    pipe = m / "diffusers" / DIT_NAME
    dit.save_pretrained(pipe / "transformer", safe_serialization=True, max_shard_size="20GB")
    del dit, dsd

    t5 = make_t5(t5_layers)
    sd16 = {k: v.half().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd16, str(m / "text_encoders" / t5_file(t5_layers)))
    del sd16
    t5.half().save_pretrained(pipe / "text_encoder", safe_serialization=True, max_shard_size="20GB")
    del t5

    vae = make_vae()
    save_file(vae_to_ldm(vae.state_dict()), str(m / "vae" / VAE_FILE))
    vae.save_pretrained(pipe / "vae", safe_serialization=True)
    del vae

    shutil.copytree(COMFY / "comfy" / "text_encoders" / "t5_tokenizer", pipe / "tokenizer")
    sys.path.insert(0, str(REPO))
    from pixart_core import sampling

    sampling.make_scheduler(sampling.DEFAULT_SCHEDULER).save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    _link_pack(base)
    marker.write_text(json.dumps(spec))
    log(f"weights written in {time.perf_counter() - t0:.0f} s")
    return base


def _link_pack(base: Path) -> None:
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "pixart_sigma_nodes"
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)


# ---------------------------------------------------------------- in-worker measurement


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


class Timers:
    """Sum of wall time per label, by wrapping methods of classes (e.g. every DiT forward)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.memory: list[tuple[str, int, int]] = []  # (after what, RSS, peak RSS so far)

    def mark(self, label: str) -> None:
        self.memory.append((label, rss_bytes(), peak_rss_bytes()))

    def wrap(self, owner, name: str, label: str) -> None:
        import functools

        fn = getattr(owner, name)
        timers = self

        @functools.wraps(fn)
        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                timers.add(label, time.perf_counter() - t, time.process_time() - c)

        setattr(owner, name, timed)

    def add(self, label: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + cpu_seconds
        self.calls[label] = self.calls.get(label, 0) + 1


def init_comfy(base: Path, custom_nodes: bool, cpu: bool = True):
    """ComfyUI in this process (on the CPU unless cpu=False), base folder `base`, with or without this pack."""
    import asyncio
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.path.insert(0, str(COMFY))
    from comfy.cli_args import args

    args.cpu = cpu
    args.base_directory = str(base)
    args.disable_all_custom_nodes = not custom_nodes
    import folder_paths  # noqa: F401  (reads args.base_directory)
    import comfy.model_management  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    return nodes


class _Sink:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def run_prompt(prompt: dict, node_timers: Timers) -> dict:
    """Validate and execute an API-format prompt with ComfyUI's PromptExecutor; time every node."""
    import asyncio
    import uuid

    import execution

    orig = execution.get_output_data

    async def timed(prompt_id, unique_id, obj, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return await orig(prompt_id, unique_id, obj, *a, **k)
        finally:
            label = f"node {unique_id} {prompt[unique_id]['class_type']}"
            node_timers.add(label, time.perf_counter() - t, time.process_time() - c)
            node_timers.mark(label)

    execution.get_output_data = timed
    ex = execution.PromptExecutor(_Sink(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not valid[0]:
        raise RuntimeError(f"prompt invalid: {valid[1]} {valid[3]}")
    ex.execute(prompt, pid, {"client_id": "bench"}, valid[2])
    execution.get_output_data = orig
    if not ex.success:
        errs = [d for e, d in ex.status_messages if e in ("execution_error", "execution_interrupted")]
        raise RuntimeError(f"prompt failed: {errs[:1]}")
    return ex.history_result.get("outputs", {})


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


def run_quiet(script: Path, args: list[str], log_file: Path, timeout: float = 900, warm=()) -> dict:
    """run_worker after reading `warm` into the page cache and waiting for quiet; rerun when the run was disturbed:
    others used more than MAX_OTHERS of the CPUs, or the worker kept its cores busy less than MIN_PARALLEL of the
    time (someone outside this machine's view, e.g. another VM on the host, or disk reads, held it up)."""
    for attempt in range(RETRIES + 1):
        warm_s = warm_files(warm)
        gate = wait_for_quiet()
        out = run_worker(script, args, log_file, timeout)
        out.update(gate, attempts=attempt + 1, warm_s=warm_s)
        # workers that time their measured part report total_s / total_cpu_s (P1); the others are not checked
        out["cpu_per_wall"] = out["total_cpu_s"] / out["total_s"] if "total_cpu_s" in out else None
        held_up = out["cpu_per_wall"] is not None and out["cpu_per_wall"] < MIN_PARALLEL
        if (out["others_cpu_share"] <= MAX_OTHERS and not held_up) or attempt == RETRIES:
            return out
        log(f"{' '.join(args)}: disturbed (others used {out['others_cpu_share']:.0%} of the CPUs; the worker's CPU time / "
            f"wall time {out['cpu_per_wall'] or 0:.2f}): running again")


def run_worker(script: Path, args: list[str], log_file: Path, timeout: float = 900) -> dict:
    """Run `python script args` in a fresh process; return the dict it emitted (raises on failure), with
    process_cpu_s (the worker's CPU time) and others_cpu_share: the share of the machine's CPUs that other
    processes used during the run (0 = undisturbed; 0.5 = half the cores were busy with someone else's work)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}
    t, busy0, child0 = time.perf_counter(), machine_busy_seconds(), children_cpu_seconds()
    majflt0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_majflt
    with open(log_file, "a") as errf:
        errf.write(f"\n==== {' '.join(args)}\n")
        errf.flush()
        p = subprocess.run([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=errf, text=True,
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


def rotations(names: list[str], repeats: int) -> list[list[str]]:
    """Run order per repeat: rotated, so no system always runs first (cold caches) or after the same one."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import transformers

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "comfyui": COMFY.name,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_at_start": os.getloadavg(),
            "git_head": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_measured_code": git("status", "--porcelain", "pixart_core", "nodes").splitlines()}


def gib(b: float) -> float:
    return b / 2**30


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    log(f"wrote {path}")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def loadavg() -> float:
    return os.getloadavg()[0]




if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "--build":
    # python bench/common.py --build DIT_LAYERS T5_LAYERS [--rebuild]: write the weight set (in its own process)
    ensure_weights(int(sys.argv[2]), int(sys.argv[3]), rebuild="--rebuild" in sys.argv)
    emit({"base": str(work_dir(int(sys.argv[2]), int(sys.argv[3])))})
