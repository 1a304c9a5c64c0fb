"""The web app's JSON API and pages, in-process (FastAPI's TestClient), checked against the
library calls the CLI makes and against brute force over the stored vectors and raw activations."""

from __future__ import annotations

import io
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vecsim[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import cosine_matrix, raw_features  # noqa: E402
from serve_support import LAYERS, TWIN, serve_stimuli, serve_store, serve_store_small  # noqa: E402,F401
from vecsim.serve.app import create_app  # noqa: E402
from vecsim.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def client(serve_store):
    return TestClient(create_app([str(serve_store)]))


@pytest.fixture(scope="module")
def store(serve_store):
    return Store.open(serve_store)


def brute(store, layer, vec, exclude=()):
    """(ids, cosines) of every stimulus by the stored inner product, best first (ties by id)."""
    ids, vecs = store.vectors(layer)
    scores = vecs.astype(np.float64) @ np.asarray(vec, np.float64).ravel()
    keep = ~np.isin(ids, list(exclude))
    ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def test_query_api_is_the_cli_json_and_brute_force(client, store):
    hits = client.get("/api/stores/0/query", params={"id": 7, "k": 5}).json()
    assert hits == store.query(id=7, k=5)  # the fields and values of `vecsim query --json`
    assert set(hits[0]) == {"layer", "rank", "id", "path", "label", "cosine"}
    for layer in LAYERS:
        got = [h for h in hits if h["layer"] == layer]
        want_ids, want_cos = brute(store, layer, store.vector_of(layer, 7), exclude=[7])
        assert got[0]["id"] == 7 and got[0]["cosine"] == 1.0
        assert [h["id"] for h in got[1:]] == want_ids[:4].tolist()
        np.testing.assert_allclose([h["cosine"] for h in got[1:]], want_cos[:4], atol=1e-5)


def test_neighbourhood_is_per_layer_in_depth_order_with_labels_and_survival(client, store):
    view = client.get("/api/stores/0/neighbourhood", params={"id": 20, "k": 6}).json()
    lookup = store.lookup()
    label = lookup.labels[lookup.position(np.array([20]))[0]]
    assert view["query"]["label"] == label
    assert [c["layer"] for c in view["layers"]] == LAYERS  # the forward-pass order
    shown = {}
    for col in view["layers"]:
        want_ids, want_cos = brute(store, col["layer"], store.vector_of(col["layer"], 20), exclude=[20])
        assert [h["id"] for h in col["hits"]] == want_ids[:6].tolist()  # the stimulus itself is the query, not a hit
        np.testing.assert_allclose([h["cosine"] for h in col["hits"]], want_cos[:6], atol=1e-5)
        assert [h["rank"] for h in col["hits"]] == [1, 2, 3, 4, 5, 6]
        for h in col["hits"]:
            assert h["same_label"] == (h["label"] == label)
        shown[col["layer"]] = {h["id"] for h in col["hits"]}
    for pair, (a, b) in zip(view["survival"], zip(LAYERS, LAYERS[1:])):
        assert (pair["from"], pair["to"]) == (a, b)
        assert pair["kept"] == len(shown[a] & shown[b]) and pair["of"] == 6


def test_identical_twins_come_first_at_one_and_can_be_hidden(client, store, serve_stimuli):
    twin = store.lookup().id_of_path(TWIN)
    original = [t for t in store.lookup().twins_of(twin).tolist() if t != twin][0]
    view = client.get("/api/stores/0/neighbourhood", params={"id": original, "k": 4}).json()
    assert view["query"]["twins"] == [twin]
    for col in view["layers"]:
        assert col["hits"][0]["id"] == twin and col["hits"][0]["cosine"] == 1.0 and col["hits"][0]["twin"]
    hidden = client.get("/api/stores/0/neighbourhood", params={"id": original, "k": 4, "hide_twins": True}).json()
    for col, before in zip(hidden["layers"], view["layers"]):
        assert [h["id"] for h in col["hits"]] == [h["id"] for h in before["hits"][1:]] + [col["hits"][-1]["id"]]
        assert len(col["hits"]) == 4 and twin not in [h["id"] for h in col["hits"]]


def test_browse_filters_by_where_and_path_and_pages(client, store):
    labels = store.lookup().labels
    page = client.get("/api/stores/0/stimuli", params={"where": "label = '3'", "per_page": 5}).json()
    assert page["total"] == int(np.sum(labels == "3")) and page["pages"] == -(-page["total"] // 5)
    assert len(page["items"]) == 5 and all(item["label"] == "3" for item in page["items"])
    last = client.get("/api/stores/0/stimuli", params={"where": "label = '3'", "per_page": 5, "page": page["pages"]}).json()
    assert len(last["items"]) == page["total"] - 5 * (page["pages"] - 1)
    found = client.get("/api/stores/0/stimuli", params={"search": "TWIN_OF"}).json()
    assert [item["path"] for item in found["items"]] == [TWIN]
    everything = client.get("/api/stores/0/stimuli", params={"per_page": 500}).json()
    assert [item["id"] for item in everything["items"]] == store.lookup().ids.tolist()


def test_a_bad_filter_is_a_400_with_its_message_on_the_page_and_in_the_api(client):
    api = client.get("/api/stores/0/stimuli", params={"where": "no_such_column = 1"})
    assert api.status_code == 400 and "is not a valid filter" in api.json()["error"]
    page = client.get("/browse", params={"where": "label = '3'; drop table stimuli"})
    assert page.status_code == 400 and "must be one SQL condition" in page.text
    assert 'value="label = &#39;3&#39;; drop table stimuli"' in page.text  # the form keeps it, to mend


def test_upload_of_a_stored_file_finds_it_first_at_one_and_a_new_image_matches_query_image(client, store,
                                                                                          serve_stimuli, tmp_path):
    path = sorted((serve_stimuli / "7").glob("*.png"))[2]
    own = store.lookup().id_of_path(f"7/{path.name}")
    hits = client.post("/api/stores/0/query-image", params={"k": 3},
                       files={"file": ("x.png", path.read_bytes(), "image/png")}).json()
    for layer in LAYERS:
        first = [h for h in hits if h["layer"] == layer][0]
        assert first["id"] == own and first["cosine"] == 1.0
    # a new image (the digit mirrored): the same answer as `vecsim query --image FILE`
    from PIL import Image, ImageOps

    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(path)).save(mirrored)
    got = client.post("/api/stores/0/query-image", params={"k": 4},
                      files={"file": ("m.png", mirrored.read_bytes(), "image/png")}).json()
    assert got == store.query(image=str(mirrored), k=4, device="cpu")
    assert all(h["cosine"] < 1.0 for h in got)
    page = client.post("/upload", data={"k": "3"}, files={"file": ("x.png", path.read_bytes(), "image/png")})
    assert page.status_code == 200 and page.text.count('class="column"') == len(LAYERS)
    assert "data:image/png;base64," in page.text and "1.000" in page.text


def test_bad_uploads_are_4xx_with_a_message_and_nothing_is_written(client, monkeypatch):
    written = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: written.append(self))
    broken = client.post("/api/stores/0/query-image", files={"file": ("b.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")})
    assert broken.status_code == 422 and "not an image" in broken.json()["error"]
    empty = client.post("/api/stores/0/query-image", files={"file": ("e.png", b"", "image/png")})
    assert empty.status_code == 422 and "empty" in empty.json()["error"]
    page = client.post("/upload", files={"file": ("b.png", b"not an image at all", "image/png")})
    assert page.status_code == 422 and "b.png: not an image" in page.text
    big = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1100, 3), dtype=np.uint8)).save(big, "PNG")
    assert 1 << 20 < len(big.getvalue()) < 16 << 20  # above Starlette's default spool size
    ok = client.post("/api/stores/0/query-image", params={"k": 1}, files={"file": ("big.png", big.getvalue(), "image/png")})
    assert ok.status_code == 200 and not written  # held in memory, never spooled to a file
    small = TestClient(create_app([client.app.state.served[0].store.path], max_upload_bytes=100_000))
    too_big = small.post("/api/stores/0/query-image", files={"file": ("big.png", big.getvalue(), "image/png")})
    assert too_big.status_code == 413 and "larger than" in too_big.text


