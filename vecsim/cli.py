"""The ``vecsim`` command: parse, call one library function, format the result.

Nothing heavy is imported at module level, so ``vecsim --help`` stays fast. Only
:func:`main` turns errors into exit codes: one line, no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reduce CNN layer activations on the fly, index them, and compare stimuli layer by layer.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 256]" is text, not a markup tag
)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


# -- index ---------------------------------------------------------------------------

# shared by index and neighbors
_RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to use with --ray [default: RAY_ADDRESS, else a "
                            "local cluster for this run].")
_RAY_WORKERS = typer.Option(None, "--ray-workers", help="Ray actors with --ray [default: one per GPU of the cluster, "
                            "else one per CPU].")


@app.command("index")
def index_cmd(
    source: Optional[str] = typer.Argument(None, help="Folder of images (searched recursively) or builtin:digits."),
    model: Optional[str] = typer.Option(None, "--model", help="torchvision name, digits-cnn, timm:NAME, open_clip:ARCH, file.py:factory or package.module:factory."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated module names to hook."),
    out: Optional[str] = typer.Option(None, "--out", help="Store folder to create."),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision: enum name, DEFAULT or none; timm: pretrained, a tag or none; open_clip: a tag or none."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local state dict for the architecture."),
    dim: Optional[str] = typer.Option(None, "--dim", help="N, auto, or per layer 'layer=N,...,N' [default: 256]."),
    max_dim: Optional[int] = typer.Option(None, "--max-dim", help="Cap for --dim auto [default: 512]."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="cosine or correlation [default: cosine]."),
    center: Optional[bool] = typer.Option(None, "--center/--no-center", help="Centred PCA instead of the uncentred projection."),
    sketch_dim: Optional[int] = typer.Option(None, "--sketch-dim", help="Count-sketch dims (0: never) [default above 65536 units: a power of two from 16384 to 131072, about units/20]."),
    drop_zero_units: Optional[bool] = typer.Option(None, "--drop-zero-units", help="Drop units zero for every training stimulus (count reported)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="flatten, avg, max, grid:K (feature maps), tokens, cls, mean (token outputs), or per layer 'layer=avg,...'."),
    index: Optional[str] = typer.Option(None, "--index", help="auto, flat, hnsw, ivf-pq, or a FAISS factory string [default: auto]."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Training sample for the projection [default: 1000]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the training sample [default: 0]."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="CSV/Parquet with a 'path' column (+ label, metadata)."),
    labels_from_folders: Optional[bool] = typer.Option(None, "--labels-from-folders", help="Label = top-level sub-folder."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels (overrides the weights' preprocessing)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Normalisation mean R,G,B."),
    std: Optional[str] = typer.Option(None, "--std", help="Normalisation std R,G,B."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda [default: auto]."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size",
        help="Images per decoded batch and forward pass; on a CPU forwarded in slices of about 8 images "
             "at 224 px (see docs/resuming.md) [default: 32]."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads [default: cores; 0 = main thread]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject larger images before decoding."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="Evaluation subset: stimuli with exact raw similarities kept per layer [default: 500; 0 = none]."),
    eval_memory: Optional[float] = typer.Option(None, "--eval-memory", help="MB for holding the evaluation subset's raw vectors [default: 512]."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Stimuli per committed chunk [default: 1024]."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a store already at --out."),
    config: Optional[str] = typer.Option(None, "--config", help="JSON or TOML file of settings (flags win)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Finish an interrupted run of this store with its recorded settings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ray: bool = typer.Option(False, "--ray", help="Forward on a Ray cluster (pip install 'vecsim[ray]'); the store "
                             "must be on a file system every node sees."),
    ray_address: Optional[str] = _RAY_ADDRESS,
    ray_workers: Optional[int] = _RAY_WORKERS,
) -> None:
    """Index a stimulus set: reduce every hooked layer and write a store (rerun to resume)."""
    options = {k: v for k, v in locals().items() if k not in ("config", "quiet", "resume", "ray", "ray_address",
                                                              "ray_workers")}
    from vecsim.pipeline import index_stimuli, resume_options
    from vecsim.store import exact_pairs

    if resume is not None:
        options = {**resume_options(resume), **{k: v for k, v in options.items() if v is not None and k == "device"}}

    if _wants_ray(ray, ray_address, ray_workers):
        from vecsim import distributed

        summary = distributed.index_stimuli(config_file=config, progress=not quiet, ray_address=ray_address,
                                            ray_workers=ray_workers, **options)
    else:
        summary = index_stimuli(config_file=config, progress=not quiet, **options)
    if summary.up_to_date:
        typer.echo(f"{summary.store} is complete and up to date ({summary.indexed} stimuli, {summary.failed} failed, "
                   "the same settings); nothing to do")
        return
    if summary.work_line() is not None:
        _echo_err(summary.work_line())
    resumed = (f"; resumed: {summary.resumed_from} were committed before, {summary.indexed - summary.resumed_from} "
               f"this run, {summary.forwarded} images forwarded" if summary.resumed_from else "")
    typer.echo(
        f"indexed {summary.indexed} stimuli ({summary.failed} failed) into {summary.store} "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s{resumed})"
    )
    for layer, fit in summary.layers.items():
        pairs = exact_pairs(fit, summary.indexed, fit.get("sketched", False), fit.get("center", False))
        if pairs == "all":
            exact = "exact"
        elif pairs == "training":
            exact = "exact on the training sample (and for pairs with one of it), approximate for other pairs"
        elif fit["exact"] and fit.get("center"):
            exact = ("every direction of the centred training sample kept (stored: cosines of the "
                     "stimulus-centred vectors, not the raw cosines)")
        elif fit["exact"]:  # sketched
            exact = "every direction of the sketched training sample kept (the sketch estimates raw cosines)"
        else:
            exact = f"{fit['energy_kept']:.1%} of the energy"
        rho = summary.fidelity.get(layer)
        fidelity = f", fidelity Spearman {rho:.4f} on the evaluation subset" if rho is not None else ""
        if fit.get("dropped_zero_units"):
            exact += f", {fit['dropped_zero_units']:,} always-zero units dropped"
        if fit.get("calls", 1) > 1:
            exact += f", the last of its {fit['calls']} calls per forward pass"
        if fit.get("output"):
            exact += f", {fit['select']} of its {fit['output']} output"
        if fit.get("batch_dim"):
            exact += ", a sequence-first output read batch second"
        dims = (f"{fit['units']:,} units → sketch {fit['dim_in']:,} → {fit['dim']}" if fit.get("sketched")
                else f"{fit['dim_in']} → {fit['dim']}")
        typer.echo(f"  {layer}: {dims} dims, {exact} (n_train={fit['n_train']}){fidelity}")
        idx = fit.get("index") or {}
        if "recall_at_10" in idx and idx["recall_at_10"] < idx.get("recall_target", 0):
            _echo_err(f"warning: {layer}'s index {idx.get('factory')} reaches recall@10 {idx['recall_at_10']:.3f} "
                      f"< {idx['recall_target']:.2f} at its largest setting; queries rescore its candidates on the "
                      "stored vectors, but neighbours it never proposes are missed: use --index flat or hnsw")
        if rho is not None and rho < 0.95 and fit.get("center"):
            _echo_err(f"note: {layer} stores the cosine after centring (--center), which is not the raw "
                      f"cosine the evaluation subset measures (Spearman {rho:.3f} against it): by design, "
                      "not a sign that --dim is too small")
        elif rho is not None and rho < 0.95:
            _echo_err(f"warning: {layer} keeps similarities with Spearman {rho:.3f} < 0.95; "
                      "raise --dim (or use --dim auto) and see `vecsim report`")


def _wants_ray(ray: bool, address: Optional[str], workers: Optional[int]) -> bool:
    """--ray, checked: --ray-address and --ray-workers mean nothing without it."""
    if not ray and (address is not None or workers is not None):
        from vecsim.errors import ConfigError

        raise ConfigError("--ray-address and --ray-workers go with --ray")
    return ray


# -- layers --------------------------------------------------------------------------

@app.command("layers")
def layers_cmd(
    model: str = typer.Argument(..., help="torchvision name, digits-cnn, timm:NAME, open_clip:ARCH or file.py:factory."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels [default: the model's crop]."),
    weights: str = typer.Option("none", "--weights", help="Weights to build with (shapes do not depend on them)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the hookable modules with output shape and flattened size."""
    from vecsim.models import layer_shapes, load_model

    loaded = load_model(model, weights, size=size)
    side = loaded.preprocessing.crop
    infos = layer_shapes(loaded.module, side)
    if as_json:
        typer.echo(json.dumps([{"name": i.name, "type": i.kind, "shape": list(i.shape), "units": i.units,
                                "calls": i.calls, "output": i.output, "select": i.select,
                                "batch_dim": i.batch_dim} for i in infos], indent=2))
        return
    tokens = (f"; token outputs have {loaded.prefix_tokens} class/register token(s) first"
              if loaded.prefix_tokens else "")
    typer.echo(f"{model} at {side}x{side}: {len(infos)} hookable modules{tokens}")
    width, kinds = max(len(i.name) for i in infos), max(18, *(len(i.kind) for i in infos))
    typer.echo(f"{'layer':<{width}}  {'type':<{kinds}} {'shape':<18} {'units':>12}")
    for i in infos:
        notes = [f"runs {i.calls}x per pass: the last call is captured"] if i.calls > 1 else []
        if i.output and i.name.endswith(i.select):
            notes.append(f"part {i.select} of its {i.output} output")
        elif i.output:
            notes.append(f"returns {i.output}: {i.select} captured")
        if i.batch_dim:
            notes.append("sequence first: read batch second")
        typer.echo(f"{i.name:<{width}}  {i.kind:<{kinds}} {'x'.join(map(str, i.shape)):<18} {i.units:>12,}"
                   + ("  " + "; ".join(notes) if notes else ""))


