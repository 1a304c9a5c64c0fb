"""The ``vecsim`` command: parse, call one library function, format the result.

Nothing heavy is imported at module level, so ``vecsim --help`` stays fast. Only
:func:`main` turns errors into exit codes: one line, no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reduce CNN layer activations on the fly, index them, and compare stimuli layer by layer.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# -- index ---------------------------------------------------------------------------

@app.command("index")
def index_cmd(
    source: str = typer.Argument(..., help="Folder of images (searched recursively) or builtin:digits."),
    model: Optional[str] = typer.Option(None, "--model", help="torchvision model name or digits-cnn."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated module names to hook."),
    out: Optional[str] = typer.Option(None, "--out", help="Store folder to create."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weight enum name, DEFAULT or none."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Local state dict for the architecture."),
    dim: Optional[str] = typer.Option(None, "--dim", help="N, auto, or per layer 'layer=N,...,N' [default: 256]."),
    max_dim: Optional[int] = typer.Option(None, "--max-dim", help="Cap for --dim auto [default: 512]."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="cosine or correlation [default: cosine]."),
    center: Optional[bool] = typer.Option(None, "--center/--no-center", help="Centred PCA instead of the uncentred projection."),
    sketch_dim: Optional[int] = typer.Option(None, "--sketch-dim", help="Count-sketch dims (0: never) [default: 16384 above 65536 units]."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="flatten, avg, max, grid:K, or per layer 'layer=avg,...'."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Training sample for the projection [default: 1000]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the training sample [default: 0]."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="CSV/Parquet with a 'path' column (+ label, metadata)."),
    labels_from_folders: Optional[bool] = typer.Option(None, "--labels-from-folders", help="Label = top-level sub-folder."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels (overrides the weights' preprocessing)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Normalisation mean R,G,B."),
    std: Optional[str] = typer.Option(None, "--std", help="Normalisation std R,G,B."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda [default: auto]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass [default: 32]."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding worker processes [default: cores - 1]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject larger images before decoding."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a store already at --out."),
    config: Optional[str] = typer.Option(None, "--config", help="JSON or TOML file of settings (flags win)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index a stimulus set: reduce every hooked layer and write a store."""
    options = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from vecsim.pipeline import index_stimuli

    summary = index_stimuli(config_file=config, progress=not quiet, **options)
    typer.echo(
        f"indexed {summary.indexed} stimuli ({summary.failed} failed) into {summary.store} "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s)"
    )
    for layer, fit in summary.layers.items():
        exact = "exact on the training sample" if fit["exact"] else f"{fit['energy_kept']:.1%} of the energy"
        typer.echo(f"  {layer}: {fit['dim_in']} → {fit['dim']} dims, {exact} (n_train={fit['n_train']})")


# -- layers --------------------------------------------------------------------------

@app.command("layers")
def layers_cmd(
    model: str = typer.Argument(..., help="torchvision model name or digits-cnn."),
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
        typer.echo(json.dumps([{"name": i.name, "type": i.kind, "shape": list(i.shape), "units": i.units} for i in infos], indent=2))
        return
    typer.echo(f"{model} at {side}x{side}: {len(infos)} hookable modules")
    width = max(len(i.name) for i in infos)
    typer.echo(f"{'layer':<{width}}  {'type':<18} {'shape':<18} {'units':>12}")
    for i in infos:
        typer.echo(f"{i.name:<{width}}  {i.kind:<18} {'x'.join(map(str, i.shape)):<18} {i.units:>12,}")


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


def format_info(info: dict) -> str:
    model = info["model"]
    b = info["bytes"]
    lines = [
        f"store       {info['path']} (format {info['format_version']}, {info['status']})",
        f"source      {info['source']['source']}",
        f"model       {model['name']} weights={model['weights']}" + (f" checkpoint={model['checkpoint']}" if model.get("checkpoint") else ""),
        f"stimuli     {info['counts']['stimuli']:,} indexed, {info['counts']['failures']:,} failures",
        "",
        f"{'layer':<28} {'shape':<14} {'units':>11} {'sketch':>7} {'dim':>5} {'projection':<11} {'energy':>7} {'exact':>5}",
    ]
    for name, layer in info["layers"].items():
        shape = "x".join(map(str, layer["shape"]))
        sketch = str(layer["sketch_dim"]) if layer["sketch_dim"] else "-"
        energy = f"{layer['energy_kept']:.1%}" if layer["energy_kept"] is not None else "-"
        lines.append(
            f"{name:<28} {shape:<14} {layer['units']:>11,} {sketch:>7} {layer['dim']:>5} {layer['projection']:<11} "
            f"{energy:>7} {'yes' if layer['exact'] else 'no':>5}"
        )
    lines += [
        "",
        f"on disk     {human_bytes(b['store'])}: {human_bytes(b['data'])} per-stimulus data, plus fixed costs "
        f"{human_bytes(b['transforms'])} fitted transforms and {human_bytes(b['eval_subset'])} evaluation subset",
        f"raw         {human_bytes(b['raw_activations'])} of float32 activations for these stimuli and layers",
        f"per stimulus {human_bytes(b['data_per_stimulus'])} stored vs {human_bytes(b['raw_per_stimulus'])} raw "
        f"({b['ratio']:.3%} of raw)",
    ]
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, maps errors to one line and an exit code."""
    from vecsim.errors import VecsimError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, prog_name="vecsim")  # standalone: typer reports its own usage errors
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


if __name__ == "__main__":
    main()
