"""Benchmark: a `vecsim index` job killed three times, then rerun until it succeeds, against one
uninterrupted run of the same command.

The scenario (issue 19): a stimulus set that lies entirely inside the training sample (N images,
fewer than the default --train-size of 1,000), DenseNet121 at --size px, two layers, CPU, default
settings otherwise. First the restart floor S, twice (the first warms the caches): a process
that only imports torch and torchvision (as vecsim does, without torch._dynamo) and builds the
model, what every rerun pays before its first image whatever vecsim does. Then one timed uninterrupted run (T, wall clock of the
process, the baseline). Then the same command is started on a fresh store and SIGKILLed at
20%, 50% and 80% of T, each time measured from the start of that run (a run that finishes before
its kill is not killed), and then rerun until it exits 0. The figure is the wall time of all
these runs together ÷ T; target ≤ 1.3. Then the same command once more on the complete store
(a scheduler that requeues a job reruns it whether or not it had finished): its time is printed,
and the ratio with it. Also timed: a fresh run stopped right after its first scratch chunk is on
disk (S_commit: the restart floor, vecsim's set-up and the first slice of images). Every run pays
the restart floor S before it can keep any work, so a run killed at fraction f of T loses at
least min(f·T, S): the ratio is at least 1 + min(0.2, S/T) + min(0.5, S/T) when the third run
finishes before its kill (and at least 1.5 + S/T when it does not); the script prints that bound.
The final store is checked against the uninterrupted one (same ids, vectors to 1e-5).
With --repeats N the scenario runs N times, each with its own uninterrupted run (machine speed
drifts), and the ratios and their median are printed: whether the third run finishes before its
kill depends on tenths of a second, so one run can land either side.

Random-init weights (--weights none): pretrained weights cannot be downloaded here, and the
forward pass costs the same either way.

Run with:
    PYTHONPATH=. python benchmarks/bench_resume.py [--images 200] [--size 160] [--repeats 1]
        [--model densenet121] [--layers features.transition1.norm,features.transition2.norm] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FRACTIONS = (0.2, 0.5, 0.8)
TARGET = 1.3


def make_images(root: Path, n: int, side: int = 200) -> None:
    """``n`` textured colour JPEGs (deterministic), in three folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:side, 0:side]
        pattern = np.sin((xx * (i % 7 + 1) + yy * (i % 5 + 1)) / 9.0)[..., None]
        img = np.clip(rng.integers(0, 255, 3) + 70 * pattern + rng.normal(0, 30, (side, side, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"img_{i:04d}.jpg", quality=90)


def command(images: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "vecsim", "index", str(images), "--model", args.model, "--weights", "none",
            "--size", str(args.size), "--layers", args.layers, "--out", str(out), "-q"]


def timed(cmd: list[str], kill_after: float | None = None, env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, return code, stdout) of ``cmd``; SIGKILLed after ``kill_after`` s if still running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"run failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return seconds, proc.returncode, stdout


def state(out: Path) -> str:
    """What a stopped run left: the store's status and how far the training pass got."""
    from vecsim.store import Store

    if not (out / "vecsim.json").exists():
        return "no store yet"
    info = Store.open(out).info()
    progress = (info.get("progress") or {}).get("training_pass", {})
    if "forwarded" in progress:
        return f"{info['status']}, training pass {progress['forwarded']}/{progress['planned']} in the scratch"
    return f"{info['status']}, {info['counts']['stimuli']} stimuli committed"


def compare(out: Path, reference: Path) -> float:
    from vecsim.store import Store

    a, b = Store.open(out), Store.open(reference)
    worst = 0.0
    for layer in b.layers:
        ids, vecs = a.vectors(layer)
        ref_ids, ref_vecs = b.vectors(layer)
        if ids.tolist() != ref_ids.tolist():
            raise SystemExit(f"{layer}: the resumed store holds other stimuli than the uninterrupted one")
        worst = max(worst, float(np.abs(vecs - ref_vecs).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--layers", default="features.transition1.norm,features.transition2.norm")
    parser.add_argument("--dir", default=None, help="folder for the images and stores (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=1, help="run the killed-and-rerun scenario this many times")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images)
        print(f"{args.images} images (all in the training sample), {args.model} at {args.size} px, "
              f"layers {args.layers}, cpu, {os.cpu_count()} cores")
        # os._exit: vecsim skips the interpreter's teardown too (cli.entry)
        # what vecsim imports, the way it imports it (torchvision without torch._dynamo)
        floor = [sys.executable, "-c", "import os, torch; from vecsim.models.tvimport import import_torchvision; "
                 f"import_torchvision().models.{args.model}(); os._exit(0)"]
        warm, floor_seconds = timed(floor)[0], timed(floor)[0]
        print(f"restart floor S (imports, model build): {floor_seconds:.1f} s (first, warming the caches: {warm:.1f} s)")
        # vecsim's own restart cost: a fresh run of the command, stopped by itself right after
        # its first scratch chunk is on disk (the crash tests' kill point)
        first = timed(command(tmp / "images", tmp / "first-commit", args), env={"VECSIM_KILL_AT": "scratch-chunk:1"})[0]
        print(f"first scratch commit of a fresh run after {first:.1f} s (S_commit: S, vecsim's set-up and the first slice)")
        ratios = []
        for repeat in range(args.repeats):  # each with its own uninterrupted run: machine speed drifts
            if args.repeats > 1:
                print(f"-- repeat {repeat + 1} of {args.repeats}")
            ratios.append(scenario(tmp, repeat, args, floor_seconds, first))
        if args.repeats > 1:
            print(f"ratios {[round(r, 2) for r in ratios]}: median {float(np.median(ratios)):.2f}, "
                  f"{sum(r <= TARGET for r in ratios)} of {len(ratios)} within the target <= {TARGET}")


def scenario(tmp: Path, repeat: int, args, floor_seconds: float, first: float) -> float:
    """One uninterrupted run T, then the same command killed at 20/50/80% of T and rerun until
    complete, then once more; the ratio (all runs ÷ T)."""
    reference = tmp / f"uninterrupted{repeat}"
    uninterrupted, _, _ = timed(command(tmp / "images", reference, args))
    share = floor_seconds / uninterrupted
    bound = 1 + min(FRACTIONS[0], share) + min(FRACTIONS[1], share)
    print(f"uninterrupted run (T): {uninterrupted:.1f} s; S/T = {share:.2f}, S_commit/T = {first / uninterrupted:.2f}; "
          f"each of the first two kills loses at least min(f·T, S), so the ratio is at least "
          f"1 + min(0.2, S/T) + min(0.5, S/T) = {bound:.2f} (when the third run finishes before its kill)")
    out = tmp / f"interrupted{repeat}"
    total, runs = 0.0, 0
    for fraction in FRACTIONS:
        seconds, code, _ = timed(command(tmp / "images", out, args), kill_after=fraction * uninterrupted)
        total += seconds
        runs += 1
        what = "killed" if code == -signal.SIGKILL else "finished before its kill"
        print(f"run {runs}: {what} at {seconds:.1f} s ({fraction:.0%} of T) -> {state(out)}")
    while state(out).split(",")[0] != "complete":
        seconds, code, stdout = timed(command(tmp / "images", out, args))
        total += seconds
        runs += 1
        print(f"run {runs}: rerun, {seconds:.1f} s, exit {code}: {stdout.strip().splitlines()[0]}")
    worst = compare(out, reference)
    ratio = total / uninterrupted
    print(f"all {runs} runs: {total:.1f} s vs uninterrupted {uninterrupted:.1f} s: ratio {ratio:.2f} "
          f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"final store vs uninterrupted: same ids, max |vector difference| {worst:.2e}")
    seconds, code, stdout = timed(command(tmp / "images", out, args))
    print(f"the same command once more: {seconds:.1f} s, exit {code}: {stdout.strip()}; "
          f"ratio with it {(total + seconds) / uninterrupted:.2f}")
    return ratio

if __name__ == "__main__":
    main()