# -- info ----------------------------------------------------------------------------

@app.command("info")
def info_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe a store: model, layers, dims, counts, failures, size vs raw activations."""
    from vecsim.store import Store

    info = Store.open(store).info()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(format_info(info))


def format_index(index: dict) -> str:
    if not index:
        return "-"
    text = index.get("factory", index.get("kind", "?"))
    if "recall_at_10" in index:
        knob = next((f", {k} {index[k]}" for k in ("efSearch", "nprobe") if k in index), "")
        queries = "held-out" if index.get("held_out", True) else "training-sample (none held out)"
        after = ""
        if index.get("measured_after_add"):
            queries = "added" if index.get("held_out", True) else "stored"
            after = ", measured again after vecsim add"
        below = (f", below the {index['recall_target']:.2f} target"
                 if index["recall_at_10"] < index.get("recall_target", 0) else "")
        text += f" (recall@10 {index['recall_at_10']:.3f} on {index['queries']} {queries} queries{knob}{after}{below})"
    return text


_EXACT_SHORT = {"all": "all", "training": "train", "none": "no"}


def format_runs(runs: list[dict], show: int = 10) -> list[str]:
    """One line per run of the runs table (the last ``show``): what it indexed or added itself,
    its failures and time; a stopped index run says so."""
    lines = []
    for r in runs[-show:]:
        took = f", {r['seconds']:.1f} s" if r["finished"] else ", stopped before finishing"
        lines.append(f"#{r['run']} {r['command']:<6} started {r['started']}: {r['indexed']:,} stimuli, "
                     f"{r['failed']:,} failed{took}")
    if len(runs) > show:
        lines.insert(0, f"({len(runs) - show} earlier runs: Store.runs())")
    return [("runs        " if i == 0 else " " * 12) + line for i, line in enumerate(lines)]


def format_progress(progress: dict | None) -> list[str]:
    """An unfinished store's line: how far each pass got, and that the same command resumes it."""
    if not progress:
        return []
    from vecsim._io import human_bytes

    training = progress["training_pass"]
    if training["fitted"]:
        done = f"training pass done and fitted; {progress['committed']:,} stimuli committed"
    elif "forwarded" in training:
        done = (f"training pass {training['forwarded']:,} of {training['planned']:,} stimuli forwarded "
                f"({training['kept']:,} kept) in {training['chunks']} scratch chunks, {human_bytes(training['scratch_bytes'])}")
    else:
        done = "training pass: nothing committed yet"
    return [f"progress    {done}; the same `vecsim index` command resumes it"]


