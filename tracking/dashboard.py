#!/usr/bin/env python
"""optuna-dashboard behind a Host check: ``python tracking/dashboard.py STORAGE --host H --port P --allowed-hosts L``.

The dashboard has write endpoints (delete a study, tell a trial, rename, notes) and no authentication. A page on any
web site can make the browser send requests to http://127.0.0.1:8080 under its own host name (DNS rebinding): the
request then carries that site's name in its ``Host`` header. This wrapper serves the same WSGI app
(``optuna_dashboard.wsgi``, threaded wsgiref server like the ``optuna-dashboard`` command) and answers 403 to any
request whose Host header is not in ``--allowed-hosts`` (MLflow's syntax: ``name``, ``name:port``, ``name:*``).

It is never published beyond loopback: docker-compose.yml and tracking/stack.py bind it to 127.0.0.1 even when the
MLflow server is published to other machines (reach it with ``ssh -L 8080:127.0.0.1:8080 HOST``). It needs only the
standard library and optuna-dashboard, so it runs in the pinned optuna-dashboard image (mounted read-only).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

DEFAULT_ALLOWED_HOSTS = "localhost,localhost:*,127.0.0.1,127.0.0.1:*"
STORAGE_ENV = "OPTUNA_STORAGE"          # the storage URL, when it is not given as an argument


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header value matches one of ``allowed`` (``name``, ``name:port`` or ``name:*``)."""
    host = (host or "").strip().lower()
    if not host:
        return False
    name, sep, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not sep or not port.isdigit():
        name, port = host, ""
    for pattern in allowed:
        pattern = pattern.strip().lower()
        if not pattern:
            continue
        if pattern == host:
            return True
        p_name, p_sep, p_port = pattern.rpartition(":")
        if p_sep and p_port == "*" and p_name == name:
            return True
        if not p_sep and pattern == name and not port:
            return True
    return False


def host_check(app: Callable, allowed: Sequence[str]) -> Callable:
    """WSGI middleware: 403 for a Host header outside ``allowed``."""
    allowed = [a for a in allowed if a.strip()]

    def checked(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not host_allowed(environ.get("HTTP_HOST", ""), allowed):
            body = b"Forbidden: this Host header is not allowed (see --allowed-hosts)\n"
            start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return checked


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(code).startswith(("4", "5")):
            super().log_request(code, size)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tracking/dashboard.py", description=__doc__.splitlines()[0])
    ap.add_argument("storage", nargs="?", default=None,
                    help=f"Optuna storage URL (default ${STORAGE_ENV}); a password belongs in PGPASSWORD or .pgpass")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--allowed-hosts", default=DEFAULT_ALLOWED_HOSTS,
                    help="comma-separated Host header values served (name, name:port, name:*)")
    args = ap.parse_args(argv)
    storage = args.storage or os.environ.get(STORAGE_ENV)
    if not storage:
        ap.error(f"pass the storage URL or set {STORAGE_ENV}")
    from optuna_dashboard import wsgi

    app = host_check(wsgi(storage), args.allowed_hosts.split(","))
    httpd = make_server(args.host, args.port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Host check: {args.allowed_hosts})",
          file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
