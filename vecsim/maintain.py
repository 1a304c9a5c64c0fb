"""Keeping a store honest and growing it: ``vecsim verify`` and ``vecsim add``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from vecsim.errors import StimulusSetError, StoreError
from vecsim.stimuli import file_sha256
from vecsim.store import NORM_SLACK


def faiss_ids(index) -> np.ndarray | None:
    """The ids an index holds, when its type exposes them (IDMap, IVF lists); else None."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)
                 if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return None


def verify(store, rehash: bool = False) -> list[str]:
    """Every problem found, one line each (an empty list: the store is consistent).

    Checks that FAISS ids, Lance rows and stimuli agree per layer, that dims and
    transform hashes match the manifest, that no vector is NaN or off the unit sphere
    (all-zero vectors are allowed), and with ``rehash`` that the stimulus files still
    have their recorded sha256, and the model checkpoint and a factory's file (if any) too.
    """
    problems: list[str] = []
    manifest = store.manifest
    if manifest.get(PENDING_ADD):
        problems.append(f"an add (run {manifest[PENDING_ADD]['run']}) stopped before it finished: its stimuli from "
                        f"id {manifest[PENDING_ADD]['first_id']} on are partly written; the next `vecsim add` "
                        "removes them first (rerun the add)")
    if manifest.get("status") != "complete":
        problems.append(f"status is {manifest.get('status')!r}, not complete: rerun the index command to resume it")
    try:
        stimuli = store.stimuli()
    except StoreError as exc:
        return problems + [str(exc)]
    ids = stimuli.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        problems.append(f"stimuli table has {len(ids) - len(np.unique(ids))} duplicate ids")
    if manifest.get("counts", {}).get("stimuli") not in (None, len(ids)):
        problems.append(f"manifest counts {manifest['counts']['stimuli']} stimuli, the table holds {len(ids)}")
    for layer in store.layers:
        problems += [f"{layer}: {p}" for p in _verify_layer(store, layer, ids)]
    if rehash:
        problems += _rehash(store, stimuli)
        model = manifest.get("model", {})
        for what, key in (("checkpoint", "checkpoint"), ("factory file", "file")):
            if not (model.get(key) and model.get(f"{key}_sha256")):
                continue
            path = Path(model[key])
            if not path.is_file():
                problems.append(f"the model {what} {path} is not there (query --image and add need it)")
            elif file_sha256(path) != model[f"{key}_sha256"]:
                problems.append(f"the model {what} {path} changed since the store was built (its sha256 differs): "
                                "new images would not be comparable; restore that file")
    return problems


