"""``vecsim serve``: a local, read-only web app to browse stimuli and their nearest
neighbours layer by layer (FastAPI on uvicorn; the ``serve`` extra).

``serve(stores, ...)`` opens the stores once, prints the URL and answers until stopped.
``vecsim.serve.app.create_app`` builds the ASGI app alone (tests, other servers).
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Callable

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765


def require_extra() -> None:
    """The serve extra's libraries, or one line naming the extra to install."""
    from vecsim.errors import ConfigError

    import importlib.util

    def found(*modules: str) -> bool:
        for module in modules:
            try:
                if importlib.util.find_spec(module) is not None:
                    return True
            except (ImportError, ValueError):  # a module set to None (blocked) or half-installed
                pass
        return False

    missing = [dist for dist, modules in (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                                          ("python-multipart", ("python_multipart", "multipart")),
                                          ("jinja2", ("jinja2",))) if not found(*modules)]
    if missing:
        raise ConfigError(f"vecsim serve needs {', '.join(missing)}: pip install 'vecsim[serve]'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str, port: int) -> list[str] | None:
    """The Host headers a loopback server accepts (a page on another site cannot reach it by
    a DNS name that resolves to 127.0.0.1); None for another address (any Host)."""
    if not is_loopback(host):
        return None
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    return sorted({f"{n}:{port}" for n in names} | names)


def serve(stores: list[str], *, host: str = LOOPBACK, port: int = DEFAULT_PORT, source: str | None = None,
          token: str | None = None, max_upload_mb: float = 16, echo: Callable[[str], None] = print,
          warn: Callable[[str], None] | None = None) -> None:
    """Open the stores, print the URL, serve until interrupted."""
    from vecsim.errors import ConfigError

    require_extra()
    warn = warn or (lambda text: print(text, file=sys.stderr))
    if not 0 < port < 65536:
        raise ConfigError(f"--port must lie in 1..65535, got {port}")
    if max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb must be positive")
    if token is not None and not token.strip():
        raise ConfigError("--token must not be empty")
    if not is_loopback(host):
        warn(f"warning: serving on {host}, reachable from other machines: anyone who can reach it can browse "
             "these stores and their images" + ("" if token else "; pass --token to require a secret"))
    import uvicorn

    from vecsim.serve.app import create_app

    app = create_app(stores, source=source, token=token, max_upload_bytes=int(max_upload_mb * 2**20),
                     allowed_hosts=loopback_hosts(host, port))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening: the URL works from now on
                echo(f"vecsim serve: {url}  ({len(stores)} store{'s' if len(stores) > 1 else ''}; Ctrl-C stops it)")

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          limit_concurrency=256, timeout_keep_alive=5)).run()
