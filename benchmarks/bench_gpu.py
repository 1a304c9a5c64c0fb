"""Benchmark: vecsim's on-the-fly reduction on a GPU (DenseNet121, three transition layers).

What it measures, on N generated images (tensors made directly on the device: no decoding,
no disk, so the numbers are the model's and the reducers' alone):

(a) the bare forward loop: images/s and peak GPU memory, for the whole network and for the
    network cut after the deepest hooked layer (what vecsim's ``LayerCapture`` runs: it stops
    the pass there);
(b) the forward with vecsim's hooks (``LayerCapture`` + ``LayerReducer``) at
    ``features.transition{1,2,3}.norm`` (2,560,000 / 1,280,000 / 640,000 units at 400×400):
    pool → count sketch (vecsim's automatic size) → L2 normalise → uncentred projection, with
    only the (B, 256) vectors (and the (B,) norms and finite masks) copied to the host per
    layer; the projection is fitted first (``LayerReducer.fit``) on the sketches of the first
    ``--train`` images, which are copied to the host as the pipeline's fit pass does. Images/s,
    its ratio to (a), and the peak GPU memory (``torch.cuda.max_memory_allocated``, reset
    between the runs). On CUDA the same is done for the model in float16 (``--no-half`` skips).
(c) fidelity on ``--eval-n`` fresh images (not in the training sample: what a query image or
    ``vecsim add`` gets) and on as many of the training images (what an indexed stimulus set
    no larger than the training sample gets): the exact cosines of the raw activations, from a
    Gram accumulated in float64 on the device inside the hook (the raw activations are never
    kept), against the cosines of the sketches and of the reduced vectors: Spearman and
    max/mean |Δcos| per layer;
(d) ``vecsim.similarity.similarity_tiles`` (and ``similarity_matrix``) for ``--sim-n`` random
    unit vectors of ``--sim-dim`` dims on the GPU vs numpy on the CPU: the time of the full
    matrix in tiles, the ratio, and the largest difference between the two; then
    ``export_similarity`` of the same vectors to a float16 ``.npy`` on each device, against a
    plain sequential write of as many bytes to the same folder (``--tmp``);
(e) the all-vs-all exact 10-NN of ``--nn-n`` unit vectors (``vecsim neighbors`` on an exact
    index): a FAISS flat scan on the CPU vs vecsim's torch search on the GPU (skipped when
    faiss is not importable).

Run with: python benchmarks/bench_gpu.py [--n 256] [--size 400]

Without CUDA it says so and runs on the CPU with small defaults (n=48, size 224, similarity
N=4000), a smoke test of a minute or two. DenseNet121 has random weights (seeded) unless the
torchvision ImageNet weights are already in the torch hub cache (nothing is downloaded);
``--weights none`` forces random weights. ``--json FILE`` also writes every number as JSON.

Only the GPU stages are used (models, extract, reduce, similarity, the neighbours search):
lancedb is not needed, and faiss only for (e).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODEL = "densenet121"
LAYERS = ["features.transition1.norm", "features.transition2.norm", "features.transition3.norm"]
GPU_DEFAULTS = dict(n=1024, size=400, batch=32, train=1000, eval_n=64, sim_n=20_000, nn_n=100_000)
CPU_DEFAULTS = dict(n=48, size=224, batch=16, train=48, eval_n=16, sim_n=4_000, nn_n=10_000)
GRAM_COLUMNS = 1 << 18  # float64 Gram in column blocks of this many units


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, help="images for the throughput runs [cuda 1024, cpu 48]")
    p.add_argument("--size", type=int, help="input side in pixels [cuda 400, cpu 224]")
    p.add_argument("--batch", type=int, help="batch size [cuda 32, cpu 16]")
    p.add_argument("--train", type=int, help="images the projection is fitted on (at most --n) [cuda 1000, "
                   "vecsim's default training sample; cpu 48]")
    p.add_argument("--eval-n", type=int, help="fresh images for the fidelity check (c) [cuda 64, cpu 16]")
    p.add_argument("--sim-n", type=int, help="vectors for the similarity tiles (d) [cuda 20000, cpu 4000]")
    p.add_argument("--sim-dim", type=int, default=256)
    p.add_argument("--nn-n", type=int, help="vectors for the all-vs-all k-NN (e) [cuda 100000, cpu 10000]")
    p.add_argument("--sketch-dim", type=int, default=None, help="count-sketch dims (default: vecsim's automatic choice per layer)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--weights", default="auto", help="auto (ImageNet weights if cached, else none), none, or a weights name")
    p.add_argument("--device", default="auto", help="auto, cuda[:N] or cpu")
    p.add_argument("--no-half", action="store_true", help="skip the float16 runs on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--tmp", type=Path, help="folder for the export files of (d) [the system's temporary folder]")
    args = p.parse_args(argv)
    return args


# -- helpers ------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> int:
    """Reset the peak counter; returns the memory allocated now (the resident baseline)."""
    import torch

    if not device.startswith("cuda"):
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: str) -> int | None:
    import torch

    if not device.startswith("cuda"):
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def make_images(n: int, size: int, seed: int, device: str, dtype=None):
    """``n`` generated images (n, 3, size, size) on ``device``: smooth random fields built from
    8 shared prototypes plus per-image structure and pixel noise, so that pairwise similarities
    spread out (pure white noise makes every pair look alike)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(seed)
    coarse = max(4, size // 16)
    protos = torch.randn(8, 3, coarse, coarse, generator=gen)
    which = torch.randint(0, 8, (n,), generator=gen)
    weight = torch.rand(n, 1, 1, 1, generator=gen)
    own = torch.randn(n, 3, coarse, coarse, generator=gen)
    low = weight * protos[which] + (1 - weight) * own
    images = torch.empty(n, 3, size, size, device=device)
    for start in range(0, n, 64):  # upsample in chunks on the device
        chunk = low[start : start + 64].to(device)
        up = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        noise = torch.randn(up.shape, generator=gen).to(device)
        images[start : start + 64] = up + 0.3 * noise
    return images if dtype is None else images.to(dtype)


def load_densenet(weights: str):
    """DenseNet121 (vecsim.models.load_model), with ImageNet weights only when already cached."""
    import torch

    from vecsim.models import load_model

    if weights == "auto":
        from torchvision.models import DenseNet121_Weights

        url = DenseNet121_Weights.IMAGENET1K_V1.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        weights = "IMAGENET1K_V1" if cached.is_file() else "none"
    loaded = load_model(MODEL, weights=weights)
    return loaded.module, ("random (seeded init)" if weights.lower() == "none" else loaded.weights)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b)[0])
    except ImportError:  # ranks without ties handling: fine for continuous values
        ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
        ra -= ra.mean()
        rb -= rb.mean()
        return float(ra @ rb / math.sqrt((ra @ ra) * (rb @ rb)))


