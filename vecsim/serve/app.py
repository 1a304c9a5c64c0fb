"""The FastAPI app of ``vecsim serve``: thin routes over :mod:`vecsim.serve.views` (which
call the same library functions as the CLI), HTML pages from ``templates/``, files from
``static/``, a JSON API under ``/api``. Read-only: no route writes anything.

Every error is an answer with a status and a one-line message: bad input a 4xx, anything
unexpected a 500 that names the error type; a traceback goes to the server's log only.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from vecsim.errors import (ImageDecodeError, QueryError, StimulusSetError, StoreError, UnknownLayerError,
                           UnknownStimulusError, VecsimError)
from vecsim.serve import views

HERE = Path(__file__).resolve().parent
MAX_UPLOAD_BYTES = 16 << 20  # an uploaded image
MAX_URL_BYTES = 8192  # path and query string
THUMB_SIZES = (64, 128, 256, 512)
TOKEN_COOKIE = "vecsim_token"
log = logging.getLogger("vecsim.serve")


def create_app(stores: list[str], *, source: str | None = None, token: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, allowed_hosts: list[str] | None = None,
               warm: bool = True) -> FastAPI:
    """The app serving these stores (opened once, shared by every request). ``source``: the
    stimulus folder of the first store, when it has moved since indexing. ``token``: every
    request must carry it (``Authorization: Bearer``, ``?token=`` once, then a cookie).
    ``allowed_hosts``: the Host headers accepted (None: any)."""
    from vecsim.errors import ConfigError

    if not stores:
        raise ConfigError("give at least one store to serve")
    served = [views.ServedStore(path, source if i == 0 else None) for i, path in enumerate(stores)]
    if warm:
        for s in served:
            s.warm()
    _keep_uploads_in_memory(max_upload_bytes)
    app = FastAPI(title="vecsim serve", description="Browse stimuli and their nearest neighbours layer by layer "
                  "(read-only). The JSON fields are those of the CLI's --json.", version=_version(),
                  docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.thumbs = views.Thumbnails()
    app.state.max_upload = max_upload_bytes
    _add_error_handlers(app)
    _add_pages(app)
    _add_api(app)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return Guard(app, token=token, max_body=max_upload_bytes + (64 << 10), allowed_hosts=allowed_hosts)


def _version() -> str:
    from vecsim import __version__

    return __version__


def _keep_uploads_in_memory(limit: int) -> None:
    """Starlette spools a multipart file part to a temporary file above 1 MB; an upload is
    never written anywhere, so the spool stays in memory up to the (enforced) body limit."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit + (64 << 10) + 1)


# -- guard: token, Host, sizes ----------------------------------------------------------------

class Guard:
    """ASGI wrapper checked before any route: the URL length, the Host header, the token,
    and the request body size (Content-Length, and the bytes actually received)."""

    def __init__(self, app: FastAPI, *, token: str | None, max_body: int, allowed_hosts: list[str] | None):
        self.app, self.token, self.max_body = app, token, max_body
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    def __getattr__(self, name):  # app.state, app.openapi() ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_URL_BYTES:
            return await _plain(send, 414, f"the URL is longer than {MAX_URL_BYTES} bytes")
        if self.allowed_hosts is not None and headers.get("host", "").lower() not in self.allowed_hosts:
            return await _plain(send, 421, "this server answers only requests addressed to "
                                           + " or ".join(sorted(self.allowed_hosts)))
        set_cookie = False
        if self.token is not None:
            given, from_query = _token_of(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _plain(send, 401, "this server needs its token: open the URL it printed "
                                               "(?token=...) or send 'Authorization: Bearer TOKEN'")
            set_cookie = from_query
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _plain(send, 413, f"the request body is larger than {self.max_body:,} bytes")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"the request body is larger than {self.max_body:,} bytes")
            return message

        async def send_with_cookie(message):
            if set_cookie and message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, limited_receive, send_with_cookie)


