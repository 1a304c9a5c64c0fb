"""`vecsim index --ray` and `vecsim neighbors --ray`: on a two-node Ray cluster on this machine the
store equals the one-process store, survives a killed actor and a killed driver, and leaves no
Ray process behind. Ray starts slowly: one module-scoped cluster, few runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_set

LAYERS = "layer1.0.relu,layer3"  # a module called twice per pass (captured at its last call), a block


def raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def run(*args, env_extra: dict | None = None, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("VECSIM_KILL_AT", "VECSIM_RAY_KILL_ONCE", "RAY_ADDRESS")}
    # VECSIM_RAY_FILL_MIN: IVF indexes of these few vectors are filled by parallel tasks too
    env.update({"RAY_AUTH_MODE": "disabled", "VECSIM_RAY_FILL_MIN": "4", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "vecsim", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# -- without Ray ---------------------------------------------------------------------------------

def test_ray_options_need_ray_and_help_does_not_import_it():
    code = ("import sys\nfrom vecsim.cli import main\nsys.argv=['vecsim','index','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('ray', 'torch', 'lancedb') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out and "--ray-address" in out
    bad = run("neighbors", "nowhere", "--layer", "x", "--out", "x.parquet", "--ray-workers", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "go with --ray" in bad.stderr, bad.stderr


# -- on Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each: two actors, one per node."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    before = raylets()
    small = {"num_cpus": 1, "object_store_memory": 96 * 2**20}
    made = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    try:
        made.add_node(**small)
        made.wait_for_nodes()
        yield made
    finally:
        made.shutdown()
    assert raylets() == before  # every Ray process the cluster started has ended


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A stimulus set with one broken file, a checkpoint the workers load (a torchvision name
    with --checkpoint), and the one-process store of the command the tests run with --ray."""
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("ray")
    images = make_image_set(root / "stimuli", per_class=10)  # 30 images
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    torch.manual_seed(3)
    checkpoint = root / "trained.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), checkpoint)
    args = [images, "--model", "resnet18", "--checkpoint", checkpoint, "--layers", LAYERS, "--size", "48",
            "--dim", "8", "--train-size", "12", "--eval-size", "16", "--batch-size", "4", "--chunk-size", "6",
            "--drop-zero-units", "--index", "IVF2,Flat", "--labels-from-folders", "-q"]
    reference = root / "one-process"
    done = run("index", *args, "--out", reference)
    assert done.returncode == 0, done.stderr
    return {"root": root, "args": args, "reference": reference}


def index_on(cluster, job, out: Path, env_extra: dict | None = None):
    return run("index", *job["args"], "--out", out, "--ray", "--ray-address", cluster.address, env_extra=env_extra)


def assert_same_index(index, reference, vecs) -> None:
    """The same vectors under the same ids in each inverted list (their order within a list
    follows the order the chunks were committed in)."""
    import faiss

    ivf, ref_ivf = faiss.extract_index_ivf(index), faiss.extract_index_ivf(reference)
    assert ivf.ntotal == ref_ivf.ntotal == len(vecs) and ivf.nlist == ref_ivf.nlist
    for lst in range(ivf.nlist):
        ids, ref_ids = (faiss.rev_swig_ptr(x.invlists.get_ids(lst), x.invlists.list_size(lst)).copy()
                        for x in (ivf, ref_ivf))
        assert sorted(ids.tolist()) == sorted(ref_ids.tolist())


def assert_same_store(path: Path, reference_path: Path) -> None:
    """Same ids, vectors to 1e-5, transforms, evaluation Gram and failures (with their runs);
    one row per stimulus; the same runs."""
    from vecsim.store import Store

    assert_same_content(path, reference_path)
    store, reference = Store.open(path), Store.open(reference_path)
    for layer in reference.layers:
        assert store.layer_info(layer)["reducer"] == reference.layer_info(layer)["reducer"]

    def failures(s):
        return sorted(s.failures().to_pylist(), key=lambda f: (f["id"], f["layer"] or ""))

    assert failures(store) == failures(reference)
    assert store.runs().column("indexed").to_pylist() == reference.runs().column("indexed").to_pylist()