def format_info(info: dict) -> str:
    from vecsim._io import human_bytes

    model = info["model"]
    b = info["bytes"]
    lines = [
        f"store       {info['path']} (format {info['format_version']}, {info['status']})",
        f"source      {info['source']['source']}",
        f"model       {model['name']} " + (f"checkpoint={model['checkpoint']}" if model.get("checkpoint") else
                                           f"weights={model['weights']}" if model.get("weights") else
                                           f"weights=none (random init, seed {model.get('init_seed', 0)})"),
        f"stimuli     {info['counts']['stimuli']:,} indexed, {info['counts']['failures']:,} failures",
        *format_runs(info.get("runs", [])),
        *format_progress(info.get("progress")),
        "",
        f"{'layer':<28} {'shape':<14} {'units':>11} {'sketch':>7} {'dim':>5} {'projection':<11} {'energy':>7} {'exact':>5}  index",
    ]
    for name, layer in info["layers"].items():
        shape = "x".join(map(str, layer["shape"]))
        sketch = str(layer["sketch_dim"]) if layer["sketch_dim"] else "-"
        energy = f"{layer['energy_kept']:.1%}" if layer["energy_kept"] is not None else "-"
        lines.append(
            f"{name:<28} {shape:<14} {layer['units']:>11,} {sketch:>7} {layer['dim'] or '-':>5} {layer['projection']:<11} "
            f"{energy:>7} {_EXACT_SHORT[layer['exact_pairs']]:>5}  {format_index(layer['index'])}"
        )
    lines += [
        "",
        f"on disk     {human_bytes(b['store'])}: {human_bytes(b['data'])} per-stimulus data, plus fixed costs "
        f"{human_bytes(b['transforms'])} fitted transforms and {human_bytes(b['eval_subset'])} evaluation subset"
        + (f", and {human_bytes(b['scratch'])} training-pass scratch (deleted after the fit)" if b.get("scratch") else ""),
        f"raw         {human_bytes(b['raw_activations'])} of float32 activations for these stimuli and layers",
        f"per stimulus {human_bytes(b['data_per_stimulus'])} stored vs {human_bytes(b['raw_per_stimulus'])} raw "
        f"({b['ratio']:.3%} of raw)",
    ]
    return "\n".join(lines)


