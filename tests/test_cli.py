"""The command line: help is fast and light, errors are one line, commands print what they should."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vecsim", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_help_does_not_import_torch_or_lancedb():
    code = (
        "import sys\nfrom vecsim.cli import main\nsys.argv=['vecsim','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'lancedb', 'faiss') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out
    assert "index" in out and "info" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "/no/such/folder", "--model", "digits-cnn", "--layers", "features.relu1", "--out", "OUT"],
         "does not exist"),
        (["index", "builtin:digits", "--model", "resnet19", "--layers", "x", "--out", "OUT"], "resnet18"),
        (["index", "builtin:digits", "--model", "digits-cnn", "--layers", "features.relu9", "--out", "OUT"],
         "did you mean"),
        (["index", "builtin:digits", "--model", "resnet18", "--weights", "IMAGENET9K", "--layers", "layer1",
          "--out", "OUT"], "unknown weights"),
        (["info", "/no/such/store"], "no store"),
        (["index", "--model", "digits-cnn", "--layers", "features.relu1", "--out", "OUT"],
         "SOURCE is required: a folder of images or builtin:digits, as the first argument"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, tmp_path):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "info", "/no/such/store")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_layers_lists_shapes_and_sizes():
    result = run_cli("layers", "digits-cnn")
    assert result.returncode == 0, result.stderr
    assert "features.conv4" in result.stdout and "64x8x8" in result.stdout and "4,096" in result.stdout
    data = json.loads(run_cli("layers", "densenet121", "--size", "400", "--json").stdout)
    by_name = {d["name"]: d for d in data}
    assert by_name["features.transition1.norm"]["units"] == 2_560_000
    assert by_name["features.transition2.norm"]["units"] == 1_280_000
    assert by_name["features.transition3.norm"]["units"] == 640_000


def test_index_then_info_and_the_existing_store_error(shared_image_set, tmp_path):
    out = tmp_path / "store"
    args = ["index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu2,features.relu4",
            "--out", str(out), "--dim", "features.relu2=4,8", "--labels-from-folders", "-q"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "indexed 18 stimuli (0 failed)" in result.stdout
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert info["counts"] == {"stimuli": 18, "failures": 0}
    assert info["layers"]["features.relu2"]["dim"] == 4 and info["layers"]["features.relu4"]["dim"] == 8
    text = run_cli("info", str(out)).stdout
    assert "of raw" in text and "fitted transforms" in text
    again = run_cli(*args)  # the same command on the complete store: nothing to do
    assert again.returncode == 0 and "complete and up to date" in again.stdout, again.stderr
    other = run_cli(*args[:-1], "--seed", "1", "-q")  # other settings: refused, naming the difference
    assert other.returncode == 2 and "seed: 0 → 1" in other.stderr and "--overwrite" in other.stderr
    assert run_cli(*args, "--overwrite").returncode == 0


def test_config_file_with_flags_taking_precedence(shared_image_set, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'source = "{shared_image_set}"\nmodel = "digits-cnn"\nlayers = ["features.relu1"]\ndim = "6"\n'
                      f'train_size = 10\n')
    out = tmp_path / "s"
    result = run_cli("index", str(shared_image_set), "--config", str(config), "--out", str(out), "--dim", "5", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "vecsim.json").read_text())
    assert manifest["config"]["dim"] == "5" and manifest["config"]["train_size"] == 10
    assert manifest["layers"]["features.relu1"]["reducer"]["fit"]["n_train"] == 10


def test_query_json_csv_and_side_by_side_table(shared_image_set, tmp_path):
    out = tmp_path / "store"
    assert run_cli("index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu2,features.relu4",
                   "--out", str(out), "--dim", "6", "--labels-from-folders", "-q").returncode == 0
    hits = json.loads(run_cli("query", str(out), "--id", "3", "-k", "2", "--json").stdout)
    assert len(hits) == 4 and set(hits[0]) == {"layer", "rank", "id", "path", "label", "cosine"}
    table = run_cli("query", str(out), "--path", "cat/img_00.png", "-k", "2").stdout.splitlines()
    assert table[0].split()[:3] == ["rank", "features.relu2", "features.relu4"] and len(table) == 3
    csv_out = run_cli("query", str(out), "--id", "3", "--layer", "features.relu4", "-k", "2", "--csv").stdout
    assert csv_out.splitlines()[0] == "layer,rank,id,path,label,cosine"
    bad = run_cli("query", str(out), "--id", "3", "--where", "label ==== 'x'")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --where")
    npy = tmp_path / "m.npy"
    done = run_cli("similarity", str(out), "--all-layers", "--out", str(npy), "--distance")
    assert done.returncode == 0, done.stderr
    again = run_cli("similarity", str(out), "--all-layers", "--out", str(npy))
    assert again.returncode == 2 and "already exists" in again.stderr
    import torch

    if not torch.cuda.is_available():  # the default --device auto ran on the CPU above
        gpu = run_cli("similarity", str(out), "--all-layers", "--out", str(tmp_path / "g.npy"), "--device", "cuda")
        assert gpu.returncode != 0 and len(gpu.stderr.strip().splitlines()) == 1 and "CUDA" in gpu.stderr
        assert not (tmp_path / "g.npy").exists()


def test_index_prints_fidelity_per_layer_and_warns_when_low(shared_image_set, tmp_path):
    result = run_cli("index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu1,features.relu4",
                     "--out", str(tmp_path / "s"), "--dim", "features.relu1=1,16", "-q")
    assert result.returncode == 0, result.stderr
    lines = {ln.split(":")[0].strip(): ln for ln in result.stdout.splitlines() if "fidelity Spearman" in ln}
    assert set(lines) == {"features.relu1", "features.relu4"}
    assert "features.relu4" not in result.stderr  # exact at dim 16 with 18 stimuli: no warning
    assert "warning: features.relu1 keeps similarities with Spearman" in result.stderr


def test_index_with_center_does_not_blame_the_dim_for_storing_the_centred_cosine(shared_image_set, tmp_path):
    # exact for the centred cosine (17 centred directions of 18 stimuli, dim 32), which is not
    # the raw cosine: Spearman against the raw one is below 0.95 on relu1 here
    result = run_cli("index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu1",
                     "--out", str(tmp_path / "s"), "--center", "--dim", "32", "-q")
    assert result.returncode == 0, result.stderr
    assert "every direction of the centred training sample kept" in result.stdout
    assert "raise --dim" not in result.stderr
    assert "note: features.relu1 stores the cosine after centring" in result.stderr


def test_info_describes_an_index_below_its_recall_target_and_unheld_queries():
    from vecsim.cli import format_index

    text = format_index({"factory": "IVF8,PQ4", "recall_at_10": 0.51, "queries": 1000, "recall_target": 0.95,
                         "nprobe": 8, "held_out": False})
    assert "recall@10 0.510 on 1000 training-sample (none held out) queries, nprobe 8, below the 0.95 target" in text
    text = format_index({"factory": "HNSW32", "recall_at_10": 0.97, "queries": 1000, "recall_target": 0.95,
                         "efSearch": 64, "held_out": True})
    assert "held-out queries, efSearch 64)" in text and "below" not in text


def test_usage_mistakes_are_one_line(shared_image_set, tmp_path):
    typo = run_cli("index", "x", "--sizee", "3")
    assert typo.returncode == 2 and typo.stderr.strip().count("\n") == 0
    assert typo.stderr.startswith("error: No such option: --sizee") and "--size" in typo.stderr
    config = tmp_path / "c.toml"
    config.write_text('train_size = "abc"\n')
    bad = run_cli("index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu4",
                  "--out", str(tmp_path / "s"), "--config", str(config))
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --train-size must be an integer, got 'abc'"
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\ncat/img_00.png,c\n")
    both = run_cli("index", str(shared_image_set), "--model", "digits-cnn", "--layers", "features.relu4",
                   "--out", str(tmp_path / "s"), "--manifest", str(manifest), "--labels-from-folders")
    assert both.returncode == 2 and "not both" in both.stderr and not (tmp_path / "s").exists()