def _token_of(scope, headers: dict) -> tuple[str | None, bool]:
    """(the token a request carries, whether it came in the query string)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            return value, False
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    if "token" in query:
        return query["token"][0], True
    return None, False


async def _plain(send, status: int, message: str) -> None:
    body = (message + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- errors ---------------------------------------------------------------------------------

def status_of(exc: Exception) -> int:
    if isinstance(exc, (UnknownStimulusError, UnknownLayerError)):
        return 404
    if isinstance(exc, ImageDecodeError):
        return 422
    if isinstance(exc, StoreError):
        return 500  # the store on the server, not the request
    return 400


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:500] if lines else ""


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VecsimError)
    async def vecsim_error(request: Request, exc: VecsimError):
        return error_response(request, status_of(exc), _one_line(str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request, exc.status_code, _one_line(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("error answering %s", request.url.path, exc_info=exc)
        return error_response(request, 500, f"internal error ({type(exc).__name__}); the server's log has the details")


def error_response(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/") or request.url.path.startswith("/thumb/") \
            or request.url.path.startswith("/heatmap/"):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    return render(request, "error.html", status=status, message=message, code=status)


# -- pages ----------------------------------------------------------------------------------

def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=jinja2.select_autoescape(["html"]))
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    env.filters["thousands"] = lambda v: "–" if v is None else f"{v:,}"
    return env


_ENV = None


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    global _ENV
    if _ENV is None:
        _ENV = _templates()
    served = request.app.state.served

    def url(path: str, **params) -> str:
        params = {k: v for k, v in params.items() if v is not None and v != ""}
        return path + ("?" + urlencode(params) if params else "")

    html = _ENV.get_template(name).render(stores=served, store_index=context.pop("store_index", 0), url=url,
                                          **context)
    return HTMLResponse(html, status_code=status)


def _served(request: Request, store: int) -> views.ServedStore:
    served = request.app.state.served
    if not 0 <= store < len(served):
        raise HTTPException(404, f"no store {store}; this server serves stores 0..{len(served) - 1}")
    return served[store]


def _add_pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request):
        return render(request, "overview.html", overviews=[views.overview(s) for s in request.app.state.served])

    @app.get("/browse", response_class=HTMLResponse, include_in_schema=False)
    def browse_page(request: Request, store: int = 0, page: int = Query(1, ge=1), per_page: int = Query(60, ge=1, le=views.PAGE_MAX),
                    where: Optional[str] = None, search: Optional[str] = None):
        served = _served(request, store)
        try:
            result, error = views.browse(served, page=page, per_page=per_page, where=where, search=search), None
        except (VecsimError, ValueError) as exc:  # a bad filter: its message on the page, with the form to mend it
            result, error = None, _one_line(str(exc))
        return render(request, "browse.html", status=200 if error is None else 400, store_index=store, result=result,
                      error=error, where=where or "", search=search or "", per_page=per_page,
                      source_problem=served.source_problem())

    @app.get("/stimulus/{stim_id}", response_class=HTMLResponse, include_in_schema=False)
    def stimulus_page(request: Request, stim_id: int, store: int = 0, k: int = Query(10, ge=1, le=views.K_MAX),
                      where: Optional[str] = None, hide_twins: bool = False):
        query = _served(request, store).stimulus(stim_id)

        def view(served: views.ServedStore, index: int) -> dict:
            # the stimulus by id in the store it was asked in, by its path in the others
            sid = stim_id if index == store else views.stimulus_in(served, query["path"])
            return views.neighbourhood(served, id=sid, k=k, where=where, hide_twins=hide_twins)

        panels = [_panel(served, i, view) for i, served in enumerate(request.app.state.served)]
        return render(request, "stimulus.html", store_index=store, query=query, panels=panels, k=k,
                      where=where or "", hide_twins=hide_twins, upload=False)

    @app.get("/upload", response_class=HTMLResponse, include_in_schema=False)
    def upload_form(request: Request):
        return render(request, "upload.html", error=None, k=10, max_mb=request.app.state.max_upload / 2**20)

    @app.post("/upload", response_class=HTMLResponse, include_in_schema=False)
    def upload_page(request: Request, file: UploadFile = File(...), k: int = Form(10, ge=1, le=views.K_MAX),
                    hide_twins: bool = Form(False)):
        data = _read_upload(request, file)
        try:
            panels = [_panel(served, i, lambda s, _: views.neighbourhood(s, image=data, k=k, hide_twins=hide_twins))
                      for i, served in enumerate(request.app.state.served)]
        except (ImageDecodeError, QueryError) as exc:  # said on the form, to try another file
            return render(request, "upload.html", status=status_of(exc), k=k, max_mb=request.app.state.max_upload / 2**20,
                          error=f"{file.filename or 'the file'}: {_one_line(str(exc))}")
        return render(request, "stimulus.html", query_image=views.upload_preview(data, request.app.state.served[0].store),
                      query={"id": None, "path": file.filename or "upload", "label": None, "twins": []},
                      panels=panels, k=k, where="", hide_twins=hide_twins, upload=True)

    @app.get("/layer", response_class=HTMLResponse, include_in_schema=False)
    def layer_page(request: Request, layer: str, store: int = 0):
        served = _served(request, store)
        served.store.layer_info(layer)
        try:
            data, error = views.layer_matrices(served, layer), None
        except StoreError as exc:  # no evaluation subset: said on the page
            data, error = None, _one_line(str(exc))
        return render(request, "layer.html", store_index=store, layer=layer, data=data, error=error)

    @app.get("/thumb/{store}/{stim_id}.png", include_in_schema=False)
    def thumb(request: Request, store: int, stim_id: int, size: int = 128):
        if size not in THUMB_SIZES:
            raise HTTPException(400, f"size must be one of {', '.join(map(str, THUMB_SIZES))}")
        served = _served(request, store)
        try:
            data = request.app.state.thumbs.get(served, store, stim_id, size)
        except (ImageDecodeError, StimulusSetError):  # moved, deleted or damaged: a placeholder
            return Response(views.placeholder_png(), status_code=404, media_type="image/png",
                            headers={"Cache-Control": "no-store"})
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/heatmap/{store}.png", include_in_schema=False)
    def heatmap(request: Request, store: int, layer: str, kind: str = "exact"):
        if kind not in ("exact", "stored"):
            raise HTTPException(400, "kind must be exact or stored")
        data = _matrices(_served(request, store), layer)
        return Response(views.heatmap_png(data[kind], data["groups"], data["vmin"], 1.0), media_type="image/png")

    @app.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs(request: Request):
        return render(request, "api.html", spec=request.app.openapi())


def _panel(served: views.ServedStore, index: int, view) -> dict:
    """One store's set of columns on a stimulus or upload page: ``view(served, index)``, or
    why this store has none (the stimulus is not in it)."""
    panel = {"index": index, "name": served.name, "error": None, "view": None, "source_problem": served.source_problem()}
    try:
        panel["view"] = view(served, index)
    except UnknownStimulusError as exc:
        panel["error"] = _one_line(str(exc))
    return panel


def _matrices(served: views.ServedStore, layer: str) -> dict:
    """The layer's matrices; a layer without an evaluation subset is a 404 that says why."""
    served.store.layer_info(layer)
    try:
        return views.layer_matrices(served, layer)
    except StoreError as exc:
        raise HTTPException(404, _one_line(str(exc))) from None