def _verify_layer(store, layer: str, stimulus_ids: np.ndarray) -> list[str]:
    problems = []
    entry = store.layer_info(layer)
    if not entry.get("reducer", {}).get("fit"):  # killed while fitting: nothing of this layer to check yet
        return ["not fitted yet"] if store.manifest.get("status") == "complete" else []
    dim = int(entry["reducer"]["fit"]["dim"])
    layer_dir = store.layer_dir(layer)
    try:
        vec_ids, vecs = store.vectors(layer, committed_only=False)
    except Exception as exc:  # a damaged table must be reported, not end the check
        return [f"vectors table unreadable ({type(exc).__name__})"]
    if vecs.shape[1] != dim:
        problems.append(f"vectors have {vecs.shape[1]} dims, the manifest says {dim}")
    if len(vec_ids) != len(np.unique(vec_ids)):
        problems.append(f"{len(vec_ids) - len(np.unique(vec_ids))} duplicate vector rows")
    missing, extra = np.setdiff1d(stimulus_ids, vec_ids), np.setdiff1d(vec_ids, stimulus_ids)
    if len(missing) or len(extra):
        problems.append(f"{len(missing)} stimuli without a vector, {len(extra)} vectors without a stimulus")
    bad = ~np.isfinite(vecs).all(axis=1)
    if bad.any():
        problems.append(f"{int(bad.sum())} vectors contain NaN or Inf (ids {vec_ids[bad][:5].tolist()})")
    norms = np.linalg.norm(np.where(np.isfinite(vecs), vecs, 0), axis=1)
    off = ~bad & (norms > 1 + NORM_SLACK)
    if off.any():
        problems.append(f"{int(off.sum())} vectors are longer than unit norm (ids {vec_ids[off][:5].tolist()}); "
                        "a projected unit vector cannot be")
    try:
        index = store.index(layer)
        if index.d != dim:
            problems.append(f"index.faiss has {index.d} dims, the manifest says {dim}")
        if index.ntotal != len(stimulus_ids):
            problems.append(f"index.faiss holds {index.ntotal} vectors for {len(stimulus_ids)} stimuli")
        held = faiss_ids(index)
        if held is not None and not np.array_equal(np.sort(held), np.sort(stimulus_ids)):
            problems.append("index.faiss ids differ from the stimulus ids")
    except StoreError as exc:
        problems.append(str(exc))
    transform = layer_dir / "transform.faiss"
    recorded = entry.get("transform_sha256")
    if not transform.is_file():
        problems.append("transform.faiss is missing")
    elif recorded and file_sha256(transform) != recorded:
        problems.append("transform.faiss does not have the sha256 recorded in the manifest")
    else:
        try:
            reducer = store.reducer(layer)
            if reducer.dim != dim:
                problems.append(f"transform.faiss maps to {reducer.dim} dims, the manifest says {dim}")
        except Exception as exc:
            problems.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return problems


def _rehash(store, stimuli) -> list[str]:
    root = Path(store.manifest["source"]["root"])
    if not root.is_dir():
        return [f"cannot rehash: the stimulus folder {root} is not there"]
    changed, missing = [], []
    for path, sha in zip(stimuli.column("path").to_pylist(), stimuli.column("sha256").to_pylist()):
        full = Path(path) if Path(path).is_absolute() else root / path
        if not full.is_file():
            missing.append(path)
        elif file_sha256(full) != sha:
            changed.append(path)
    out = []
    if missing:
        out.append(f"{len(missing)} stimulus files are missing (e.g. {missing[0]})")
    if changed:
        out.append(f"{len(changed)} stimulus files changed since indexing (e.g. {changed[0]})")
    return out


