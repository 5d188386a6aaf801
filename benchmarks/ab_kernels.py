"""A/B timing of kernel variants: the same ``kernels.c`` compiled with different ``-D`` switches.

    flock /tmp/s2bnn-cpu.lock .venv/bin/python benchmarks/ab_kernels.py \\
        --variant old=-DS2D_TILE44=0 --variant new= [--layers] [--model-reps 40]

Builds ReActNet-A (224 px, random weights, batch 1) packed, then

- per layer (``--layers``): the C call alone (``s2d_bconv`` on the model's own arguments), each
  variant ``--layer-reps`` times per round, the variants in random order each round, medians;
- whole model: calls of one packed model per variant (each with its own library), the variants
  interleaved in random order, median and min per variant.

All variants must share the argument layout (they differ only in ``-D`` switches). This is the
measurement behind the rows of docs/DEPLOY.md's table "What each change gave".
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from s2bnn import _cbuild  # noqa: E402
from s2bnn.deploy import _build, pack  # noqa: E402
from s2bnn.models import build_model  # noqa: E402


def build_variant(name: str, defines: list[str], out_dir: Path):
    cc = _cbuild.find_compiler()
    out = out_dir / f"ab_{name}.so"
    cmd = [cc, *_build.FLAGS, *defines, "-o", str(out), str(_build.SOURCE)]
    subprocess.run(cmd, check=True)
    lib = _build._load(out)
    if lib is None:
        raise SystemExit(f"variant {name}: the library did not load")
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=DEFINES (space-separated -D switches; may be empty)")
    ap.add_argument("--nochain", action="append", default=[],
                    help="NAME=DEFINES: a variant run node by node (no chained C call)")
    ap.add_argument("--nopoolout", action="append", default=[],
                    help="NAME=DEFINES: a variant whose bconvs never write a pooled output")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="also time every bconv alone")
    ap.add_argument("--layer-reps", type=int, default=25)
    ap.add_argument("--model-reps", type=int, default=30)
    ap.add_argument("--model", default="reactnet_a")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--isa", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    libs = {}
    nochain = set()
    nopool = set()
    for v in args.variant + args.nochain + args.nopoolout:
        name, _, defs = v.partition("=")
        libs[name] = build_variant(name, defs.split(), tmp)
        if v in args.nochain:
            nochain.add(name)
        if v in args.nopoolout:
            nopool.add(name)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=1000, in_chans=3).eval()
    x = torch.randn(1, 3, args.image_size, args.image_size)
    from s2bnn.deploy.runtime import _Chain

    models = {}
    for name, lib in libs.items():  # one packed model per variant, its library swapped in
        packed = pack(model, isa=args.isa, num_threads=args.threads)
        packed._lib = lib
        steps = packed._plan()
        if name in nopool:
            packed._pool_out = {}
            packed._pool_src = {}
        for st in steps:
            if type(st[0]) is _Chain:
                st[0].disabled = name in nochain
        models[name] = packed
    names = list(libs)
    ref = None
    for name in names:  # every variant computes the same numbers
        for _ in range(2):
            y = models[name](x)
        if ref is None:
            ref = y
        elif not torch.equal(y, ref):
            raise SystemExit(f"variant {name} gives different outputs")
    rng = random.Random(0)
    if args.layers:
        nodes = [n for n in models[names[0]].graph["nodes"] if n["op"] == "bconv"]
        per: dict[tuple[str, str], list[float]] = {}
        for node in nodes:
            for _ in range(args.layer_reps):
                order = names[:]
                rng.shuffle(order)
                for name in order:
                    lib = libs[name]
                    cargs = models[name]._fast[node["name"]][3]
                    t = time.perf_counter()
                    lib.s2d_bconv(cargs)
                    per.setdefault((node["name"], name), []).append(time.perf_counter() - t)
        tot = {n: 0.0 for n in names}
        tot3 = {n: 0.0 for n in names}
        print(f"{'layer':<18} {'cin->cout':>10} k/s " + " ".join(f"{n:>9}" for n in names))
        for node in nodes:
            a = node["attrs"]
            meds = {n: statistics.median(per[(node["name"], n)]) * 1e3 for n in names}
            for n in names:
                tot[n] += meds[n]
                if a["kernel"][0] == 3:
                    tot3[n] += meds[n]
            print(f"{node.get('label', node['name']):<18} {a['cin']:>4}->{a['cout']:<5} "
                  f"{a['kernel'][0]}/{a['stride']} " + " ".join(f"{meds[n]:9.3f}" for n in names))
        print(f"{'all bconvs':<34}" + " ".join(f"{tot[n]:9.2f}" for n in names))
        print(f"{'3x3 bconvs':<34}" + " ".join(f"{tot3[n]:9.2f}" for n in names))
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.model_reps):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            packed = models[name]
            t = time.perf_counter()
            packed(x)
            times[name].append(time.perf_counter() - t)
    for n in names:
        ts = times[n]
        print(f"whole model {n:>10}: median {statistics.median(ts) * 1e3:7.2f} ms, "
              f"min {min(ts) * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