def cosines(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    denom = np.outer(norms, norms)
    return np.clip(np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0), -1, 1)


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def short(layer: str) -> str:
    return layer.replace("features.", "")


# -- the runs -----------------------------------------------------------------------------


def timed_loop(step, images, batch: int, device: str) -> tuple[float, int | None, int]:
    """(seconds, peak bytes, resident bytes) of ``step(x)`` over ``images`` in batches, after one warm-up batch."""
    step(images[:batch])
    resident = reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        step(images[start : start + batch])
    sync(device)
    return time.perf_counter() - t0, peak(device), resident


def bare_forward(model, images, batch, device):
    import torch

    def step(x):
        with torch.inference_mode():
            model(x)

    return timed_loop(step, images, batch, device)


def truncated_forward(model, images, batch, device):
    """The network cut after the deepest hooked layer (LayerCapture's early stop), hooks doing nothing."""
    from vecsim.extract import LayerCapture

    with LayerCapture(model, LAYERS, {layer: (lambda output: None) for layer in LAYERS}) as capture:
        return timed_loop(capture.run, images, batch, device)


def fit_reducers(model, images, args, device):
    """Build the reducers, run the fit pass (pool → sketch, sketches to the host) and fit them."""
    import torch

    from vecsim.extract import LayerCapture
    from vecsim.models import layer_shapes
    from vecsim.reduce import LayerReducer, ReducerConfig

    shapes = {info.name: info.shape for info in layer_shapes(model, args.size, LAYERS)}
    config = ReducerConfig(dim=args.dim, sketch_dim=args.sketch_dim)
    reducers = {layer: LayerReducer(layer, shapes[layer], config, device) for layer in LAYERS}
    held = {layer: [] for layer in LAYERS}
    train = images[: args.train]
    with LayerCapture(model, LAYERS, {layer: reducers[layer].prepare for layer in LAYERS}) as capture:
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(train), args.batch):
            results = capture.run(train[start : start + args.batch])
            for layer in LAYERS:
                held[layer].append(results[layer][0].cpu())
        sync(device)
        seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    for layer in LAYERS:
        reducers[layer].fit(torch.cat(held[layer]))
    fit_seconds = time.perf_counter() - t1
    return reducers, shapes, seconds, fit_seconds


