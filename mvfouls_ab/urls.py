"""Database and server URLs that may hold a password: redaction for printing, and keeping them out of argv.

Every URL printed (errors, logs, tags, the study's closing lines, tracking/stack.py) goes through :func:`redact`;
every message that may quote one (a driver's error text) through :func:`redact_text`, which also catches the
password in its percent-decoded and percent-encoded forms (``p%40ss`` in the URL is ``p@ss`` in a driver's message).

Child processes never get a password on their command line (``ps`` and ``docker inspect`` show it to every user):
a URL with a password goes to them in an environment variable (:data:`STORAGE_ENV`, :data:`TRACKING_ENV`, read by
``python -m mvfouls_ab.study`` when ``--storage`` / ``--tracking-uri`` are not given), or the password goes to a
``.pgpass`` file (tracking/stack.py) and the URL without it to the command line.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

STORAGE_ENV = "MVFOULS_STORAGE"          # the Optuna storage URL (also read by the notebooks)
TRACKING_ENV = "MVFOULS_TRACKING_URI"    # the MLflow tracking URI (also read by the notebooks)
MASK = "***"
# scheme://user:password@host: for URLs inside free text
_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)(?P<pw>[^@\s'\"]+)(?P<at>@)")


def password_of(url: str) -> str | None:
    """The password part of a URL as written (percent-encoded), or None."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for printing."""
    if not isinstance(url, str):
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _URL_CREDENTIALS.sub(lambda m: m["head"] + MASK + m["at"], url)
    if password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{hostport}", parts.path, parts.query, parts.fragment))


def secrets_of(urls: Iterable[str | None]) -> list[str]:
    """Every form a URL's password can take in a message: as written, percent-decoded, percent-encoded."""
    found: list[str] = []
    for url in urls:
        pw = password_of(url) if url else None
        if pw:
            for form in (pw, unquote(pw), quote(unquote(pw), safe=""), quote(unquote(pw))):
                if form and form not in found:
                    found.append(form)
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, urls: Iterable[str | None] = (), secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL's credentials masked, and every password of ``urls`` (in any encoding) and every
    string of ``secrets`` replaced by ***."""
    text = _URL_CREDENTIALS.sub(lambda m: m["head"] + MASK + m["at"], str(text))
    for secret in [*secrets_of(urls), *[s for s in secrets if s]]:
        text = text.replace(secret, MASK)
    return text


def without_password(url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password percent-decoded or None)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return (urlunsplit((parts.scheme, f"{user}@{hostport}", parts.path, parts.query, parts.fragment)),
            unquote(parts.password))


def pgpass_line(url: str, password: str, database: str | None = None) -> str:
    """A ``.pgpass`` line (host:port:database:user:password, ':' and '\\' escaped) for a PostgreSQL URL."""
    parts = urlsplit(url)

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace(":", "\\:")

    db = database if database is not None else (parts.path.lstrip("/") or "*")
    return ":".join(esc(x) for x in (parts.hostname or "localhost", str(parts.port or 5432), db,
                                     unquote(parts.username or ""), password))


def normalize_db_url(url: str) -> str:
    """postgresql://... -> postgresql+psycopg2://... when psycopg (v3), SQLAlchemy 2.1's default driver, is absent."""
    if url.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url
