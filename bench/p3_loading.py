"""P3 loading: our single-file DiT / T5 loaders vs diffusers / transformers from_pretrained (and ComfyUI), A/B alternately.

Each load runs in a fresh process. After the imports the peak-RSS mark is reset (Linux clear_refs), then the weights are
loaded and every parameter is read once (a checksum), so lazily memory-mapped weights are counted as resident and
their page-in time is counted too; files are in the page cache (warm) after the first round.
  DiT ours-file     pixart_core.transformer.load_dit(original-layout .safetensors, the file ComfyUI users have)
      ours-pth      load_dit(the same weights as the original release's .pth, weights_only + mmap) (--dit ... ours-pth)
      ours-folder   load_dit(diffusers folder)
      diffusers     PixArtTransformer2DModel.from_pretrained(diffusers folder / transformer)
      comfy         comfy.sd.load_diffusion_model(the .safetensors) (what UNETLoader does)
  T5  ours-t5       pixart_core.t5.load_t5(single fp16 file, fp32) (width 4096, few blocks)
      transformers  T5EncoderModel.from_pretrained(folder / text_encoder, dtype fp32) (same fp16 weights)

    ./scripts/harness bench.p3_loading --repeats 3
    ./scripts/harness bench.p3_loading --dit ours-file ours-pth ours-folder diffusers comfy
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import measure, report, weights
from harness.comfyui import init_comfy

DIT_SYSTEMS = ["ours-file", "ours-pth", "ours-folder", "diffusers", "comfy"]
DEFAULT_DIT = ["ours-file", "ours-folder", "diffusers", "comfy"]  # ours-pth: add with --dit
T5_SYSTEMS = ["ours-t5", "transformers"]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def path_of(system: str, base: Path, t5_layers: int) -> Path:
    m = base / "models"
    pipe = m / "diffusers" / weights.DIT_NAME
    return {"ours-file": m / "diffusion_models" / weights.DIT_FILE, "ours-pth": m / "checkpoints" / weights.DIT_PTH,
            "ours-folder": pipe, "diffusers": pipe / "transformer", "comfy": m / "diffusion_models" / weights.DIT_FILE,
            "ours-t5": m / "text_encoders" / weights.t5_file(t5_layers), "transformers": pipe / "text_encoder"}[system]


def worker(a) -> None:
    import torch

    base = weights.work_dir(a.dit_layers, a.t5_layers)
    if a.worker == "comfy":
        init_comfy(base, pack=False)
        import comfy.sd
    from diffusers import PixArtTransformer2DModel  # noqa: F401  (imports outside the measured part)
    from transformers import T5EncoderModel  # noqa: F401

    from pixart_core import t5 as core_t5
    from pixart_core import transformer as core_dit

    path = path_of(a.worker, base, a.t5_layers)
    wdir = path / "transformer" if a.worker == "ours-folder" else path
    file_bytes = sum(p.stat().st_size for p in wdir.rglob("*.safetensors")) if wdir.is_dir() else wdir.stat().st_size

    def load():
        if a.worker.startswith("ours-") and a.worker != "ours-t5":
            return core_dit.load_dit(path, "auto", torch.float32)[0]
        if a.worker == "diffusers":
            return PixArtTransformer2DModel.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)
        if a.worker == "comfy":
            return comfy.sd.load_diffusion_model(str(path)).model
        if a.worker == "ours-t5":
            return core_t5.load_t5(path, "none", torch.float32).model
        return T5EncoderModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)

    measure.reset_peak_rss()
    baseline = measure.rss_bytes()
    t0 = time.perf_counter()
    model = load()
    t_load = time.perf_counter() - t0
    peak_load = measure.peak_rss_bytes()
    with torch.no_grad():  # read every weight once (pages in lazily mapped ones); sum() allocates nothing big
        checksum = sum(float(p.sum()) for p in model.parameters())
    t_total = time.perf_counter() - t0
    params = {p.dtype for p in model.parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    measure.emit({"system": a.worker, "load_s": t_load, "load_touch_s": t_total, "baseline_rss": baseline,
                 "peak_rss_load": peak_load, "peak_rss": measure.peak_rss_bytes(), "weights_bytes": file_bytes, "model_bytes": model_bytes,
                 "rss_anon": _status("RssAnon"), "rss_file": _status("RssFile"), "checksum": checksum,
                 "dtypes": sorted(str(d) for d in params), "params": n_params})


def summarize(runs: list[dict], systems: list[str], ref: str) -> dict:
    by = {s: [r for r in runs if r["system"] == s] for s in systems}
    out = {"systems": {}, "paired_vs_" + ref: {}}
    for s, rs in by.items():
        w = rs[0]["weights_bytes"]
        mb = rs[0]["model_bytes"]
        out["systems"][s] = {
            "load_s": report.stats([r["load_s"] for r in rs]),
            "load_touch_s": report.stats([r["load_touch_s"] for r in rs]),
            "peak_over_baseline_gib": report.stats([report.gib(r["peak_rss"] - r["baseline_rss"]) for r in rs]),
            "peak_over_weights": report.stats([(r["peak_rss"] - r["baseline_rss"]) / w for r in rs]),
            "peak_over_model": report.stats([(r["peak_rss"] - r["baseline_rss"]) / mb for r in rs]),
            "others_cpu_share": report.stats([r["others_cpu_share"] for r in rs]),
            "weights_gib": report.gib(w), "model_gib": report.gib(mb), "checksum": rs[0]["checksum"], "dtypes": rs[0]["dtypes"],
            "rss_file_gib_after": report.gib(rs[-1]["rss_file"]), "rss_anon_gib_after": report.gib(rs[-1]["rss_anon"]),
        }
        if s != ref:
            out["paired_vs_" + ref][s] = {
                "load_touch_time": report.stats([x["load_touch_s"] / y["load_touch_s"] for x, y in zip(rs, by[ref])]),
                "peak_rss": report.stats([(x["peak_rss"] - x["baseline_rss"]) / (y["peak_rss"] - y["baseline_rss"])
                                          for x, y in zip(rs, by[ref])]),
            }
    return out


def table(title: str, s: dict, ref: str) -> str:
    rows = []
    for name, d in s["systems"].items():
        p = s["paired_vs_" + ref].get(name)
        rows.append([name, f"{d['load_touch_s']['median']:.2f} ({d['load_touch_s']['min']:.2f}-{d['load_touch_s']['max']:.2f})",
                     f"{d['load_s']['median']:.2f}", f"{d['peak_over_baseline_gib']['median']:.2f}",
                     f"{d['weights_gib']:.2f} / {d['model_gib']:.2f}",
                     f"{d['peak_over_weights']['median']:.2f} / {d['peak_over_model']['median']:.2f}",
                     f"{d['rss_anon_gib_after']:.2f} / {d['rss_file_gib_after']:.2f}",
                     f"{p['load_touch_time']['median']:.2f} ({p['load_touch_time']['min']:.2f}-{p['load_touch_time']['max']:.2f})" if p else "-",
                     f"{p['peak_rss']['median']:.2f}" if p else "-", f"{d['others_cpu_share']['max']:.0%}"])
    text = f"{title}\n" + report.md_table(
        ["loader", "load+touch s median (min-max)", "load call s", "peak RSS over baseline GiB",
         "file / loaded model GiB", "peak / file, / model", "RSS anon / file-backed after, GiB",
         f"time / {ref} (paired)", f"peak RSS / {ref} (paired)", "others' CPU share (max)"], rows)
    print(text, flush=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dit", nargs="*", default=DEFAULT_DIT, choices=DIT_SYSTEMS)
    ap.add_argument("--t5", nargs="*", default=T5_SYSTEMS, choices=T5_SYSTEMS)
    ap.add_argument("--dit-layers", type=int, default=28)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--out", default=str(weights.OUT / "p3_loading.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    weights.build(str(a.dit_layers), str(a.t5_layers))
    result = {"machine": report.machine(), "note": "page cache warm; peak RSS measured from after imports"}
    texts = []
    for label, systems, ref in (("DiT", a.dit, "diffusers"), ("T5", a.t5, "transformers")):
        if not systems:
            continue
        runs = []
        for order in report.rotations(systems, a.repeats):
            for s in order:
                r = measure.run_quiet(__spec__.name, ["--worker", s, "--dit-layers", str(a.dit_layers),
                                                       "--t5-layers", str(a.t5_layers)], weights.OUT / "logs" / "p3.log",
                                     warm=[path_of(s, weights.work_dir(a.dit_layers, a.t5_layers), a.t5_layers)
                                           / ("transformer" if s == "ours-folder" else "")])
                runs.append(r)
                measure.log(f"P3 {s}: {r['load_touch_s']:.2f} s, peak over baseline "
                           f"{report.gib(r['peak_rss'] - r['baseline_rss']):.2f} GiB; others used "
                           f"{r['others_cpu_share']:.0%} of the CPUs")
        s = summarize(runs, systems, ref) if ref in systems else summarize(runs, systems, systems[0])
        s["runs"] = runs
        result[label] = s
        texts.append(table(f"P3 {label} loading, n = {a.repeats} per loader", s, ref if ref in systems else systems[0]))
    report.publish(result, "\n\n".join(texts), a.out, show=False)


if __name__ == "__main__":
    main()