def hooked_forward(model, reducers, images, batch, device):
    """vecsim's hooks: pool → sketch → normalise → projection; only (B, dim) + (B,) + (B,) to the host."""
    from vecsim.extract import LayerCapture

    copied = [0]

    def step(x):
        results = capture.run(x)
        for layer in LAYERS:
            for t in results[layer]:
                host = t.cpu()
                copied[0] += host.numel() * host.element_size()

    with LayerCapture(model, LAYERS, {layer: reducers[layer] for layer in LAYERS}) as capture:
        seconds, top, resident = timed_loop(step, images, batch, device)
    per_image = copied[0] / (len(images) + batch)  # the warm-up batch copied too
    return seconds, top, resident, per_image


def fidelity(model, reducers, images, device, training: bool = False):
    """Exact cosines of the raw activations (float64 Gram on the device, in the hook) vs sketch and
    reduced (``training``: images of the training sample, whose stored vectors are shrunk in-sample)."""
    import torch

    from vecsim.extract import LayerCapture

    def function_for(reducer):
        def function(output):
            grams = []

            def tap(x, _output, _finite):  # the pooled raw vectors, where the evaluation subset taps them
                gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
                for start in range(0, x.shape[1], GRAM_COLUMNS):
                    block = x[:, start : start + GRAM_COLUMNS].to(torch.float64)
                    gram += block @ block.T
                grams.append(gram)

            z, _norms, _finite, share = reducer.prepare(output, tap)  # vecsim's own chain up to the sketch
            y = reducer.project_training(z) if training else reducer.project(z, share)
            return grams[0].cpu(), z.double().cpu(), y.double().cpu()

        return function

    with LayerCapture(model, LAYERS, {layer: function_for(reducers[layer]) for layer in LAYERS}) as capture:
        results = capture.run(images)
    rows = {}
    m = images.shape[0]
    iu = np.triu_indices(m, 1)
    for layer in LAYERS:
        gram, z, y = (r.numpy() for r in results[layer])
        exact = cosines(gram)[iu]
        sketch = cosines(z @ z.T)[iu]
        reduced = np.clip(y @ y.T, -1, 1)[iu]
        rows[layer] = {
            "pairs": int(len(exact)),
            "exact_cos_mean": float(exact.mean()), "exact_cos_std": float(exact.std()),
            "sketch_spearman": spearman(exact, sketch),
            "sketch_max_abs_dcos": float(np.abs(sketch - exact).max()),
            "reduced_spearman": spearman(exact, reduced),
            "reduced_max_abs_dcos": float(np.abs(reduced - exact).max()),
            "reduced_mean_abs_dcos": float(np.abs(reduced - exact).mean()),
        }
    return rows


def export_bench(v: np.ndarray, devices: list[str], folder: Path | None) -> dict:
    """export_similarity of v to a float16 .npy on each device (the CLI's `vecsim similarity
    --dtype float16 --device ...`), then a plain write of as many bytes to the same folder."""
    import tempfile

    from bench_export import plain_write  # the export benchmark's baseline, the same here

    from vecsim.similarity import export_similarity

    n = len(v)
    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-gpu-", dir=folder))
    kw = dict(ids=np.arange(n), paths=[f"s{i}.png" for i in range(n)], labels=[None] * n, metadata={},
              dtype="float16")
    out: dict = {}
    try:
        files = {}
        for dev in devices:
            path = work / f"{dev.replace(':', '_')}.npy"
            os.sync()
            t0 = time.perf_counter()
            summary = export_similarity({"l": v}, path, device=dev, **kw)  # fsyncs before returning
            out[f"export_{dev}_s"] = time.perf_counter() - t0
            nbytes = summary["bytes_written"]
            files[dev] = path
        out["export_mb"] = nbytes / 1e6
        out["plain_write_s"] = plain_write(work / "plain.bin", nbytes)
        if len(devices) == 2:
            a = np.load(files[devices[0]], mmap_mode="r")
            b = np.load(files[devices[1]], mmap_mode="r")
            diff, symmetric = 0.0, True
            for r0 in range(0, n, 2048):  # in strips: the files can be larger than memory
                sa, sb = np.asarray(a[r0 : r0 + 2048], np.float32), np.asarray(b[r0 : r0 + 2048], np.float32)
                diff = max(diff, float(np.abs(sa - sb).max()))
                symmetric &= bool(np.array_equal(b[r0 : r0 + 2048], b[:, r0 : r0 + 2048].T))
            out["export_max_abs_diff"], out["export_symmetric"] = diff, symmetric
            del a, b
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