# -- report --------------------------------------------------------------------------

@app.command("report")
def report_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    out: str = typer.Option(..., "--out", help="Folder for report.html, report.md, report.json and figures/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the report's numbers as JSON."),
    targets: Optional[str] = typer.Option(None, "--targets", help="The --out folder of `vecsim compare STORE "
                                          "--rdm FILE`: include its layer-against-target figures."),
) -> None:
    """Fidelity report: how much the reduction lost, layer by layer, with plots."""
    from vecsim.report import build_report

    report = build_report(store, out, overwrite=overwrite, targets=targets)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(format_report(report))


def format_report(report: dict) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    files = report["files"]
    lines = [f"wrote {files['html']} (self-contained), {files['markdown']}, {files['json']} "
             f"and {len(files['figures'])} figures", ""]
    width = max(len("layer"), *(len(r["layer"]) for r in report["summary"]))
    from vecsim.report import recall_cell, recall_header

    head = f"{'layer':<{width}} {'M':>6} {'dim':>5} {'Spearman':>9} {recall_header(report['summary']):>9}"
    lines.append(head + (f" {'AUC raw':>8} {'AUC dim':>8}" if report["labels"] else ""))
    for r in report["summary"]:
        row = f"{r['layer']:<{width}} {r['M']:>6,} {r['dim']:>5} {num(r['spearman'], 4):>9} {recall_cell(r):>9}"
        lines.append(row + (f" {num(r['auc_exact'], 4):>8} {num(r['auc'], 4):>8}" if report["labels"] else ""))
    lines += [f"note: {n}" for n in report["notes"]]
    if "targets" in report:
        lines.append(f"layers against external RDMs: {len(report['targets']['targets'])} target(s), "
                     f"{', '.join(report['targets']['comparators'])}")
    return "\n".join(lines)


# -- query / neighbors / similarity -----------------------------------------------------

@app.command("query")
def query_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    stim_id: Optional[int] = typer.Option(None, "--id", help="Query by stimulus id."),
    path: Optional[str] = typer.Option(None, "--path", help="Query by stimulus path (relative, as stored)."),
    image: Optional[str] = typer.Option(None, "--image", help="Query by a new image file (through the stored model)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="One layer [default: all, side by side]."),
    k: int = typer.Option(10, "-k", help="Number of neighbours."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL filter on the stimuli table, e.g. \"label = 'cat'\"."),
    exclude_self: bool = typer.Option(False, "--exclude-self", help="Leave the query stimulus out of its results (for --image, every stored stimulus identical to it); other identical stimuli stay first, at 1.0."),
    device: str = typer.Option("auto", "--device", help="For --image: auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of hits."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
) -> None:
    """Nearest stimuli per layer to a stimulus or a new image."""
    from vecsim.errors import ConfigError
    from vecsim.store import Store

    if as_json and as_csv:
        raise ConfigError("give --json or --csv, not both")
    opened = Store.open(store)
    _warn_unfinished(opened)
    hits = opened.query(id=stim_id, path=path, image=image, layer=layer, k=k, where=where,
                        exclude_self=exclude_self, device=device)
    if as_json:
        typer.echo(json.dumps(hits, indent=2))
    elif as_csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=["layer", "rank", "id", "path", "label", "cosine"])
        writer.writeheader()
        writer.writerows(hits)
    else:
        typer.echo(format_hits(hits))


