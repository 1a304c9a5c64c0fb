"""`vecsim compare STORE --rdm` against rsatoolbox run directly on RDMs of raw activations held
in memory: time, peak memory, and the same numbers.

Run with: python benchmarks/bench_brain.py [--bootstraps 1000] [--work DIR]

Set-up (not timed): the first N = 1,000 images of ``builtin:digits`` indexed with the shipped
digits CNN at 4 layers (features.relu2, features.relu3, features.relu4, classifier;
``--eval-size 1000``, so every layer RDM is exact from the evaluation subset), the raw
activations of the same layers computed with plain hooks and saved as float32 ``.npy``, and
8 synthetic subjects × 3 regions (V1 from relu2's raw activations, V4 from relu3's, IT from
the classifier's, each plus Gaussian noise of 1× their std, RDM = 1 − cosine) in one rsatoolbox
HDF5 file (descriptors subject and region, stimuli named by path).

Timed, each side in its own child process (wall time and the child's peak RSS):

* vecsim: ``python -m vecsim compare STORE --rdm subjects.h5 --out DIR --bootstraps B -q``.
* rsatoolbox directly, the way users do it today: load the raw activations into memory,
  RDMs ``scipy.spatial.distance.pdist(X, "cosine")`` per layer, the subject RDMs with
  ``rsatoolbox.rdm.load_rdm``, then per region ``rsatoolbox.rdm.compare`` (corr), the noise
  ceiling ``boot_noise_ceiling`` and ``eval_bootstrap`` (B samples over stimuli and subjects,
  ``np.random.seed(0)`` first), ``Result.get_ci`` and ``test_pairwise``.

Both sides run the same rsatoolbox calls on the same stimulus order with the same seed, so
their value, interval bounds and ceilings must agree to 1e-6 (the layer RDMs differ only by
the float32 summation of the store's evaluation-subset Grams); the script prints the largest
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N = 1000
LAYERS = ["features.relu2", "features.relu3", "features.relu4", "classifier"]
REGIONS = (("V1", "features.relu2"), ("V4", "features.relu3"), ("IT", "classifier"))
SUBJECTS = 8
NOISE = 1.0
SEED = 0
TOL = 1e-6

BASELINE = r'''
import json, sys, time
import numpy as np
from scipy.spatial.distance import pdist
from rsatoolbox.inference import boot_noise_ceiling, eval_bootstrap
from rsatoolbox.model import ModelFixed
from rsatoolbox.rdm import RDMs, compare, load_rdm

work, boots, layers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
raw = {layer: np.load(f"{work}/raw_{layer}.npy") for layer in layers}  # the activations, held in memory
models = [ModelFixed(layer, RDMs(pdist(raw[layer], "cosine")[None])) for layer in layers]
subjects = load_rdm(f"{work}/subjects.h5", file_type="hdf5")
out = {}
for region in dict.fromkeys(subjects.rdm_descriptors["region"]):
    data = subjects.subset("region", region)
    values = np.mean(compare(RDMs(np.concatenate([m.rdm_obj.dissimilarities for m in models])), data, "corr"), axis=1)
    lower, upper = boot_noise_ceiling(data, method="corr", rdm_descriptor="subject")
    np.random.seed(0)
    result = eval_bootstrap(models, data, method="corr", N=boots, rdm_descriptor="subject", boot_noise_ceil=False)
    low, high = result.get_ci(0.95, test_type="t-test")
    pairwise = result.test_pairwise(test_type="t-test")
    out[region] = {"value": values.tolist(), "ci_low": list(low), "ci_high": list(high),
                   "noise_lower": float(lower), "noise_upper": float(upper), "p_pairwise": pairwise.tolist()}
json.dump(out, open(f"{work}/baseline.json", "w"))
'''


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, numpy {np.__version__}"


def setup(work: Path) -> None:
    import torch

    import vecsim
    from vecsim.digits import materialize_digits
    from vecsim.models import load_model
    from vecsim.stimuli import decode_image
    from rsatoolbox.rdm import RDMs

    src = work / "stimuli"
    digits = materialize_digits(work / "digits")
    for path in sorted(digits.glob("*/*.png"), key=lambda p: p.stem)[:N]:
        (src / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / path.parent.name / path.name)
    t = time.perf_counter()
    vecsim.index_stimuli(source=str(src), model="digits-cnn", layers=LAYERS, out=str(work / "store"),
                         eval_size=N, device="cpu", progress=False)
    print(f"set-up: indexed {N} stimuli at {len(LAYERS)} layers in {time.perf_counter() - t:.1f} s")
    paths = vecsim.Store.open(work / "store").stimuli().column("path").to_pylist()  # id order
    loaded = load_model("digits-cnn", weights="DEFAULT")
    modules = dict(loaded.module.named_modules())
    grabbed: dict[str, list] = {layer: [] for layer in LAYERS}
    hooks = [modules[layer].register_forward_hook(lambda m, i, o, name=layer: grabbed[name].append(o.flatten(1).clone()))
             for layer in LAYERS]
    try:
        with torch.no_grad():
            for start in range(0, N, 100):
                batch = torch.stack([loaded.preprocessing(decode_image(src / p).image) for p in paths[start:start + 100]])
                loaded.module(batch)
    finally:
        for h in hooks:
            h.remove()
    raw = {layer: torch.cat(grabbed[layer]).numpy().astype(np.float32) for layer in LAYERS}
    for layer, X in raw.items():
        np.save(work / f"raw_{layer}.npy", X)
    rng = np.random.default_rng(SEED)
    mats, subj, reg = [], [], []
    iu = np.triu_indices(N, 1)
    for region, layer in REGIONS:
        X = raw[layer].astype(np.float64)
        for s in range(SUBJECTS):
            Y = X + rng.normal(0, NOISE * X.std(), X.shape)
            Y /= np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-300)
            mats.append((1.0 - Y @ Y.T)[iu])
            subj.append(f"sub-{s + 1:02d}")
            reg.append(region)
    RDMs(np.stack(mats), dissimilarity_measure="cosine", rdm_descriptors={"subject": subj, "region": reg},
         pattern_descriptors={"path": paths}).save(str(work / "subjects.h5"), file_type="hdf5", overwrite=True)


def child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "rc = subprocess.run(sys.argv[1:]).returncode\n"
            "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, seconds, rss = res.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"{cmd[:4]} failed:\n{res.stderr}")
    return float(seconds), int(rss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstraps", type=int, default=1000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_brain_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"{N} stimuli, {len(LAYERS)} layers, {SUBJECTS} subjects x {len(REGIONS)} regions, comparator corr, "
          f"{args.bootstraps} bootstraps (stimuli and subjects), seed {SEED}")
    try:
        if not (work / "subjects.h5").is_file():
            setup(work)
        out = work / "vecsim_out"
        shutil.rmtree(out, ignore_errors=True)
        t_vec, m_vec = child([sys.executable, "-m", "vecsim", "compare", str(work / "store"), "--rdm",
                              str(work / "subjects.h5"), "--out", str(out), "--bootstraps", str(args.bootstraps),
                              "--seed", str(SEED), "-q"])
        script = work / "baseline.py"
        script.write_text(BASELINE)
        t_base, m_base = child([sys.executable, str(script), str(work), str(args.bootstraps), ",".join(LAYERS)])
        raw_mib = sum((work / f"raw_{layer}.npy").stat().st_size for layer in LAYERS) / 2**20
        got = json.loads((out / "rsa.json").read_text())["rows"]
        base = json.loads((work / "baseline.json").read_text())
        worst = 0.0
        print(f"\n{'region':<7} {'layer':<15} {'vecsim':>9} {'rsatoolbox':>11} {'CI (vecsim)':>21}  ceiling")
        for region, _ in REGIONS:
            b = base[region]
            for k, layer in enumerate(LAYERS):
                row = next(r for r in got if r["target"] == f"subjects:{region}" and r["layer"] == layer)
                for key in ("value", "ci_low", "ci_high"):
                    worst = max(worst, abs(row[key] - b[key][k]))
                for key in ("noise_lower", "noise_upper"):
                    worst = max(worst, abs(row[key] - b[key]))
                print(f"{region:<7} {layer:<15} {row['value']:>9.6f} {b['value'][k]:>11.6f} "
                      f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]  [{row['noise_lower']:.4f}, "
                      f"{row['noise_upper']:.4f}]" + ("  best" if row["best"] else ""))
        print(f"\nlargest |difference| in value, CI bounds and ceilings: {worst:.2e} "
              f"({'within' if worst <= TOL else 'ABOVE'} {TOL:g})")
        print(f"{'':<28}{'wall s':>9} {'peak RSS MiB':>13}")
        print(f"{'vecsim compare --rdm':<28}{t_vec:>9.1f} {m_vec:>13.0f}")
        print(f"{'rsatoolbox on raw RDMs':<28}{t_base:>9.1f} {m_base:>13.0f}   (raw activations: {raw_mib:.0f} MiB float32)")
        print(f"ratio vecsim / rsatoolbox: time {t_vec / t_base:.2f}x, peak memory {m_vec / m_base:.2f}x")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