def add(store_path, sources: list[str], *, label: str | None = None, device: str = "auto",
        batch_size: int = 32, workers: int | None = None, progress: bool = True) -> dict:
    """Add images (files or folders) to a complete store through its fitted transforms.

    No refit: the transforms, the evaluation subset and reports stay as they were, and the
    manifest records which stimuli came later. Files whose sha256 is already in the store
    are skipped.
    """
    from tqdm import tqdm

    from vecsim.extract import LayerCapture, iter_decoded, resolve_device
    from vecsim.stimuli import Failure
    from vecsim.store import Store, StoreWriter, now

    started = time.time()
    writer = StoreWriter.reopen(Path(store_path))  # the lock first: a store being written is busy, not unfinished
    try:
        if writer.manifest.get("status") != "complete":
            raise StoreError(f"{store_path} is not complete; finish it first (`vecsim index --resume {store_path}`)")
        store = Store.open(store_path)
        if writer.manifest.get(PENDING_ADD):
            if progress:
                print(f"rolling back an interrupted add (run {writer.manifest[PENDING_ADD]['run']}) first",
                      file=sys.stderr)
            roll_back_add(writer)
            store = Store.open(store_path)  # the rolled-back tables and indexes
        manifest = writer.manifest
        root = Path(manifest["source"]["root"])
        candidates, failures = _candidates(sources, root)
        stimuli = store.stimuli()
        known = set(stimuli.column("sha256").to_pylist())
        taken = set(stimuli.column("path").to_pylist())
        hashed, skipped = [], 0
        for path in candidates:
            sha = file_sha256(path)
            if sha in known:  # the same bytes are already a stimulus (or earlier in this add)
                skipped += 1
                continue
            if _stored_path(path, root) in taken:  # same name, other bytes: paths must stay unique
                failures.append(Failure(None, _stored_path(path, root), "discover", "a stimulus with this path is "
                                        "already in the store (with other content); copy the file under a new name "
                                        "to add it"))
                continue
            known.add(sha)
            hashed.append(path)
        next_id = writer.next_stimulus_id()
        items = [(next_id + i, _stored_path(p, root)) for i, p in enumerate(sorted(hashed, key=str))]
        run = writer.next_run_id()
        device = resolve_device(device)
        model, preprocessing = store.load_model(device)
        reducers = {layer: store.reducer(layer, device) for layer in store.layers}
        vectors: dict[str, list] = {layer: [] for layer in store.layers}
        rows: list[dict] = []
        bad = list(failures)
        by_id = dict(items)
        with LayerCapture(model, store.layers, reducers) as capture, \
                tqdm(total=len(items), unit="img", desc="adding", disable=not progress, file=sys.stderr) as bar:
            for batch in iter_decoded(root, items, preprocessing, batch_size, workers, manifest["config"].get("max_pixels", 0)):
                bad += batch.failures
                bar.update(len(batch.ids) + len(batch.failures))
                if batch.images is None:
                    continue
                results = capture.run(batch.images.to(device))
                ok = np.ones(len(batch.ids), dtype=bool)
                for layer, (_, _, finite) in results.items():
                    ok &= finite.cpu().numpy()
                for layer, (vecs, norms, _) in results.items():
                    vectors[layer].append((np.array(batch.ids)[ok], vecs.cpu().numpy()[ok], norms.cpu().numpy()[ok]))
                for pos, stim_id in enumerate(batch.ids):
                    if ok[pos]:
                        width, height = batch.sizes[pos]
                        rows.append({"id": stim_id, "path": by_id[stim_id], "sha256": batch.sha256[pos], "label": label,
                                     "width": width, "height": height, "input_sha256": batch.input_sha256[pos]})
        chunk = {layer: tuple(np.concatenate([p[i] for p in parts]) if parts else np.zeros((0,)) for i in range(3))
                 for layer, parts in vectors.items()}
        # from here until the manifest below records the addition, a stop leaves rows and index
        # entries that the next `vecsim add` removes again (roll_back_add) before adding anything
        manifest[PENDING_ADD] = {"run": run, "first_id": int(next_id)}
        writer.save_manifest()
        if rows:
            writer.append(rows, chunk, bad, run)
            for layer in store.layers:
                _extend_index(writer, store, layer, *chunk[layer][:2])
        elif bad:
            writer.add_failures(bad, run)
        total = writer.count_stimuli()
        additions = manifest.setdefault("additions", [])
        additions.append({"run": run, "added": len(rows), "skipped_duplicates": skipped, "failed": len(bad),
                          "ids": [rows[0]["id"], rows[-1]["id"]] if rows else None,
                          "note": "added through the fitted transforms; the evaluation subset and fidelity "
                                  "reports cover only the stimuli indexed before"})
        writer.add_run({"run": run, "command": "add", "started": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                        time.gmtime(started)), "finished": now(), "indexed": len(rows), "failed": len(bad),
                        "seconds": time.time() - started, "config": json.dumps({"sources": [str(s) for s in sources]}),
                        "versions": json.dumps(manifest.get("versions", {}))})
        counts = manifest.setdefault("counts", {})
        counts["stimuli"] = total
        counts["failures"] = counts.get("failures", 0) + len(bad)
        manifest.pop(PENDING_ADD, None)
        writer.save_manifest()  # the addition is committed by this one atomic write
    finally:
        writer.close()
    return {"added": len(rows), "skipped_duplicates": skipped, "failed": len(bad), "stimuli": total,
            "seconds": time.time() - started}