def test_a_decompression_bomb_is_refused_from_its_header(client):
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")  # 81 Mpx, a few kB compressed
    answer = client.post("/api/stores/0/query-image", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert answer.status_code == 422 and "pixels, above the limit" in answer.json()["error"]


@pytest.mark.parametrize("url, status, words", [
    ("/api/stores/0/query?id=5&k=0", 422, "k"),
    ("/api/stores/0/query?id=5&k=101", 422, "k"),
    ("/api/stores/0/query?id=abc", 422, "id"),
    ("/api/stores/0/query", 400, "exactly one of"),
    ("/api/stores/0/query?id=999999", 404, "no stimulus with id 999999"),
    ("/api/stores/0/query?id=1&layer=features.relu3", 404, "no layer"),
    ("/api/stores/0/query?path=../../etc/passwd", 404, "no stimulus with path"),
    ("/api/stores/7/info", 404, "no store 7"),
    ("/api/stores/0/fidelity?layer=nope", 404, "no layer"),
    ("/thumb/0/..%2F..%2Fetc%2Fpasswd.png", 404, ""),
    ("/thumb/0/3.png?size=7", 400, "size must be one of"),
    ("/stimulus/999999", 404, "no stimulus with id"),
    ("/layer?layer=nope", 404, "no layer"),
    ("/heatmap/0.png?layer=features.relu1&kind=raw", 400, "kind must be"),
    ("/no/such/page", 404, "Not Found"),
])
def test_every_bad_parameter_is_a_4xx_with_a_one_line_message(client, url, status, words):
    answer = client.get(url)
    assert answer.status_code == status, answer.text
    assert words in answer.text and "Traceback" not in answer.text


def test_an_unexpected_error_is_a_one_line_500_without_a_traceback(serve_store, monkeypatch):
    from vecsim.serve import views

    def broken(*args, **kwargs):
        raise RuntimeError("something deep\nand a second line")

    monkeypatch.setattr(views, "browse", broken)
    quiet = TestClient(create_app([str(serve_store)], warm=False), raise_server_exceptions=False)
    for url in ("/api/stores/0/stimuli", "/browse"):
        answer = quiet.get(url)
        assert answer.status_code == 500 and "internal error (RuntimeError)" in answer.text
        assert "Traceback" not in answer.text and "second line" not in answer.text


def test_no_route_writes(client):
    for route in client.app.routes:
        methods = getattr(route, "methods", None) or set()
        assert methods <= {"GET", "HEAD", "POST"}, route.path
        if "POST" in methods:
            assert route.path in ("/upload", "/api/stores/{store}/query-image")
    assert client.put("/api/stores/0/info").status_code == 405
    assert client.delete("/api/stores/0/info").status_code == 405


def test_token_guards_every_request_and_a_token_url_sets_a_cookie(serve_store):
    guarded = TestClient(create_app([str(serve_store)], token="s3cret", warm=False))
    for url in ("/", "/api/stores", "/static/style.css", "/thumb/0/1.png", "/openapi.json"):
        assert guarded.get(url).status_code == 401
    assert guarded.get("/api/stores", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/stores", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = guarded.get("/?token=s3cret")
    assert first.status_code == 200 and "vecsim_token=s3cret" in first.headers["set-cookie"]
    assert guarded.get("/browse").status_code == 200  # the cookie carries it from now on


def test_sizes_and_hosts_are_limited(serve_store):
    app = create_app([str(serve_store)], warm=False, allowed_hosts=["127.0.0.1:8765"])
    c = TestClient(app, base_url="http://127.0.0.1:8765")
    assert c.get("/api/stores").status_code == 200
    assert TestClient(app, base_url="http://evil.example").get("/api/stores").status_code == 421
    assert c.get("/browse?search=" + "x" * 9000).status_code == 414
    huge = c.post("/api/stores/0/query-image", content=b"x", headers={"content-length": str(1 << 30),
                                                                       "content-type": "image/png"})
    assert huge.status_code == 413

    def streamed():  # no Content-Length (chunked): counted while it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(100):
            yield b"x" * 10_000
        yield b"\r\n--b--\r\n"

    small = TestClient(create_app([str(serve_store)], warm=False, max_upload_bytes=100_000))
    chunked = small.post("/api/stores/0/query-image", content=streamed(),
                         headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]


def test_many_clients_at_once_get_the_answers_one_client_gets(serve_store):
    from serve_support import LiveServer
    import httpx

    app = create_app([str(serve_store)])
    ids = list(range(0, 60, 3))
    with LiveServer(app) as live:
        with httpx.Client(base_url=live.url) as one:
            want = {i: one.get("/api/stores/0/query", params={"id": i, "k": 5}).json() for i in ids}

        def ask(i):
            with httpx.Client(base_url=live.url, timeout=60) as c:
                return i, c.get("/api/stores/0/query", params={"id": i, "k": 5}).json()

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(ask, ids * 4))
    assert all(hits == want[i] for i, hits in got)


def test_layer_matrices_are_the_raw_cosines_and_the_stored_ones_ordered_by_label(client, store, serve_stimuli):
    data = client.get("/api/stores/0/matrix", params={"layer": "features.relu2"}).json()
    ids = np.array(data["ids"])
    lookup = store.lookup()
    pos = lookup.position(ids)
    labels = lookup.labels[pos].tolist()
    assert labels == sorted(labels) and data["labels"] == labels
    raw = raw_features("digits-cnn", serve_stimuli, [str(p) for p in lookup.paths[pos]], "features.relu2",
                       weights="DEFAULT")
    exact = cosine_matrix(raw)
    twins = [lookup.id_of_path(TWIN)] + [t for t in lookup.twins_of(lookup.id_of_path(TWIN)).tolist()]
    np.testing.assert_allclose(np.array(data["exact"]), exact, atol=1e-4)
    vecs = store.vectors_for("features.relu2", ids)[1][np.argsort(np.argsort(ids))]
    stored = np.clip(vecs.astype(np.float64) @ vecs.T.astype(np.float64), -1, 1)
    t = np.isin(ids, twins)
    stored[np.ix_(t, t)] = 1.0  # identical stimuli: exactly 1, as every command reports
    np.fill_diagonal(stored, 1.0)  # and each with itself
    np.testing.assert_allclose(np.array(data["stored"]), stored, atol=1e-5)
    png = client.get("/heatmap/0.png", params={"layer": "features.relu2", "kind": "stored"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    page = client.get("/layer", params={"layer": "features.relu2"})
    assert page.status_code == 200 and "Spearman" in page.text


def test_overview_shows_the_fidelity_report_figures_and_counts(client, store):
    from vecsim.report import fidelity_summary

    ov = client.get("/api/stores/0/overview").json()
    assert ov["info"]["counts"]["stimuli"] == len(store.lookup().ids)
    summary = fidelity_summary(store)
    assert [l["name"] for l in ov["layers"]] == LAYERS
    for layer in ov["layers"]:
        assert layer["spearman"] == pytest.approx(summary[layer["name"]], abs=1e-9)
    page = client.get("/")
    assert page.status_code == 200 and all(layer in page.text for layer in LAYERS)


def test_thumbnails_come_from_the_stimulus_file_and_a_moved_folder_shows_a_placeholder(client, store, serve_stimuli,
                                                                                       serve_store, tmp_path):
    from PIL import Image

    path = store.lookup().paths[4]
    answer = client.get("/thumb/0/4.png", params={"size": 64})
    assert answer.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"))
    assert np.array_equal(got, np.asarray(Image.open(serve_stimuli / path).convert("L")))  # 8x8, not resampled
    moved = TestClient(create_app([str(serve_store)], source=str(tmp_path / "gone"), warm=False))
    missing = moved.get("/thumb/0/4.png")
    assert missing.status_code == 404 and missing.headers["content-type"] == "image/png"
    page = moved.get("/browse")
    assert page.status_code == 200 and "--source" in page.text and str(tmp_path / "gone") in page.text
    elsewhere = tmp_path / "copy"
    import shutil

    shutil.copytree(serve_stimuli, elsewhere)
    assert TestClient(create_app([str(serve_store)], source=str(elsewhere), warm=False)).get("/thumb/0/4.png").status_code == 200


def test_thumbnail_cache_is_bounded():
    from vecsim.serve.views import Thumbnails

    class Fake:
        class store:
            manifest = {"config": {}}

    thumbs = Thumbnails(max_bytes=250)
    import vecsim.serve.views as views

    made = []
    original = views.make_thumbnail
    try:
        views.make_thumbnail = lambda path, size, max_pixels=0: made.append(path) or b"x" * 100
        Fake.image_path = lambda self, i: f"p{i}"
        for i in (1, 2, 1, 3, 1):
            thumbs.get(Fake(), 0, i, 64)
    finally:
        views.make_thumbnail = original
    assert made == ["p1", "p2", "p3"] and thumbs.bytes <= 250  # 1 stayed (recently used), 2 went


def test_two_stores_show_the_same_stimulus_side_by_side(serve_store, serve_store_small, store):
    both = TestClient(create_app([str(serve_store), str(serve_store_small)]))
    page = both.get("/stimulus/11", params={"k": 3})
    assert page.status_code == 200 and page.text.count('class="panel"') == 2
    assert page.text.count('class="column"') == len(LAYERS) + 2
    small = Store.open(serve_store_small)
    path = store.lookup().paths[store.lookup().position(np.array([11]))[0]]
    sid = small.lookup().id_of_path(str(path))
    want = small.query(id=sid, k=4, exclude_self=True)
    view = both.get("/api/stores/1/neighbourhood", params={"id": sid, "k": 3}).json()
    assert [h["id"] for c in view["layers"] for h in c["hits"]] == [h["id"] for h in want if h["rank"] <= 3]


def test_serve_warns_off_loopback_and_needs_its_extra(serve_store, monkeypatch):
    import sys

    import uvicorn

    from vecsim.errors import ConfigError
    from vecsim.serve import require_extra, serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    warnings = []
    serve([str(serve_store)], host="0.0.0.0", port=8765, warn=warnings.append, echo=lambda s: None)
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--token" in warnings[0]
    warnings.clear()
    serve([str(serve_store)], host="127.0.0.1", warn=warnings.append, echo=lambda s: None)
    assert warnings == []
    with pytest.raises(ConfigError, match="port"):
        serve([str(serve_store)], port=0)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError, match=r"pip install 'vecsim\[serve\]'"):
        require_extra()


def test_the_cli_help_does_not_import_the_web_stack():
    import subprocess
    import sys

    code = ("import sys; from vecsim.cli import app; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch', 'lancedb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_cli_reports_a_missing_store_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "vecsim", "serve", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no store at")


def test_a_query_waits_for_a_busy_store_and_a_filtered_one_equals_the_cli(client, store):
    served = client.app.state.served[0]
    held, release = threading.Event(), threading.Event()

    def busy():  # another request holding the store (as an upload's forward pass does)
        with served.lock:
            held.set()
            release.wait(10)

    worker = threading.Thread(target=busy)
    worker.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    answer = client.get("/api/stores/0/query", params={"id": 3, "k": 2})  # waits in a worker thread, then answers
    worker.join()
    assert answer.status_code == 200 and answer.json() == store.query(id=3, k=2)
    filtered = client.get("/api/stores/0/query", params={"id": 3, "k": 4, "where": "label = '7'"}).json()
    assert filtered == store.query(id=3, k=4, where="label = '7'")
    assert {h["label"] for h in filtered} == {"7"}


def test_an_upload_with_hidden_twins_leaves_out_its_stored_copies(client, store, serve_stimuli):
    from vecsim.serve import views

    path = serve_stimuli / TWIN  # stored twice: the twin and its original
    copies = set(store.lookup().twins_of(store.lookup().id_of_path(TWIN)).tolist())
    served = client.app.state.served[0]
    shown = views.neighbourhood(served, image=path.read_bytes(), k=3)
    hidden = views.neighbourhood(served, image=path.read_bytes(), k=3, hide_twins=True)
    for col, col_hidden in zip(shown["layers"], hidden["layers"]):
        assert {h["id"] for h in col["hits"][:2]} == copies and all(h["twin"] for h in col["hits"][:2])
        assert not copies & {h["id"] for h in col_hidden["hits"]} and len(col_hidden["hits"]) == 3