def _read_upload(request: Request, file: UploadFile) -> bytes:
    limit = request.app.state.max_upload
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"the image is larger than {limit / 2**20:.0f} MB")
    return data


# -- JSON API -------------------------------------------------------------------------------

def _add_api(app: FastAPI) -> None:
    k_param = Query(10, ge=1, le=views.K_MAX, description="neighbours per layer")
    where_param = Query(None, max_length=views.WHERE_MAX, description="SQL filter on the stimuli table (--where)")

    @app.get("/api/stores", tags=["stores"])
    def api_stores(request: Request) -> list[dict]:
        """The stores served, by index (the {store} of every other route)."""
        return [{"index": i, "name": s.name, "path": str(s.store.path), "layers": s.store.layers_by_depth()}
                for i, s in enumerate(request.app.state.served)]

    @app.get("/api/stores/{store}/info", tags=["stores"])
    def api_info(request: Request, store: int) -> dict:
        """What `vecsim info --json` prints."""
        served = _served(request, store)
        with served.lock:
            return served.store.info()

    @app.get("/api/stores/{store}/overview", tags=["stores"])
    def api_overview(request: Request, store: int) -> dict:
        """info, the layers in depth order with their fidelity on the evaluation subset, the first failures."""
        return views.overview(_served(request, store))

    @app.get("/api/stores/{store}/stimuli", tags=["stimuli"])
    def api_stimuli(request: Request, store: int, page: int = Query(1, ge=1),
                    per_page: int = Query(60, ge=1, le=views.PAGE_MAX), where: Optional[str] = where_param,
                    search: Optional[str] = Query(None, max_length=500, description="substring of the path")) -> dict:
        """A page of stimuli (id, path, label) in id order."""
        return views.browse(_served(request, store), page=page, per_page=per_page, where=where, search=search)

    @app.get("/api/stores/{store}/stimuli/{stim_id}", tags=["stimuli"])
    def api_stimulus(request: Request, store: int, stim_id: int) -> dict:
        """One stimulus: id, path, label and its identical twins (the same model input)."""
        return _served(request, store).stimulus(stim_id)

    @app.get("/api/stores/{store}/query", tags=["query"])
    async def api_query(request: Request, store: int, id: Optional[int] = None,
                        path: Optional[str] = Query(None, max_length=4096), layer: Optional[str] = None,
                        k: int = k_param, where: Optional[str] = where_param, exclude_self: bool = False) -> list[dict]:
        """`vecsim query --json`: one hit per layer and rank (layer, rank, id, path, label, cosine)."""
        served = _served(request, store)
        where = views.check_where(where)
        hits = await views.call_locked(served, lambda: served.store.query(id=id, path=path, layer=layer, k=k,
                                                                          where=where, exclude_self=exclude_self),
                                       quick=where is None)  # a filter reads the stimuli table: a worker thread
        return JSONResponse(hits)  # plain JSON types already: no model validation on the hot path

    @app.post("/api/stores/{store}/query-image", tags=["query"])
    def api_query_image(request: Request, store: int, file: UploadFile = File(..., description="an image file"),
                        layer: Optional[str] = None, k: int = k_param, where: Optional[str] = where_param,
                        exclude_self: bool = False) -> list[dict]:
        """`vecsim query --image --json` for an uploaded image (decoded in memory, never written)."""
        served = _served(request, store)
        data = _read_upload(request, file)
        with served.lock:
            hits = served.store.query(image=data, layer=layer, k=k, where=views.check_where(where),
                                      exclude_self=exclude_self, device="cpu", max_pixels=views.upload_max_pixels(served.store))
        return JSONResponse(hits)

    @app.get("/api/stores/{store}/neighbourhood", tags=["query"])
    def api_neighbourhood(request: Request, store: int, id: int, k: int = k_param, where: Optional[str] = where_param,
                          hide_twins: bool = False) -> dict:
        """A stimulus page's data: per layer in depth order its k nearest stimuli (itself left
        out), and how many neighbours each layer keeps from the one before."""
        return views.neighbourhood(_served(request, store), id=id, k=k, where=where, hide_twins=hide_twins)

    @app.get("/api/stores/{store}/fidelity", tags=["layers"])
    def api_fidelity(request: Request, store: int, layer: str) -> dict:
        """`vecsim report`'s numbers for one layer (its evaluation subset)."""
        fid = _served(request, store).fidelity(layer)
        if fid is None:
            raise HTTPException(404, f"layer {layer} has no evaluation subset (indexed with --eval-size 0)")
        from vecsim._io import json_safe

        return json_safe(fid)

    @app.get("/api/stores/{store}/matrix", tags=["layers"])
    def api_matrix(request: Request, store: int, layer: str) -> dict:
        """The evaluation subset's exact and stored similarity matrices, ordered by label."""
        from vecsim._io import json_safe

        data = _matrices(_served(request, store), layer)
        return json_safe({k: v for k, v in data.items() if k != "fidelity"})