def neighbors_bench(n: int, dim: int, k: int, seed: int, device: str) -> dict | None:
    """All-vs-all exact k-NN of n unit vectors (what `vecsim neighbors` does on an exact index):
    a FAISS flat scan on the CPU (all cores) vs the torch search on the GPU. None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    from vecsim.query import _torch_search

    rng = np.random.default_rng([seed, 5])
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    flat.add_with_ids(v, ids)
    batch = 4096  # vecsim neighbors' query batch
    out: dict = {"n": n, "dim": dim, "k": k, "faiss_threads": faiss.omp_get_max_threads()}
    t0 = time.perf_counter()
    cpu_ids = np.concatenate([flat.search(v[lo : lo + batch], k + 1)[1] for lo in range(0, n, batch)])
    out["faiss_cpu_s"] = time.perf_counter() - t0
    if device.startswith("cuda"):
        with _torch_search(ids, v[:batch], device) as warm:  # CUDA context, cuBLAS handle
            warm(v[:8], 2)
        t0 = time.perf_counter()
        with _torch_search(ids, v, device) as search:
            gpu_ids = np.concatenate([search(v[lo : lo + batch], k + 1)[1] for lo in range(0, n, batch)])
        out[f"torch_{device}_s"] = time.perf_counter() - t0
        out["same_neighbours"] = float((gpu_ids == cpu_ids).mean())
    return out


def similarity_bench(n: int, k: int, seed: int, device: str, folder: Path | None = None) -> dict:
    """similarity_tiles, similarity_matrix and a float16 .npy export over n unit vectors: numpy on
    the CPU vs torch on the GPU."""
    from vecsim.similarity import similarity_matrix, similarity_tiles

    rng = np.random.default_rng([seed, 4])
    v = rng.standard_normal((n, k)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    devices = ["cpu"] + ([device] if device.startswith("cuda") else [])
    if device.startswith("cuda"):
        for _ in similarity_tiles(v[:512], device=device):  # warm-up: cuBLAS handle
            pass
    out: dict = {"n": n, "dim": k, "entries": n * n}
    for dev in devices:
        t0 = time.perf_counter()
        tiles, checksum = 0, 0.0
        for _r0, _r1, block in similarity_tiles(v, device=dev):
            tiles += 1
            checksum += float(block[:, 0].sum())  # touch each tile, as a consumer would
        out[f"tiles_{dev}_s"] = time.perf_counter() - t0
        out["tiles"] = tiles
        t0 = time.perf_counter()
        similarity_matrix(v, device=dev)
        out[f"matrix_{dev}_s"] = time.perf_counter() - t0
    if len(devices) == 2:
        first_cpu = next(similarity_tiles(v, device="cpu"))[2]
        first_gpu = next(similarity_tiles(v, device=device))[2]
        out["max_abs_diff_first_tile"] = float(np.abs(first_cpu - first_gpu).max())
    out.update(export_bench(v, devices, folder))
    return out


# -- main ---------------------------------------------------------------------------------


def versions(device: str) -> dict:
    import torch
    import torchvision

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_fp32_precision"] = torch.get_float32_matmul_precision()
    else:
        info["device"] = "cpu (no CUDA GPU: torch.cuda.is_available() is False)"
    return info


def main(argv=None) -> int:
    import torch

    from vecsim.extract import resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.startswith("cuda")
    if not on_gpu:
        print("No CUDA GPU (or --device cpu): running on the CPU with small defaults "
              f"{CPU_DEFAULTS} — a smoke test, not a GPU measurement.\n", flush=True)
    for key, value in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train = min(args.train, args.n)
    started = time.perf_counter()
    info = versions(device)
    print("vecsim GPU benchmark: DenseNet121, hooks at " + ", ".join(LAYERS))
    for key, value in info.items():
        print(f"  {key:>22}: {value}")

    t0 = time.perf_counter()
    model, weights = load_densenet(args.weights)
    model = model.to(device)
    images = make_images(args.n, args.size, args.seed, device)
    eval_images = make_images(args.eval_n, args.size, args.seed + 1, device)
    setup_s = time.perf_counter() - t0
    print(f"  {'model weights':>22}: {weights}")
    print(f"  {'settings':>22}: n={args.n} size={args.size} batch={args.batch} train={args.train} "
          f"eval_n={args.eval_n} sketch_dim={args.sketch_dim or 'auto'} dim={args.dim} (setup {setup_s:.1f} s)\n", flush=True)

    results: dict = {"versions": info, "weights": weights, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    runs: list[list] = []

    def record(name, seconds, top, resident, n=args.n, extra=""):
        ips = n / seconds
        results.setdefault("runs", {})[name] = {"seconds": seconds, "images_per_s": ips, "peak_bytes": top,
                                                "resident_bytes": resident}
        runs.append([name, f"{ips:,.1f}", f"{seconds:.2f}", gib(top),
                     gib(None if top is None else top - resident), extra])
        print(f"  … {name}: {ips:,.1f} images/s", flush=True)
        return ips

    full = record("(a) bare forward, whole network", *bare_forward(model, images, args.batch, device))
    cut = record("(a') bare forward, cut after transition3", *truncated_forward(model, images, args.batch, device))
    reducers, shapes, fit_pass_s, fit_s = fit_reducers(model, images, args, device)
    dims = {layer: reducers[layer].dim for layer in LAYERS}
    results["layers"] = {layer: {"shape": list(shapes[layer]), "units": reducers[layer].units,
                                 "dim_in": reducers[layer].dim_in, "dim": dims[layer],
                                 "energy_kept": reducers[layer].report.energy_kept} for layer in LAYERS}
    record("fit pass: pool+sketch, sketches to host", fit_pass_s, None, 0, n=args.train,
           extra=f"fit (CPU) {fit_s:.2f} s")
    seconds, top, resident, per_image = hooked_forward(model, reducers, images, args.batch, device)
    hooked = record("(b) vecsim hooks: pool→sketch→proj→norm", seconds, top, resident,
                    extra=f"{per_image / 1024:.1f} KiB/img to host")
    results["runs"]["(b) vecsim hooks: pool→sketch→proj→norm"]["host_bytes_per_image"] = per_image
    ratios = {"hooked_over_bare_full": hooked / full, "hooked_over_bare_cut": hooked / cut}
    if on_gpu and not args.no_half:
        half = copy.deepcopy(model).half()
        half_images = images.half()
        hfull = record("(a) bare forward, whole network, fp16", *bare_forward(half, half_images, args.batch, device))
        seconds, top, resident, _ = hooked_forward(half, reducers, half_images, args.batch, device)
        hhooked = record("(b) vecsim hooks, fp16 model", seconds, top, resident)
        ratios["fp16_hooked_over_fp16_bare_full"] = hhooked / hfull
        del half, half_images
    results["ratios"] = ratios

    print()
    print(table(["run", "images/s", "seconds", "peak GiB", "peak-resident GiB", "note"], runs,
                title=f"Throughput on {info['device']} ({args.n} images {args.size}×{args.size}, batch {args.batch})"))
    print(f"\n  (b)/(a) whole network: {ratios['hooked_over_bare_full']:.2f}×   "
          f"(b)/(a') cut network: {ratios['hooked_over_bare_cut']:.2f}×"
          + (f"   fp16 (b)/(a): {ratios['fp16_hooked_over_fp16_bare_full']:.2f}×" if "fp16_hooked_over_fp16_bare_full" in ratios else ""))
    print("  resident = model + generated images on the GPU before each timed loop\n")
    print(table(["layer", "output shape", "units", "sketch", "dim", "energy kept (train)"],
                [[short(layer), "×".join(map(str, shapes[layer])), f"{reducers[layer].units:,}",
                  f"{reducers[layer].dim_in:,}", dims[layer], f"{reducers[layer].report.energy_kept:.4f}"]
                 for layer in LAYERS], title="Layers"), flush=True)

    if on_gpu:
        reset_peak(device)
    inside = images[: min(args.eval_n, args.train)]
    fid = {"fresh": fidelity(model, reducers, eval_images, device),
           "in training sample": fidelity(model, reducers, inside, device, training=True)}
    results["fidelity"] = fid
    results["fidelity_peak_bytes"] = peak(device)
    print()
    print(table(["layer", "images", "pairs", "exact cos mean±sd", "ρ sketch", "max|Δ| sketch", "ρ reduced",
                 "max|Δ| reduced", "mean|Δ| reduced"],
                [[short(layer), which, r["pairs"], f"{r['exact_cos_mean']:.3f}±{r['exact_cos_std']:.3f}",
                  f"{r['sketch_spearman']:.4f}", f"{r['sketch_max_abs_dcos']:.4f}", f"{r['reduced_spearman']:.4f}",
                  f"{r['reduced_max_abs_dcos']:.4f}", f"{r['reduced_mean_abs_dcos']:.4f}"]
                 for which, rows in fid.items() for layer, r in rows.items()],
                title=f"(c) Fidelity: exact raw cosines (float64 Gram on the device) vs sketch ({args.sketch_dim or 'automatic'}) and "
                      f"reduced vectors, on {args.eval_n} fresh images (as a query image or `vecsim add` gets) and on "
                      f"{len(inside)} of the {args.train} training images (as an indexed stimulus set up to the "
                      "training sample's size gets)"
                      + (f"; peak GPU {gib(results['fidelity_peak_bytes'])} GiB" if on_gpu else "")), flush=True)

    del model, images, eval_images, reducers, inside
    if on_gpu:
        torch.cuda.empty_cache()
    sim = similarity_bench(args.sim_n, args.sim_dim, args.seed, device, args.tmp)
    results["similarity"] = sim
    rows = []
    for what in ("tiles", "matrix"):
        cpu_s = sim[f"{what}_cpu_s"]
        gpu_s = sim.get(f"{what}_{device}_s") if on_gpu else None
        rows.append([f"similarity_{what}" + (f" ({sim['tiles']} tiles)" if what == "tiles" else " (N×N in RAM)"),
                     f"{cpu_s:.2f}", "n/a" if gpu_s is None else f"{gpu_s:.2f}",
                     "n/a" if gpu_s is None else f"{cpu_s / gpu_s:.2f}×"])
    cpu_s, gpu_s = sim["export_cpu_s"], sim.get(f"export_{device}_s") if on_gpu else None
    rows.append([f"export_similarity .npy float16 ({sim['export_mb']:,.0f} MB)", f"{cpu_s:.2f}",
                 "n/a" if gpu_s is None else f"{gpu_s:.2f}", "n/a" if gpu_s is None else f"{cpu_s / gpu_s:.2f}×"])
    print()
    print(table(["call", "cpu numpy s", f"{device} s", "speed-up"], rows,
                title=f"(d) Similarities of N={args.sim_n:,} unit vectors, dim {args.sim_dim} "
                      f"({sim['entries'] / 1e6:,.0f} M entries; tiles and matrix float32)"))
    if "max_abs_diff_first_tile" in sim:
        print(f"  max |gpu - cpu| on the first tile: {sim['max_abs_diff_first_tile']:.2e}; "
              f"exported files: max |gpu - cpu| {sim['export_max_abs_diff']:.2e}, gpu file symmetric: "
              f"{sim['export_symmetric']}")
    plain = sim["plain_write_s"]
    print(f"  export rate against a plain sequential write of the same {sim['export_mb']:,.0f} MB to the same "
          f"folder ({plain:.2f} s, fsync'd like the export): cpu {plain / cpu_s:.2f}×"
          + ("" if gpu_s is None else f", {device} {plain / gpu_s:.2f}×"))
    nn = neighbors_bench(args.nn_n, args.sim_dim, 10, args.seed, device)
    results["neighbors"] = nn
    if nn is None:
        print("\n(e) neighbors: skipped (faiss is not importable)")
    else:
        gpu_s = nn.get(f"torch_{device}_s")
        print(f"\n(e) All-vs-all exact 10-NN of N={nn['n']:,} unit vectors, dim {nn['dim']} (`vecsim neighbors` on an "
              f"exact index): FAISS flat scan on the CPU ({nn['faiss_threads']} threads) {nn['faiss_cpu_s']:.2f} s"
              + ("" if gpu_s is None else f", torch on {device} {gpu_s:.2f} s ({nn['faiss_cpu_s'] / gpu_s:.1f}×), "
                 f"same neighbours {nn['same_neighbours']:.4%}"))
    total = time.perf_counter() - started
    results["total_seconds"] = total
    print(f"\nTotal {total:.1f} s on {info['device']}.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"Results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
