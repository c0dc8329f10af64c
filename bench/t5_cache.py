"""Quantize once: the 8-bit/nf4 T5 load that re-quantizes, the first load that also writes the cache,
and the cached load, against the time to read the cache's bytes from disk.

Writes a random-weight T5-v1.1 file with T5-XXL's width (4096, FFN 10240, 64 heads, 32128 vocab) and --layers of
its 24 blocks (fp16, streamed to disk; kept in bench/out/), then in a fresh process per row:
  requantize  load_t5 without a cache (today's load: transformers quantizes on the CPU)
  first       load_t5 with an empty cache folder (quantizes, then writes the entry)
  cached      load_t5 from the entry, then one read of every page of the model's tensors (the cache is
              memory-mapped, so the load returns before the bytes are read: the touch makes the row honest)
  read        the entry's files read with plain reads into a 64 MiB buffer: the floor for any cached load
bitsandbytes and transformers are imported before the clock starts (seconds, once per process, reported apart).
`cached` and `read` run with the page cache dropped first (`--cold`, needs root: echo 3 > /proc/sys/vm/drop_caches)
and again warm (the file in the page cache). Peak memory the process allocated (RssAnon) is sampled every 20 ms.

    ./scripts/harness bench.t5_cache [--layers 4] [--modes 8bit,nf4] [--dtype bfloat16] [--cold]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import models
from harness.location import child_env

from .measure import MemoryPeak
from .report import print_table
from .weights import OUT

GiB = 2**30


def _touch(model) -> int:
    """Read one element of every page of every tensor (what a forward or a .to(cuda) does to a mapped file)."""
    from pixart_core.quant import all_tensors

    seen, total = set(), 0
    for _, t in all_tensors(model):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        flat = t.detach().reshape(-1).view(__import__("torch").uint8)
        total += int(flat[::4096].sum())
    return total


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(folder: Path) -> tuple[float, int]:
    buf = bytearray(64 << 20)
    n = 0
    t = time.perf_counter()
    for f in sorted(folder.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    return time.perf_counter() - t, n


def worker(path: str, quantization: str, dtype: str, cache: str, row: str) -> dict:
    import torch

    from pixart_core import t5 as ct5

    if row == "read":
        seconds, n = read_all(Path(cache))
        return {"seconds": seconds, "bytes": n}
    t = time.perf_counter()
    import bitsandbytes  # noqa: F401  (imported before the clock starts: a ComfyUI session imports them once)
    from transformers import T5EncoderModel  # noqa: F401

    import_s = time.perf_counter() - t
    with MemoryPeak() as mem:
        t = time.perf_counter()
        kwargs = {} if row == "requantize" else {"cache_dir": cache}
        loaded = ct5.load_t5(path, quantization, getattr(torch, dtype), **kwargs)
        load_s = time.perf_counter() - t
        _touch(loaded.model)
        total_s = time.perf_counter() - t
    from pixart_core.quant import unique_bytes

    out = {"import_s": import_s, "load_s": load_s, "seconds": total_s, "model_bytes": unique_bytes(loaded.model),
           "peak_anon": mem.peak["RssAnon"] - mem.base["RssAnon"]}
    if loaded.cache is not None:
        out.update(hit=loaded.cache.hit, written=loaded.cache.written, entry=str(loaded.cache.entry))
    return out


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", *args], capture_output=True, text=True,
                         env=child_env())
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(f"worker {args} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="T5-XXL blocks to build (24 = the real model)")
    ap.add_argument("--modes", default="8bit,nf4")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (what stays unquantized is stored in it)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before cold rows (root)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a valid cache entry from an earlier run: only the cached and read rows run (the "
                         "re-quantize and first-load figures are then the earlier run's, from --out)")
    ap.add_argument("--out", default=str(OUT / "t5_cache.json"))
    ap.add_argument("--worker", nargs=5, metavar=("PATH", "QUANT", "DTYPE", "CACHE", "ROW"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    from pixart_core import t5_spec

    path = OUT / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    if not path.exists():
        t = time.perf_counter()
        models.write_t5_file(path, "full", layers=a.layers)
        print(f"wrote {path} ({path.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    names = {"8bit": t5_spec.QUANT_8BIT, "nf4": t5_spec.QUANT_NF4}
    previous = json.loads(Path(a.out).read_text())["rows"] if a.reuse and Path(a.out).is_file() else []
    rows = []
    for mode in a.modes.split(","):
        cache = OUT / f"t5_cache_{a.layers}l"
        q = names[mode]
        earlier = next((r for r in previous if r["mode"] == mode), None)
        if a.reuse and earlier is not None:
            r = {"requantize": earlier["requantize"], "first": earlier["first"]}
        else:
            shutil.rmtree(cache, ignore_errors=True)
            r = {"requantize": _run([str(path), q, a.dtype, str(cache), "requantize"])}
            r["first"] = _run([str(path), q, a.dtype, str(cache), "first"])
            assert r["first"]["written"], r["first"]
        entry = r["first"]["entry"]
        cold = a.cold and drop_caches()
        r["cached_cold" if cold else "cached_warm0"] = _run([str(path), q, a.dtype, str(cache), "cached"])
        if cold:
            drop_caches()
            r["read_cold"] = _run([str(path), q, a.dtype, entry, "read"])
        r["read_warm"] = _run([str(path), q, a.dtype, entry, "read"])
        r["cached_warm"] = _run([str(path), q, a.dtype, str(cache), "cached"])
        assert r["cached_warm"]["hit"], r["cached_warm"]
        rows.append({"mode": mode, "cold": cold, **r})
    table = []
    for r in rows:
        gib = r["read_warm"]["bytes"] / GiB
        for kind in ("cold", "warm"):
            if f"read_{kind}" not in r:
                continue
            read = r[f"read_{kind}"]["seconds"]
            cached = r[f"cached_{kind}"]
            table.append({"mode": r["mode"], "cache": kind, "requant": r["requantize"]["seconds"],
                          "first": r["first"]["seconds"], "cached": cached["seconds"], "cached_load": cached["load_s"],
                          "read": read, "ratio": cached["seconds"] / read, "gib": gib,
                          "speedup": r["requantize"]["seconds"] / cached["seconds"],
                          "anon_req": r["requantize"]["peak_anon"] / r["requantize"]["model_bytes"],
                          "anon_first": r["first"]["peak_anon"] / r["first"]["model_bytes"]})
    print_table(f"{path.name} ({path.stat().st_size / GiB:.2f} GiB, {a.layers} of T5-XXL's 24 blocks); compute "
                f"dtype {a.dtype}; seconds; cached = load + one read of every page",
                [("mode", 6, "{mode}"), ("page cache", 11, "{cache}"), ("cache GiB", 10, "{gib:.2f}"),
                 ("re-quantize", 12, "{requant:.1f}"), ("first (+write)", 15, "{first:.1f}"),
                 ("cached", 8, "{cached:.2f}"), ("(load only)", 12, "{cached_load:.2f}"), ("read bytes", 11, "{read:.2f}"),
                 ("cached/read", 12, "{ratio:.2f}"), ("re-quant/cached", 16, "{speedup:.0f}x"),
                 ("peak anon/model re-quant", 25, "{anon_req:.2f}"), ("first", 6, "{anon_first:.2f}")], table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"file": str(path), "layers": a.layers, "dtype": a.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