def format_hits(hits: list[dict]) -> str:
    """One layer: a ranked table. Several: rank per row, one column per layer."""
    if not hits:
        return "no results"
    layers = list(dict.fromkeys(h["layer"] for h in hits))
    cell = lambda h: f"{h['id']} {h['path']}" + (f" [{h['label']}]" if h["label"] is not None else "") + f" {h['cosine']:.3f}"
    if len(layers) == 1:
        rows = [f"{'rank':>4}  {'id':>7}  {'cosine':>7}  {'label':<10} path"]
        rows += [f"{h['rank']:>4}  {h['id']:>7}  {h['cosine']:>7.4f}  {str(h['label'] or ''):<10} {h['path']}" for h in hits]
        return "\n".join([f"layer {layers[0]}", *rows])
    by = {(h["layer"], h["rank"]): cell(h) for h in hits}
    ranks = sorted({h["rank"] for h in hits})
    width = max(len(v) for v in by.values())
    width = max(width, *(len(layer) for layer in layers))
    lines = ["rank  " + "  ".join(f"{layer:<{width}}" for layer in layers)]
    for r in ranks:
        lines.append(f"{r:>4}  " + "  ".join(f"{by.get((layer, r), ''):<{width}}" for layer in layers))
    return "\n".join(lines)


def _warn_unfinished(store) -> None:
    """A store still being indexed (or stopped) answers from the stimuli committed so far: say so."""
    if not store.complete:
        typer.echo(f"warning: {store.path} is not complete (status {store.manifest.get('status')!r}): the results "
                   f"cover the {len(store.lookup().ids):,} stimuli committed so far; `vecsim index` resumes it",
                   err=True)


@app.command("neighbors")
def neighbors_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    layer: str = typer.Option(..., "--layer", help="Layer."),
    k: int = typer.Option(10, "-k", help="Neighbours per stimulus (self excluded)."),
    out: str = typer.Option(..., "--out", help="Output .parquet (id, rank, neighbor_id, cosine)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]: where an exact index is searched "
                               "(auto: the GPU when torch sees one)."),
    ray: bool = typer.Option(False, "--ray", help="Spread the queries over a Ray cluster (pip install 'vecsim[ray]'); "
                             "the store and --out must be on a file system every node sees."),
    ray_address: Optional[str] = _RAY_ADDRESS,
    ray_workers: Optional[int] = _RAY_WORKERS,
) -> None:
    """The all-vs-all k-NN graph of one layer, written to Parquet."""
    from vecsim.store import Store

    spread = _wants_ray(ray, ray_address, ray_workers)
    opened = Store.open(store)
    _warn_unfinished(opened)
    if spread:
        from vecsim import distributed

        result = distributed.neighbors(opened, layer, k, out, overwrite=overwrite, progress=not quiet, device=device,
                                       ray_address=ray_address, ray_workers=ray_workers)
    else:
        result = opened.neighbors(layer, k, out, overwrite=overwrite, progress=not quiet, device=device)
    capped = (f"k={result['k_effective']:,}: every other stimulus, fewer than the {k:,} asked for"
              if result["k_effective"] < k else f"k={k:,}")
    typer.echo(f"wrote {result['rows']:,} rows ({result['stimuli']:,} stimuli, {capped}) to {result['path']} "
               f"in {result['seconds']:.1f} s")