@pytest.fixture(scope="module")
def ray_store(cluster, job):
    out = job["root"] / "on-ray"
    done = index_on(cluster, job, out)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.mark.ray
@pytest.mark.slow
def test_ray_store_equals_the_one_process_store_and_both_nodes_worked(cluster, job, ray_store):
    out, done = ray_store
    assert_same_store(out, job["reference"])
    # "ray: 2 node(s) forwarded 30 stimuli (...)": the checkpoint was loaded on both nodes
    line = next(line for line in done.stderr.splitlines() if line.startswith("ray:"))
    assert line.startswith("ray: 2 node(s) forwarded 30 stimuli"), done.stderr
    line, filled = line.split("; ")
    assert filled == "IVF indexes filled by 2 parallel tasks"
    counts = [int(part.split(": ")[1]) for part in line.split("(", 1)[1].rstrip(")").split(", ")]
    assert len(counts) == 2 and min(counts) > 0


@pytest.mark.ray
@pytest.mark.slow
def test_an_actor_killed_mid_run_has_its_chunk_redone(cluster, job, tmp_path):
    marker = tmp_path / "killed"
    done = index_on(cluster, job, tmp_path / "store", {"VECSIM_RAY_KILL_ONCE": f"ray-reduce:{marker}"})
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # an actor was killed after writing its fragments, before returning them
    assert_same_store(tmp_path / "store", job["reference"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_is_finished_by_the_same_command(cluster, job, tmp_path):
    out = tmp_path / "store"
    killed = index_on(cluster, job, out, {"VECSIM_KILL_AT": "chunk:4"})  # pass 2's 2nd chunk (pass 1 commits 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = json.loads((out / "vecsim.json").read_text())
    assert manifest["status"] == "indexing"
    finished = index_on(cluster, job, out)
    assert finished.returncode == 0, finished.stderr
    assert "resumed" in finished.stdout
    assert_same_content(out, job["reference"])


def assert_same_content(path: Path, reference_path: Path) -> None:
    """A resumed store's content equals the reference (its runs and the run numbers of its
    failures are its own: two runs wrote it)."""
    from vecsim.store import Store

    store, reference = Store.open(path), Store.open(reference_path)
    assert store.complete
    assert store.stimuli().equals(reference.stimuli())
    for layer in reference.layers:
        ids, vecs = store.vectors(layer)
        ref_ids, ref_vecs = reference.vectors(layer)
        assert ids.tolist() == ref_ids.tolist()
        assert sorted(store.vectors(layer, committed_only=False)[0].tolist()) == ref_ids.tolist()
        np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
        assert (store.layer_dir(layer) / "transform.faiss").read_bytes() == \
            (reference.layer_dir(layer) / "transform.faiss").read_bytes()
        assert_same_index(store.index(layer), reference.index(layer), vecs)
        np.testing.assert_allclose(store.eval_subset(layer)["gram"], reference.eval_subset(layer)["gram"], rtol=1e-5)

    def failures(s):
        return sorted((f["id"], f["path"], f["stage"], f["layer"] or "") for f in s.failures().to_pylist())

    assert failures(store) == failures(reference) and len(failures(reference)) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_killed_inside_the_training_pass_resumes_from_its_scratch(cluster, job, tmp_path):
    """The training results the actors returned are committed to the scratch in item order:
    a rerun reads them back and the store equals the one-process store."""
    out = tmp_path / "store"
    killed = index_on(cluster, job, out, {"VECSIM_KILL_AT": "scratch-chunk:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / "vecsim.json").read_text())["status"] == "fitting"
    assert len(list((out / "scratch" / "training").glob("chunk_*.chunk"))) == 1
    finished = index_on(cluster, job, out)
    assert finished.returncode == 0, finished.stderr
    assert not (out / "scratch").exists()
    assert_same_content(out, job["reference"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_factory_model_spec_loads_on_every_worker(cluster, job, tmp_path):
    """A model from the user's own file (file.py:factory, with --checkpoint): the workers load
    it from the shared path, check its digest, and the store equals the one-process store."""
    nets = tmp_path / "nets.py"
    nets.write_text("import torchvision\n\n\ndef build():\n"
                    "    return torchvision.models.resnet18(weights=None, num_classes=5)\n")
    args = [*job["args"]]
    args[args.index("resnet18")] = f"{nets}:build"
    reference = tmp_path / "one-process"
    done = run("index", *args, "--out", reference)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "on-ray"
    done = run("index", *args, "--out", out, "--ray", "--ray-address", cluster.address)
    assert done.returncode == 0, done.stderr
    assert "ray: 2 node(s) forwarded 30 stimuli" in done.stderr
    assert_same_store(out, reference)
    assert Path(json.loads((out / "vecsim.json").read_text())["model"]["file"]) == nets


@pytest.mark.ray
@pytest.mark.slow
def test_neighbors_on_a_local_cluster_write_the_one_process_file(cluster, job, ray_store, tmp_path):
    """No address: vecsim starts a local cluster (2 CPUs) and shuts it down, leaving no Ray process."""
    out, _ = ray_store
    one = run("neighbors", out, "--layer", "layer3", "-k", "4", "--out", tmp_path / "one.parquet", "-q",
              "--device", "cpu")
    assert one.returncode == 0, one.stderr
    before = raylets()
    spread = run("neighbors", out, "--layer", "layer3", "-k", "4", "--out", tmp_path / "ray.parquet", "-q",
                 "--device", "cpu", "--ray", "--ray-workers", "2")
    assert spread.returncode == 0, spread.stderr
    assert raylets() == before
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "ray.parquet"]  # no parts left


def test_a_worker_that_cannot_see_the_store_fails_the_job_in_one_line(tmp_path, monkeypatch):
    """The shared-file-system check, with Ray's calls run in this process: one actor sees the
    folders at another path (as a node that does not mount them would)."""
    from vecsim import distributed
    from vecsim.errors import StoreError

    class Here:  # an actor handle whose method.remote(...) runs the method here
        def __init__(self, actor, elsewhere: bool):
            self.actor, self.elsewhere = actor, elsewhere

        def __getattr__(self, name):
            method = getattr(self.actor, name)
            if name == "sees" and self.elsewhere:
                method = lambda probes, token: self.actor.sees([str(tmp_path / "other" / Path(p).name) for p in probes], token)  # noqa: E731
            return type("Method", (), {"remote": staticmethod(method)})

    class FakeRay:
        made = 0

        def cluster_resources(self):
            return {"CPU": 2.0}

        def remote(self, **options):
            assert options["max_restarts"] == -1 and options["max_task_retries"] == -1 and options["num_cpus"] == 1

            def wrap(cls):
                def make(*args):
                    FakeRay.made += 1
                    return Here(cls(*args), elsewhere=FakeRay.made == 2)
                return type("Remote", (), {"remote": staticmethod(make)})
            return wrap

        def get(self, refs):
            return refs

        def kill(self, actor, no_restart):
            pass

    monkeypatch.setattr(distributed, "_node_id", lambda: "0123456789abcdef")
    store = tmp_path / "store"
    store.mkdir()
    pool = distributed.ActorPool(FakeRay(), distributed._Actor, (), 1, [store])  # one actor: it sees the store
    assert len(pool.actors) == 1
    with pytest.raises(StoreError, match=r"node 0123456789ab cannot see .* docs/scale\.md") as raised:
        distributed.ActorPool(FakeRay(), distributed._Actor, (), None, [store])  # two actors (2 CPUs)
    assert f"cannot see {store}:" in str(raised.value) and "\n" not in str(raised.value)
    assert list(store.iterdir()) == []  # the probe files are removed
