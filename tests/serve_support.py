"""Fixtures shared by the web app's tests: a small digits store (and a second, smaller one
of the same stimuli), and a live server on loopback."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

LAYERS = ["features.relu1", "features.relu2", "features.relu4"]
PER_CLASS = 8
TWIN = "3/twin_of_first.png"  # a byte copy of the first '3': an identical twin


def digits_subset(root: Path, per_class: int = PER_CLASS) -> Path:
    """The first ``per_class`` digits of each label as ``root/<label>/NNNN.png``, plus a byte
    copy of the first 3 (an identical twin)."""
    from vecsim.digits import materialize_digits

    source = materialize_digits()
    for label in sorted(p.name for p in source.iterdir() if p.is_dir()):
        (root / label).mkdir(parents=True)
        for png in sorted((source / label).glob("*.png"))[:per_class]:
            shutil.copy(png, root / label / png.name)
    first_three = sorted((root / "3").glob("*.png"))[0]
    shutil.copy(first_three, root / TWIN)
    return root


@pytest.fixture(scope="session")
def serve_stimuli(tmp_path_factory) -> Path:
    return digits_subset(tmp_path_factory.mktemp("serve") / "digits")


def _index(source: Path, out: Path, layers, dim: str):
    import vecsim

    vecsim.index_stimuli(source=str(source), model="digits-cnn", layers=layers, out=str(out), dim=dim,
                         train_size=40, labels_from_folders=True, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def serve_store(serve_stimuli, tmp_path_factory) -> Path:
    return _index(serve_stimuli, tmp_path_factory.mktemp("serve") / "digits-16d", LAYERS, "16")


@pytest.fixture(scope="session")
def serve_store_small(serve_stimuli, tmp_path_factory) -> Path:
    """The same stimuli, fewer layers and dims (as a pruned or cheaper variant would be)."""
    return _index(serve_stimuli, tmp_path_factory.mktemp("serve") / "digits-8d", LAYERS[1:], "8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread, for the life of a ``with``."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