@app.command("similarity")
def similarity_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    out: str = typer.Option(..., "--out", help="Output: .npy (memory-mapped), .parquet (long form) or .h5 (rsatoolbox)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="One layer."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Several layers, comma-separated."),
    all_layers: bool = typer.Option(False, "--all-layers", help="Every layer of the store."),
    metric: Optional[str] = typer.Option(None, "--metric", help="cosine or correlation [default: the store's]."),
    distance: bool = typer.Option(False, "--distance", help="Write 1 - s (an RDM) instead of s."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float16."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL filter on the stimuli table."),
    triangle: str = typer.Option("full", "--triangle", help="Parquet only: full or upper (i < j)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]: where the tiles are computed "
                               "(auto: the GPU when torch sees one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Export pairwise similarity matrices (tiled, memory-bounded) with their row order and provenance."""
    from vecsim.config import split_list
    from vecsim.errors import ConfigError
    from vecsim._io import human_bytes
    from vecsim.store import Store

    chosen = sum(bool(x) for x in (layer, layers, all_layers))
    if chosen != 1:
        raise ConfigError("give one of --layer, --layers or --all-layers")
    opened = Store.open(store)
    _warn_unfinished(opened)
    names = [layer] if layer else split_list(layers) if layers else opened.layers
    summary = opened.similarity(out, layers=names, metric=metric, distance=distance, dtype=dtype, where=where,
                                triangle=triangle, overwrite=overwrite, device=device)
    typer.echo(f"wrote {summary['format']} {tuple(summary['shape'])} {summary['dtype']} "
               f"{summary['values']} for {', '.join(summary['layers'])} to {summary['path']} "
               f"({human_bytes(summary['bytes_written'])}, {summary['elapsed_s']:.1f} s)")


# -- compare, prune, spectrum, channels ------------------------------------------------

@app.command("compare")
def compare_cmd(
    store_a: str = typer.Argument(..., help="Store whose layers are the rows."),
    store_b: Optional[str] = typer.Argument(None, help="Store whose layers are the columns [default: STORE_A]."),
    measure: Optional[str] = typer.Option(None, "--measure", "-m", help="cka, cka_debiased, rsa_spearman, "
                                          "rsa_pearson, rsa_kendall, svcca, pwcca, procrustes, comma-separated, or "
                                          "all [default: cka]."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for Parquet/CSV/JSON tables and PNGs."),
    layers_a: Optional[str] = typer.Option(None, "--layers-a", help="Comma-separated layers of A (of STORE with "
                                           "--rdm) [default: all]."),
    layers_b: Optional[str] = typer.Option(None, "--layers-b", help="Comma-separated layers of B [default: all]."),
    pairs: str = typer.Option("grid", "--pairs", help="grid (every A layer × every B layer) or matching (i-th with i-th)."),
    source: str = typer.Option("auto", "--source", help="auto, exact-gram or stored-vectors."),
    rdm: Optional[list[str]] = typer.Option(None, "--rdm", help="External RDM file (repeatable): rsatoolbox .h5, "
                                            "square .npy/.csv, or vecsim Parquet long form. Compares every layer "
                                            "with it instead of with STORE_B."),
    comparator: str = typer.Option("corr", "--comparator", help="With --rdm: corr, spearman, rho-a, tau-a, cosine, "
                                   "corr_cov, cosine_cov, comma-separated, or all."),
    stimuli: Optional[str] = typer.Option(None, "--stimuli", help="With --rdm: the matrices' stimuli, one path "
                                          "(relative to the stimulus folder), id or sha256 per line, in row order."),
    similarities: bool = typer.Option(False, "--similarities", help="With --rdm: the .npy/.csv matrices hold "
                                      "similarities (used as 1 - s)."),
    match_by: str = typer.Option("auto", "--match-by", help="With --rdm: auto, path, id or sha256."),
    pattern_descriptor: Optional[str] = typer.Option(None, "--pattern-descriptor", help="With --rdm: the HDF5 "
                                                     "pattern descriptor naming the stimuli [default: path, "
                                                     "stimulus, image, ... whichever is there]."),
    target_by: Optional[str] = typer.Option(None, "--target-by", help="With --rdm: RDM descriptor naming the "
                                            "target [default: region, roi, area, target or layer]."),
    subject_by: Optional[str] = typer.Option(None, "--subject-by", help="With --rdm: RDM descriptor naming the "
                                             "subject [default: subject, subj, participant or sub]."),
    bootstrap: str = typer.Option("auto", "--bootstrap", help="With --rdm: auto, stimuli, subjects, both or none."),
    bootstraps: int = typer.Option(1000, "--bootstraps", help="With --rdm: number of bootstrap samples."),
    seed: int = typer.Option(0, "--seed", help="With --rdm: seed of the bootstrap samples."),
    test: str = typer.Option("t-test", "--test", help="With --rdm: t-test, bootstrap or ranksum."),
    correction: str = typer.Option("fdr", "--correction", help="With --rdm: fdr, bonferroni or none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier comparison's files in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (NaN as null)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="With --rdm: no bootstrap progress bars."),
) -> None:
    """Layer × layer similarity (CKA, RSA, SVCCA, PWCCA, Procrustes) within a store or between two,
    or every layer against external RDMs (--rdm: brain regions, behaviour) with rsatoolbox's statistics."""
    from vecsim._io import dumps_json

    if rdm:
        from vecsim.errors import ConfigError
        from vecsim.rsa import check_out, compare_rdms

        if store_b is not None or measure is not None or layers_b is not None:
            raise ConfigError("--rdm compares STORE's layers with the RDM files: give no second store, --measure "
                              "or --layers-b (use --comparator)")
        if out:
            check_out(out, overwrite)
        result = compare_rdms(store_a, rdm, layers=layers_a, comparators=comparator, stimuli=stimuli,
                              similarities=similarities, match_by=match_by, pattern_descriptor=pattern_descriptor,
                              target_by=target_by, subject_by=subject_by, source=source, bootstrap=bootstrap,
                              n_bootstraps=bootstraps, seed=seed, test=test, correction=correction,
                              progress=not (as_json or quiet))
    else:
        from vecsim.compare import compare_stores

        result = compare_stores(store_a, store_b, measure or "cka", layers_a, layers_b, pairs=pairs, source=source)
    _emit(result, out, overwrite, as_json, dumps_json,
          lambda written: f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}")


@app.command("prune")
def prune_cmd(
    model: str = typer.Option(..., "--model", help="Model spec, as for index (torchvision name, timm:NAME, open_clip:ARCH, file.py:factory, ...)."),
    out: str = typer.Option(..., "--out", help="File for the pruned state dict (e.g. pruned.pt)."),
    amount: float = typer.Option(..., "--amount", help="Fraction of weights to zero, in [0, 1)."),
    scope: str = typer.Option("global", "--scope", help="global (one ranking over all layers) or layerwise."),
    weights: Optional[str] = typer.Option(None, "--weights", help="torchvision: enum name, DEFAULT or none; timm: pretrained, a tag or none; open_clip: a tag or none."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local state dict to prune instead."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Magnitude-prune a model's conv/linear weights and save a checkpoint for `vecsim index --checkpoint`."""
    from vecsim.compare import format_prune, prune_checkpoint
    from vecsim._io import dumps_json

    report = prune_checkpoint(model, out, amount, scope, weights=weights, checkpoint=checkpoint, overwrite=overwrite)
    typer.echo(dumps_json(report) if as_json else format_prune(report))


@app.command("spectrum")
def spectrum_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for spectrum.png/.json/.csv."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier spectrum's files in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (NaN as null)."),
) -> None:
    """Per layer: effective rank and dims for 90/95/99% energy of the stored training spectrum."""
    from vecsim.compare import store_spectra
    from vecsim._io import dumps_json

    _emit(store_spectra(store), out, overwrite, as_json, dumps_json)


@app.command("channels")
def channels_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    layer: str = typer.Option(..., "--layer", help="A feature-map layer of the store."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the matrices (.npy), heatmaps and summary JSON."),
    k: int = typer.Option(10, "--k", help="NNK candidates per stimulus."),
    kernel: str = typer.Option("auto", "--kernel", help="NNK kernel: auto (cosine; gaussian for 1x1 maps), cosine or gaussian."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace this layer's earlier files in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (NaN as null)."),
) -> None:
    """Channel redundancy of one layer: cosine similarity and CW-NNK overlap of its channels."""
    from vecsim.compare import channel_redundancy
    from vecsim._io import dumps_json

    _emit(channel_redundancy(store, layer, k=k, kernel=kernel), out, overwrite, as_json, dumps_json)


def _emit(report, out: Optional[str], overwrite: bool, as_json: bool, dumps_json, describe=None) -> None:
    """Save a report's files when asked, then print it as JSON or as its table."""
    written = report.save(out, overwrite=overwrite) if out else []
    if as_json:
        typer.echo(dumps_json(report.to_dict()))
        return
    typer.echo(report.format())
    if written:
        typer.echo("\n" + (describe(written) if describe else f"wrote {', '.join(str(p) for p in written)}"))


# -- verify / add ------------------------------------------------------------------------

@app.command("verify")
def verify_cmd(
    store: str = typer.Argument(..., help="Store folder."),
    rehash: bool = typer.Option(False, "--rehash", help="Also check every stimulus file against its recorded sha256."),
) -> None:
    """Check a store: ids, rows, dims, transform hashes, vector norms (and files with --rehash)."""
    from vecsim.maintain import verify
    from vecsim.store import Store

    problems = verify(Store.open(store), rehash=rehash)
    for problem in problems:
        typer.echo(f"problem: {problem}")
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {store} is consistent" + (" and every stimulus file matches its sha256" if rehash else ""))


@app.command("add")
def add_cmd(
    store: str = typer.Argument(..., help="A complete store."),
    sources: list[str] = typer.Argument(..., help="Image files and/or folders to add."),
    label: Optional[str] = typer.Option(None, "--label", help="Label for every added stimulus."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Add stimuli to a complete store through its fitted transforms (no refit; duplicates by sha256 skipped)."""
    from vecsim.maintain import add

    result = add(store, sources, label=label, device=device, batch_size=batch_size, progress=not quiet)
    typer.echo(f"added {result['added']} stimuli ({result['skipped_duplicates']} already present, "
               f"{result['failed']} failed); the store now holds {result['stimuli']} in {result['seconds']:.1f} s")


# -- serve ---------------------------------------------------------------------------

@app.command("serve")
def serve_cmd(
    stores: list[str] = typer.Argument(..., help="Store folder(s); two stores of the same stimuli are shown side by side."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (any other than 127.0.0.1 is reachable from other machines)."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    source: Optional[str] = typer.Option(None, "--source", help="The first store's stimulus folder, when it has moved since indexing."),
    token: Optional[str] = typer.Option(None, "--token", help="Require this secret on every request (the printed URL carries it)."),
    max_upload_mb: float = typer.Option(16, "--max-upload-mb", help="Largest image an upload may send, in MB."),
) -> None:
    """A local, read-only web app: browse stimuli and their nearest images layer by layer."""
    from vecsim.serve import serve

    serve(stores, host=host, port=port, source=source, token=token, max_upload_mb=max_upload_mb,
          echo=typer.echo, warn=_echo_err)


# -- entry point ---------------------------------------------------------------------

def _click_exceptions() -> tuple:
    """(usage error, exit, abort) exception classes of the click that typer runs on (its own
    vendored copy in recent typer, the click package in older ones)."""
    import importlib

    core = importlib.import_module("typer.core")
    click = getattr(core, "click", None) or getattr(core, "_click")
    exc = importlib.import_module(click.__name__ + ".exceptions")
    return exc.UsageError, tuple({getattr(exc, "Exit", typer.Exit), typer.Exit}), tuple({getattr(exc, "Abort", typer.Abort), typer.Abort})


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, maps errors to one line and an exit code."""
    from vecsim.errors import VecsimError

    usage_error, exits, aborts = _click_exceptions()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = app(args=argv, prog_name="vecsim", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except usage_error as exc:  # a mistyped option or a missing argument: one line too
        command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "vecsim"
        if exc.format_message():  # (no arguments at all: the help was printed instead)
            _echo_err(f"error: {exc.format_message()} (see `{command} --help`)")
        sys.exit(2)
    except exits as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except aborts:
        _echo_err("interrupted")
        sys.exit(130)
    except VecsimError as exc:
        if debug:
            raise
        _echo_err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _echo_err("interrupted")
        sys.exit(130)
    except Exception as exc:  # unexpected failures: still one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _echo_err(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)")
        sys.exit(1)


def entry() -> None:
    """The ``vecsim`` command (and ``python -m vecsim``): :func:`main`, then an exit that
    skips the interpreter's teardown of its modules, which after torch and torchvision are
    imported takes about a second (freeing their objects one by one) and does nothing for
    the user: every store is committed and every file closed before a command returns.
    What an orderly exit does before that teardown still runs here: other threads are
    joined, ``atexit`` handlers run (Ray's shutdown among them) and stdout and stderr are
    flushed. A traceback asked for with --debug takes the usual way out."""
    import os

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize runs first: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vecsim ... | head`): nothing more can be written
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