PENDING_ADD = "pending_add"  # manifest key of an add in progress: {"run", "first_id"}


def roll_back_add(writer) -> None:
    """Undo an add that stopped before its manifest write: its stimuli, vector and failure
    rows go, and each layer's index loses the ids it may have gained (rebuilt from the
    vectors table where the index type cannot remove ids)."""
    import faiss

    from vecsim.index import load_index, save_index

    pending = writer.manifest[PENDING_ADD]
    first, run = int(pending["first_id"]), int(pending["run"])
    for table in ["stimuli", *(entry["table"] for entry in writer.manifest["layers"].values())]:
        writer.db.open_table(table).delete(f"id >= {first}")
    writer.db.open_table("failures").delete(f"run = {run}")
    for layer, entry in writer.manifest["layers"].items():
        path = writer.layer_dir(layer) / "index.faiss"
        index = load_index(path)
        try:
            index.remove_ids(faiss.IDSelectorRange(first, 2**62))
            save_index(index, path)
            entry.setdefault("index", {})["ntotal"] = int(index.ntotal)
        except RuntimeError:  # e.g. HNSW: no removal, so the index is rebuilt without them
            writer.build_index(layer, int(entry["reducer"]["fit"]["dim"]), entry["index"].get("factory", "auto"),
                               seed=int(writer.manifest.get("config", {}).get("seed", 0)))
    writer.manifest.pop(PENDING_ADD)
    writer.manifest.setdefault("counts", {})["stimuli"] = writer.count_stimuli()
    writer.save_manifest()


def _candidates(sources: list[str], root: Path):
    from vecsim.stimuli import Failure, discover

    files, failures = [], []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = discover(path)
            files += [path / s.path for s in found.stimuli]
            # recorded like the stimulus rows: relative to the store's folder when inside it
            failures += [Failure(None, _stored_path((path / f.path).absolute(), root), f.stage, f.reason)
                         for f in found.failures]
        elif path.is_file():
            files.append(path)
        else:
            raise StimulusSetError(f"{source} does not exist")
    return [f.resolve() for f in files], failures


def _stored_path(path: Path, root: Path) -> str:
    """Relative to the store's stimulus folder when inside it, else absolute."""
    for base in (root.resolve(), root.absolute()):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def _extend_index(writer, store, layer: str, ids: np.ndarray, vecs: np.ndarray) -> None:
    """Add the new vectors to the layer's index; an approximate index is tuned again and its
    recall@10 measured again (the figure from indexing no longer describes it): on up to
    1,000 of the added stimuli when at least 100 were added (none of them trained the index),
    else on stored vectors of any kind (``held_out`` false)."""
    from vecsim.index import RECALL_TARGET, add as index_add, is_exact, save_index, tune_for_recall

    from vecsim._faults import kill_point

    index = store.index(layer)
    entry = writer.manifest["layers"][layer].setdefault("index", {})
    if len(ids):
        index_add(index, vecs, ids)
        if not is_exact(index) and "recall_at_10" in entry:
            all_ids, all_vecs = writer.all_vectors(layer)
            # queries: the added stimuli (held out), or with fewer than 100 any stored ones
            # (excluding every id makes recall_at_k draw from all of them, held_out false)
            exclude = np.setdiff1d(all_ids, ids) if len(ids) >= 100 else all_ids
            result = tune_for_recall(index, all_vecs, all_ids, exclude=exclude,
                                     target=entry.get("recall_target", RECALL_TARGET))
            for knob in ("efSearch", "nprobe"):
                entry.pop(knob, None)
            entry.update(result)
            entry["measured_after_add"] = True
    save_index(index, writer.layer_dir(layer) / "index.faiss")
    kill_point("add-index-saved")
    entry["ntotal"] = int(index.ntotal)
