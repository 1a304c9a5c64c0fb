"""The web app in a real headless Chromium driven by Playwright: overview → browse → a
stimulus → its neighbours in every layer → k → a label filter → uploads.

Playwright's own browser download is not used: the tests launch Debian's
chromium-headless-shell (``VECSIM_CHROMIUM`` names another binary). Without one they skip
and print the install command; under ``CI=true`` a missing browser fails. Screenshots go
to ``VECSIM_SCREENSHOTS`` (default: ``vecsim-screenshots`` in the temporary folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vecsim[serve]'")

from serve_support import LAYERS, LiveServer, serve_stimuli, serve_store, serve_store_small  # noqa: E402,F401
from vecsim.store import Store  # noqa: E402

INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium-headless-shell"
IN_CI = os.environ.get("CI", "").lower() == "true"


def chromium() -> str | None:
    named = os.environ.get("VECSIM_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("chromium-headless-shell") or next(
        (p for p in ("/usr/bin/chromium-headless-shell", "/usr/lib/chromium/chromium-headless-shell") if Path(p).is_file()),
        None)


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None if chromium() else f"no headless Chromium found; install it with: {INSTALL}"


MISSING = missing()
# decided before any fixture is set up: a skip costs no store build; under CI a missing browser fails
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None and not IN_CI, reason=str(MISSING))]


@pytest.fixture(scope="module")
def browser():
    if MISSING is not None:
        pytest.fail(f"CI=true and {MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium())  # Playwright passes --no-sandbox (root in CI)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def site(serve_store, serve_store_small):
    from vecsim.serve.app import create_app

    with LiveServer(create_app([str(serve_store), str(serve_store_small)])) as live:
        yield live.url


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("VECSIM_SCREENSHOTS") or Path(tempfile.gettempdir()) / "vecsim-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, errors  # no JavaScript error on any page


def loaded_images(page, selector: str) -> list[int]:
    """naturalWidth of the matching images (0: not loaded)."""
    return page.eval_on_selector_all(selector, "els => els.map(e => e.complete ? e.naturalWidth : 0)")


def column_hits(page, store: int = 0) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for col in page.locator(f'section.panel[data-store="{store}"] .column').all():
        hits = col.locator("a.hit")
        out[col.get_attribute("data-layer")] = [(int(h.get_attribute("data-id")), h.locator(".cos").inner_text())
                                               for h in hits.all()]
    return out


def test_overview_browse_stimulus_k_and_filter(page, site, shots, serve_store, serve_store_small):
    store = Store.open(serve_store)
    page.goto(site + "/")
    assert page.locator("section.store").count() == 2
    assert page.locator("#store-0 table.layers-table tbody tr").count() == len(LAYERS)
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    page.click("nav.main >> text=Browse")
    thumbs = page.locator(".thumbs a.thumb")
    assert thumbs.count() == 60 and "page 1 of 2" in page.inner_text(".summary")
    page.wait_for_load_state("networkidle")
    assert min(loaded_images(page, ".thumbs img")[:20]) == 8  # the 8x8 digits themselves, shown scaled
    page.screenshot(path=str(shots / "browse.png"))

    chosen = int(thumbs.nth(21).get_attribute("data-id"))
    thumbs.nth(21).click()
    page.wait_for_url(f"**/stimulus/{chosen}**")
    page.wait_for_load_state("networkidle")
    shown = column_hits(page)
    assert list(shown) == LAYERS  # one column per layer, in depth order
    for layer, hits in shown.items():
        want = [h for h in store.query(id=chosen, layer=layer, k=10, exclude_self=True)]
        assert [i for i, _ in hits] == [h["id"] for h in want]
        assert [c for _, c in hits] == [f"{h['cosine']:.3f}" for h in want]
    assert list(column_hits(page, 1)) == LAYERS[1:]  # the second store, same stimulus, side by side
    assert page.locator(".survival li").count() == len(LAYERS) - 1 + len(LAYERS) - 2
    assert min(loaded_images(page, "a.hit img")) > 0
    page.screenshot(path=str(shots / "stimulus.png"), full_page=True)

    page.fill("#k", "3")
    page.dispatch_event("#k", "change")  # the page reloads with k = 3
    page.wait_for_url("**k=3**")
    assert all(len(hits) == 3 for hits in column_hits(page).values())

    neighbour = page.locator('section.panel[data-store="0"] a.hit').nth(1)
    other = int(neighbour.get_attribute("data-id"))
    neighbour.click()  # a neighbour opens its own page
    page.wait_for_url(f"**/stimulus/{other}**")
    assert page.inner_text("figure.query figcaption").startswith(f"#{other}")

    page.goto(site + "/browse")
    page.fill("input[name=where]", "label = '3'")
    page.click("form.controls button")
    page.wait_for_load_state("networkidle")
    captions = page.locator(".thumbs .cap").all_inner_texts()
    threes = int(np.sum(store.lookup().labels == "3"))
    assert len(captions) == threes and all(c.split()[-1] == "3" for c in captions)
    page.screenshot(path=str(shots / "browse-filter.png"))

    page.fill("input[name=where]", "label = ")
    page.click("form.controls button")
    assert "is not a valid filter" in page.inner_text("p.error")
    page.screenshot(path=str(shots / "browse-bad-filter.png"))


def test_upload_a_stimulus_file_and_a_broken_one(page, site, shots, serve_store, serve_stimuli, tmp_path):
    store = Store.open(serve_store)
    own_path = sorted((serve_stimuli / "5").glob("*.png"))[1]
    own = store.lookup().id_of_path(f"5/{own_path.name}")
    page.goto(site + "/upload")
    page.set_input_files("#file", str(own_path))
    page.click("#upload button")
    page.wait_for_load_state("networkidle")
    for layer, hits in column_hits(page).items():
        assert hits[0] == (own, "1.000"), layer  # its own stored copy first, cosine exactly 1
    assert loaded_images(page, "figure.query img")[0] > 0
    page.screenshot(path=str(shots / "upload.png"), full_page=True)

    page.goto(site + "/upload")  # dropped onto the drop zone instead of chosen
    drop = """bytes => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }"""
    with page.expect_navigation():
        page.evaluate(drop, list(own_path.read_bytes()))
    assert "dropped.png" in page.inner_text("figure.query figcaption")
    assert all(hits[0] == (own, "1.000") for hits in column_hits(page).values())

    page.goto(site + "/upload")
    page.set_input_files("#file", files=[{"name": "broken.png", "mimeType": "image/png",
                                         "buffer": b"\x89PNG\r\n\x1a\n this is not an image"}])
    page.click("#upload button")
    assert "broken.png: not an image" in page.inner_text("p.error")
    page.screenshot(path=str(shots / "upload-broken.png"))


def test_layer_page_shows_both_heatmaps(page, site, shots):
    page.goto(site + "/")
    page.click(f"nav.layers >> text={LAYERS[1]}")
    page.wait_for_load_state("networkidle")
    assert [w > 0 for w in loaded_images(page, "img.heatmap")] == [True, True]
    assert page.locator("table.grid-table tbody tr").count() >= 1
    page.screenshot(path=str(shots / "layer.png"), full_page=True)
