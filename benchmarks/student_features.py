"""What the linear probe reads from the binary student, block by block (issue #11, item 3).

The probe of ``s2bnn demo`` (and of the paper) reads the globally average-pooled output of the
backbone's last block. This script puts the same probe (weighted kNN, k 200, and the linear
LR sweep, 10,000 labelled Fashion-MNIST training images, the 10,000 test images) on the pooled
output of every block of ``reactnet_small``, untrained (several seeds) or from a run directory,
and reports for every binary convolution the share of +1 in its sign input (a sign that sees
one value in nearly every image passes almost nothing on)::

    python benchmarks/student_features.py --untrained 0 1 2
    python benchmarks/student_features.py --run runs/teacher_study/runs/s_bs128

Results go to ``docs/results/student_features.json`` (one entry per network); heavy, so run it
under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# The probe these tables were measured with: 10 epochs, the library's default until the probe
# was found short of converged (docs/PROBE_EPOCHS.md); pinned so the rows stay re-runnable.
PROBE = {"epochs": 10}


def tap_features(model: torch.nn.Module, loader: Any,
                 signs: dict[str, list[torch.Tensor]] | None = None) -> tuple[dict, torch.Tensor]:
    """Pooled output of the stem and of every block, and (optionally) per-channel +1 shares."""
    taps: dict[str, list[torch.Tensor]] = {}
    hooks = [model.stem.register_forward_hook(
        lambda m, a, o: taps.setdefault("stem", []).append(o.float().mean((2, 3))))]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(
            lambda m, a, o, i=i: taps.setdefault(f"block{i}", []).append(o.float().mean((2, 3)))))
        if signs is not None:
            for name in ("conv3", "conv1"):
                q = getattr(block, name).input_quantizer
                hooks.append(q.register_forward_hook(
                    lambda m, a, o, k=f"block{i}.{name}": signs.setdefault(k, []).append(
                        (o > 0).float().mean((0, 2, 3)))))
    labels = []
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                model(x.float())
                labels.append(torch.as_tensor(y))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in taps.items()}, torch.cat(labels)


def study(model: torch.nn.Module, ds: dict[str, Any]) -> dict[str, Any]:
    from s2bnn.eval.baselines import evaluate_features
    from s2bnn.eval.features import make_loader

    signs: dict[str, list[torch.Tensor]] = {}
    tr, ytr = tap_features(model, make_loader(ds["train"], 512), signs)
    te, yte = tap_features(model, make_loader(ds["test"], 512))
    out: dict[str, Any] = {"taps": {}, "signs": {}}
    for key in tr:
        r = evaluate_features(tr[key], ytr, te[key], yte, knn_k=200, device="cpu",
                              sweep_kwargs=PROBE)
        out["taps"][key] = {"dim": int(tr[key].shape[1]), "knn_top1": round(r["knn_top1"], 2),
                            "linear_top1": round(r["linear_top1"], 2),
                            "mean": round(float(tr[key].mean()), 3),
                            "std_over_images": round(float(tr[key].std(0).mean()), 3)}
    for key, shares in signs.items():
        p = torch.stack(shares).mean(0)
        out["signs"][key] = {"plus_share": round(float(p.mean()), 3),
                             "channels_stuck": int(((p > 0.95) | (p < 0.05)).sum()),
                             "channels": int(p.numel())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--untrained", type=int, nargs="*", default=None, help="random-init seeds")
    ap.add_argument("--prelu-init", type=float, default=0.25,
                    help="untrained nets' RPReLU slope (0.25: the default section 4 measured; "
                         "reactnet_small's default is 1 since)")
    ap.add_argument("--run", nargs="*", default=None, help="run directories")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "student_features.json"))
    args = ap.parse_args()
    from s2bnn.demo import eval_datasets
    from s2bnn.eval import load_backbone
    from s2bnn.models import build_model

    ds = eval_datasets("fashion-mnist", None, 10000, None, 1, 28)
    store = Path(args.out)
    done = json.loads(store.read_text()) if store.is_file() else {}
    jobs: list[tuple[str, Any]] = []
    for seed in args.untrained or []:
        jobs.append((f"untrained@s{seed}", seed))
    for run in args.run or []:
        jobs.append((Path(run).name, run))
    for name, what in jobs:
        t0 = time.perf_counter()
        if isinstance(what, int):
            torch.manual_seed(what)
            model = build_model("reactnet_small", in_chans=1, num_classes=0,
                                prelu_init=args.prelu_init)
        else:
            model, _ = load_backbone(what)
        done[name] = {**study(model, ds), "seconds": round(time.perf_counter() - t0, 1),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}
        taps = done[name]["taps"]
        print(name, " ".join(f"{k}:{v['linear_top1']:.1f}" for k, v in taps.items()), flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(done, indent=1) + "\n")


if __name__ == "__main__":
    main()
