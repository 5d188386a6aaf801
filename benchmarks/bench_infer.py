"""Inference speed and size of binary networks: float engine vs onnxruntime vs packed runtime.

    flock /tmp/s2bnn-cpu.lock .venv/bin/python benchmarks/bench_infer.py [--threads 2]

Networks (random weights: speed does not depend on them): ReActNet-A and Bi-Real-18 at 224 px
(1000 classes) and reactnet_small (the demo student before reactnet_compact) at 28 px. For
each, batch 1 and batch 16 latency of

  (a) float: the same network as a float engine runs it: FloatNet (BatchNorm folded, binary
      weights pre-computed once as +-scale float tensors, plain convolutions), channels-last,
      torch.inference_mode;
  (b) onnxruntime fp32 on the ONNX export of that network;
  (c) the packed runtime (s2bnn.deploy), at the default ISA level.

Also file sizes, a per-layer breakdown of ReActNet-A at batch 1 (packed), binary-convolution
throughput in binary MAC/s, and the popcount peak: the throughput of the same GEMM micro-kernel on
L1-resident data (4 pixels x 32 output channels x 64 words per call, in every thread), i.e. the
best the kernel's inner loop reaches with no memory traffic and no epilogue. Writes
docs/results/infer.json and docs/results/infer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from s2bnn.deploy import _build, pack  # noqa: E402
from s2bnn.deploy.export import onnx_from_packed  # noqa: E402
from s2bnn.deploy.floatnet import FloatNet  # noqa: E402
from s2bnn.models import build_model  # noqa: E402
from s2bnn.models.profile import profile_model  # noqa: E402

NETS = [
    ("ReActNet-A", "reactnet_a", dict(num_classes=1000, in_chans=3), 224),
    ("Bi-Real-18", "birealnet18", dict(num_classes=1000, in_chans=3), 224),
    ("reactnet_small", "reactnet_small", dict(num_classes=10, in_chans=1), 28),
]


def timeit(fn, x, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def cpu_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "isa_levels": _build.available_isas(),
            "default_isa": _build.default_isa()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "CPU MHz", "L1d cache", "L2 cache",
                             "L3 cache"):
                info[k.strip()] = v.strip()
            if k.strip() == "Flags":
                flags = v.split()
                info["flags"] = [f for f in flags if f.startswith(("avx", "popcnt", "amx",
                                                                   "vpopcnt"))]
    except OSError:
        pass
    return info


def popcount_peak(threads: int) -> dict:
    lib = _build.kernels()
    out = {}
    if lib is None:
        return out
    for name in _build.available_isas():
        if name == "torch":
            continue
        level = _build.ISA_LEVELS[name]
        reps = 20000
        lib.s2d_gemm_l1(level, 200, threads)
        t = time.perf_counter()
        lib.s2d_gemm_l1(level, reps, threads)
        dt = time.perf_counter() - t
        out[name] = threads * reps * 4 * 32 * 64 * 64 / dt
    return out


def bconv_macs(packed, x) -> list[int]:
    """Binary MACs of each bconv node for input x (output pixels x Cout x Cin x taps)."""
    macs = []
    shapes: dict[str, tuple[int, int]] = {}
    # Run once with a shape probe: record each bconv's output size.
    orig = packed._op_bconv

    def probe(node, ins):
        out = orig(node, ins)
        a = node["attrs"]
        # the output size from the input's (a float output may be the 2x2-pooled map)
        _, h, w, _ = ins[0].shape
        k, s, p = a["kernel"][0], a["stride"], a["padding"]
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        shapes[node["name"]] = (oh, ow)
        macs.append(x.shape[0] * oh * ow * a["cout"] * a["cin"] * a["kernel"][0] *
                    a["kernel"][1])
        return out

    packed._op_bconv = probe
    packed._steps = None  # the runtime resolves its ops once per model: resolve them again
    try:
        packed(x)
    finally:
        packed._op_bconv = orig
        packed._steps = None
    return macs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "infer"))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--nets", default="", help="comma-separated model names to run (default: "
                    "all); a partial run writes to --out, default /tmp/bench_infer_partial")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-layer breakdown")
    args = ap.parse_args()
    nets = [n for n in NETS if not args.nets or n[1] in args.nets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    partial = len(nets) != len(NETS) or batches != [1, 16] or args.no_breakdown
    if partial and args.out == ap.get_default("out"):
        args.out = "/tmp/bench_infer_partial"
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    results: dict = {"machine": cpu_info(), "peak_bmacs": popcount_peak(args.threads),
                     "nets": []}
    tmp = Path(tempfile.mkdtemp())
    for label, name, kw, size in nets:
        torch.manual_seed(0)
        model = build_model(name, **kw).eval()
        prof = profile_model(model, image_size=size, in_chans=kw["in_chans"])
        packed = pack(model, num_threads=args.threads)
        fnet = FloatNet(packed).eval().to(memory_format=torch.channels_last)
        pfile = packed.save(tmp / f"{name}.s2bnn")
        row = {"net": label, "model": name, "image_size": size,
               "size_latent_float32_bytes": prof["size_float32_bytes"],
               "size_packed_file_bytes": os.path.getsize(pfile),
               "size_packed_profile_bytes": prof["size_packed_bytes"],
               "bops": prof["bops"],
               "flops": prof["flops"], "latency_ms": {}}
        # torch first, then the ONNX export and onnxruntime: the export and ORT's thread pool
        # must not disturb the torch timings.
        inputs = {b: torch.randn(b, kw["in_chans"], size, size) for b in batches}
        lat_all: dict[int, dict] = {}
        for batch, x in inputs.items():
            xc = x.contiguous(memory_format=torch.channels_last)
            reps = (5 if args.quick else 15) if batch == 1 else (2 if args.quick else 5)
            reps *= 4 if size < 64 else 1

            def run_float(inp, fnet=fnet):
                with torch.inference_mode():
                    return fnet(inp)

            lat_all[batch] = {"float": timeit(run_float, xc, reps),
                              "packed": timeit(packed, x, reps)}
        ofile = onnx_from_packed(packed, tmp / f"{name}.onnx", size, check=False)
        row["size_onnx_bytes"] = os.path.getsize(ofile)
        sess = ort.InferenceSession(str(ofile), so, providers=["CPUExecutionProvider"])
        for batch in batches:
            x = inputs[batch]
            reps = (5 if args.quick else 15) if batch == 1 else (2 if args.quick else 5)
            reps *= 4 if size < 64 else 1

            def run_ort(inp, sess=sess):
                return sess.run(None, {"images": inp})

            lat = dict(lat_all[batch])
            lat["onnxruntime"] = timeit(run_ort, x.numpy(), reps)
            with torch.inference_mode():
                err = float((packed(x) - fnet(x)).abs().max())
            lat["speedup_vs_float"] = lat["float"] / lat["packed"]
            lat["speedup_vs_onnxruntime"] = lat["onnxruntime"] / lat["packed"]
            lat["max_abs_diff_packed_vs_float"] = err
            row["latency_ms"][str(batch)] = lat
            print(f"{label:>13} b{batch:<3} float {lat['float']:8.2f} ms  ort "
                  f"{lat['onnxruntime']:8.2f} ms  packed {lat['packed']:8.2f} ms  "
                  f"x{lat['speedup_vs_float']:.1f} vs float", flush=True)
        if args.no_breakdown:
            results["nets"].append(row)
            continue
        # Per-layer breakdown at batch 1 (packed).
        x = torch.randn(1, kw["in_chans"], size, size)
        macs = bconv_macs(packed, x)
        # Per node, the median of 7 profiled calls (one call alone is at the mercy of this
        # shared VM's noise).
        per_node: dict[tuple[str, str], list[float]] = {}
        for _ in range(7):
            packed.profile = []
            packed(x)
            for nname, op, t in packed.profile:
                per_node.setdefault((nname, op), []).append(t)
        packed.profile = None
        prof_rows = [(nname, op, statistics.median(ts)) for (nname, op), ts in per_node.items()]
        by_op: dict[str, float] = {}
        for _, op, t in prof_rows:
            by_op[op] = by_op.get(op, 0.0) + t * 1e3
        layers = []
        bc = [(n, t) for n, op, t in prof_rows if op == "bconv"]
        nodes = {n["name"]: n for n in packed.graph["nodes"]}
        tot3 = mac3 = 0.0
        for (nname, t), m in zip(bc, macs):
            a = nodes[nname]["attrs"]
            layers.append({"layer": nodes[nname].get("label", nname), "cin": a["cin"],
                           "cout": a["cout"], "k": a["kernel"][0], "stride": a["stride"],
                           "ms": t * 1e3, "bmacs": m, "bmac_per_s": m / t})
            if a["kernel"][0] == 3:
                tot3 += t
                mac3 += m
        row["breakdown_ms_by_op"] = by_op
        row["bconv_layers"] = layers
        row["bconv3x3_bmac_per_s"] = mac3 / tot3 if tot3 else None
        all_t = sum(t for _, t in bc)
        row["bconv_bmac_per_s"] = sum(macs) / all_t if all_t else None
        results["nets"].append(row)
    peak = max(results["peak_bmacs"].values()) if results["peak_bmacs"] else None
    results["peak_bmac_per_s"] = peak
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(f"written: {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    peak = r.get("peak_bmac_per_s")
    lines = ["# Inference benchmark (`benchmarks/bench_infer.py`)", "",
             f"Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
             f"{m['threads']} threads; flags {' '.join(m.get('flags', []))}; ISA levels "
             f"{', '.join(m['isa_levels'])} (default {m['default_isa']}); torch {m['torch']}.",
             "", "Latency in ms (median). (a) float = FloatNet (BN folded, +-scale float weights, "
             "channels-last, inference_mode); (b) onnxruntime fp32; (c) packed runtime.", "",
             "| network | batch | (a) float | (b) onnxruntime | (c) packed | (c) vs (a) | "
             "(c) vs (b) |", "|---|---|---|---|---|---|---|"]
    for n in r["nets"]:
        for b, lat in n["latency_ms"].items():
            lines.append(f"| {n['net']} {n['image_size']} px | {b} | {lat['float']:.2f} | "
                         f"{lat['onnxruntime']:.2f} | {lat['packed']:.2f} | "
                         f"{lat['speedup_vs_float']:.1f}x | {lat['speedup_vs_onnxruntime']:.1f}x |")
    lines += ["", "| network | latent float32 | packed file | profile size_packed_bytes | ONNX |",
              "|---|---|---|---|---|"]
    for n in r["nets"]:
        mb = lambda v: f"{v / 1e6:.2f} MB"  # noqa: E731
        lines.append(f"| {n['net']} | {mb(n['size_latent_float32_bytes'])} | "
                     f"{mb(n['size_packed_file_bytes'])} | {mb(n['size_packed_profile_bytes'])} "
                     f"| {mb(n['size_onnx_bytes'])} |")
    lines += ["", "Binary-convolution throughput (packed, batch 1) against the popcount peak "
              "(the same GEMM micro-kernel on L1-resident data in every thread: "
              + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in r["peak_bmacs"].items())
              + " binary MAC/s):", "",
              "| network | all binary convs | 3x3 binary convs | 3x3 vs peak |",
              "|---|---|---|---|"]
    for n in r["nets"]:
        b3 = n.get("bconv3x3_bmac_per_s")
        lines.append(f"| {n['net']} | {n['bconv_bmac_per_s'] / 1e9:.0f} G/s | "
                     f"{b3 / 1e9:.0f} G/s | {100 * b3 / peak:.0f} % |" if b3 and peak else
                     f"| {n['net']} | — | — | — |")
    n = r["nets"][0]
    if "bconv_layers" not in n:
        return "\n".join(lines) + "\n"
    lines += ["", f"Per-op time of {n['net']} at batch 1 (packed; per op the median of 7 "
              "profiled calls), ms: " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(n["breakdown_ms_by_op"].items(),
                                                           key=lambda kv: -kv[1])), "",
              "| layer | cin→cout | k/s | ms | G binary MAC/s |", "|---|---|---|---|---|"]
    for layer in n["bconv_layers"]:
        lines.append(f"| {layer['layer']} | {layer['cin']}→{layer['cout']} | "
                     f"{layer['k']}/{layer['stride']} | {layer['ms']:.2f} | "
                     f"{layer['bmac_per_s'] / 1e9:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
