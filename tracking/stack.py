#!/usr/bin/env python
"""The docker-compose stack, natively: PostgreSQL databases, `mlflow server`, `optuna-dashboard` and N study workers.

    python tracking/stack.py up --workers 2 [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--dir DIR]
        [--host ADDR] [--allowed-hosts NAME,NAME:PORT,...] [--auth auto|on|off]
    python tracking/stack.py status [--dir DIR]
    python tracking/stack.py down [--dir DIR] [--drop-databases]

`up` creates the MLflow and Optuna databases on the PostgreSQL server named by --pg-url (it does not start
PostgreSQL itself), each owned by a role of its own name that can connect to that database only (its password, like
the admin's, goes into DIR/pgpass, mode 0600, read by the services through PGPASSFILE: no password is ever on a
command line), creates the Optuna schema once (so the dashboard and the workers do not race to create it), starts
`mlflow server` (PostgreSQL backend store, artifacts served from DIR/mlartifacts), the Optuna dashboard on the Optuna
database (tracking/dashboard.py: optuna-dashboard behind a Host check, always on 127.0.0.1) and N workers
(`python -m mvfouls_ab.study --until TRIALS`), each in its own process group with its log in DIR/logs/, waits until
MLflow's /health and the dashboard's /api/meta answer, and records everything in DIR/state.json (mode 0600). The
first worker starts alone; the others start once it has created the study and its MLflow parent run (so they join
that run and reuse its data/feature caches instead of racing to build them). `down` stops exactly the process groups
recorded there (checking each PID still is the process it started), `status` reports them. `--workers-only` starts
workers against stores that run elsewhere (another machine).

Other machines: `--host ADDR` publishes MLflow on ADDR; MLflow accepts the Host headers of loopback, ADDR and
`--allowed-hosts` (also read from $MLFLOW_ALLOWED_HOSTS). `--auth auto` (the default) turns on MLflow's basic-auth app
(`--app-name basic-auth`) whenever ADDR is not a loopback address: user admin, password $MLFLOW_ADMIN_PASSWORD (or
one generated into DIR/mlflow_admin_password); the workers get it in MLFLOW_TRACKING_USERNAME/PASSWORD.

The command lines are built by the functions below; tests/tracking/test_compose.py checks that docker-compose.yml runs the
same ones (same program, same flags, same values up to host names and paths).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from mvfouls_ab.fsutil import atomic_write
from mvfouls_ab.urls import pgpass_line, redact, redact_text, without_password

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DIR = Path(".stack")
MLFLOW_DB = "mlflow"
OPTUNA_DB = "optuna"
STUDY_NAME = "mvfouls"
# Host headers MLflow accepts: the compose service name (containers) and loopback (the browser).
ALLOWED_HOSTS = "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
DASHBOARD_ALLOWED_HOSTS = "localhost,localhost:*,127.0.0.1,127.0.0.1:*"
DASHBOARD_SCRIPT = str(Path(__file__).resolve().parent / "dashboard.py")
# Environment of the mlflow server: its job runner (GenAI judge jobs: 7 extra processes) is of no use here.
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
AUTH_APP = "basic-auth"
ADMIN_USER = "admin"
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = {user}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a verified user/password pair is not hashed again (PBKDF2) for a minute: every request of a worker carries it
auth_cache_ttl_seconds = 60
"""
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


# ---- the command lines (shared with docker-compose.yml, checked by tests/tracking/test_compose.py) ----------------------
def mlflow_server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                          port: int = 5000, allowed_hosts: str = ALLOWED_HOSTS, workers: int = 1,
                          app_name: str | None = None) -> list[str]:
    """`mlflow server` with a database backend store and artifacts served (proxied) by the server itself;
    app_name="basic-auth": every request but /health needs a user and password."""
    cmd = ["mlflow", "server",
           "--backend-store-uri", backend_store_uri,
           "--serve-artifacts", "--artifacts-destination", artifacts_destination,
           "--host", host, "--port", str(port),
           "--allowed-hosts", allowed_hosts,
           "--workers", str(workers)]
    return cmd + (["--app-name", app_name] if app_name else [])


def dashboard_command(storage: str, host: str = "127.0.0.1", port: int = 8080,
                      allowed_hosts: str = DASHBOARD_ALLOWED_HOSTS, script: str = DASHBOARD_SCRIPT) -> list[str]:
    """optuna-dashboard behind a Host check (tracking/dashboard.py), the storage URL as its positional argument."""
    return ["python", script, storage, "--host", host, "--port", str(port), "--allowed-hosts", allowed_hosts]


def worker_command(storage: str, tracking_uri: str, study_name: str = STUDY_NAME, trials: int = 50,
                   profile: str = "cpu", data: str | None = None, out: str | None = None, threads: int = 0,
                   extra: Sequence[str] = ()) -> list[str]:
    """One study worker. Every worker started with the same study name and storage joins the same study; each stops
    once the study has `trials` finished trials in total (--until), so a worker that joins late or restarts after a
    crash does not add trials of its own. `storage` carries no password (PGPASSFILE / PGPASSWORD do)."""
    if without_password(storage)[1] is not None or without_password(tracking_uri)[1] is not None:
        raise ValueError("a password must not go on a worker's command line: use a .pgpass file or the environment")
    cmd = ["python", "-m", "mvfouls_ab.study",
           "--study-name", study_name, "--storage", storage, "--tracking-uri", tracking_uri,
           "--until", str(trials), "--profile", profile]
    if threads:
        cmd += ["--threads", str(threads)]
    if data:
        cmd += ["--data", data]
    if out:
        cmd += ["--out", out]
    return cmd + list(extra)


def database_url(server_url: str, database: str, user: str | None = None, password: str | None = None) -> str:
    """The SQLAlchemy URL of `database` on the server of `server_url` (same host and port; the same user and
    password unless given). The driver is named (postgresql+psycopg2): SQLAlchemy 2.1 maps a bare postgresql:// to
    psycopg 3."""
    parts = urlsplit(server_url)
    netloc = parts.netloc
    if user is not None:
        hostport = netloc.rpartition("@")[2]
        netloc = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "") + "@" + hostport
    return urlunsplit(("postgresql+psycopg2", netloc, "/" + database, parts.query, ""))


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str = "127.0.0.1", extra: str | Iterable[str] | None = None) -> str:
    """The Host headers MLflow accepts: loopback and the compose name, the published address `host` (a remote
    worker's URL names it), this machine's name when it binds every interface, and `extra`."""
    names = ALLOWED_HOSTS.split(",")
    bound = [] if host in ("127.0.0.1", "localhost") else ([socket.gethostname(), socket.getfqdn()]
                                                             if host in ("0.0.0.0", "::", "") else [host])
    for name in bound:
        names += [name, f"{name}:*"]
    if extra:
        names += [h.strip() for h in (extra.split(",") if isinstance(extra, str) else extra) if h.strip()]
    return ",".join(dict.fromkeys(names))


# ---- PostgreSQL ---------------------------------------------------------------------------------------------
def _admin_connection(pg_url: str, passfile: str | Path | None = None):
    import psycopg2

    plain, password = without_password(pg_url)
    kwargs: dict[str, Any] = {"connect_timeout": 10}
    if password is not None:
        kwargs["password"] = password
    elif passfile and Path(passfile).is_file():
        kwargs["passfile"] = str(passfile)
    try:
        conn = psycopg2.connect(plain.replace("postgresql+psycopg2://", "postgresql://"), **kwargs)
    except psycopg2.OperationalError as exc:
        raise SystemExit(f"{redact(pg_url)}: cannot connect to PostgreSQL "
                         f"({redact_text(str(exc).strip(), [pg_url])}). Fix: start PostgreSQL or pass "
                         "--pg-url postgresql://USER@HOST:PORT/postgres (password in ~/.pgpass or PGPASSWORD)"
                         ) from None
    conn.autocommit = True   # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


def create_databases(pg_url: str, names: Iterable[str], owners: dict[str, str] | None = None) -> list[str]:
    """Create each database that does not exist yet (owned by owners[name] when given); returns the ones created."""
    from psycopg2 import sql

    created = []
    owners = owners or {}
    conn = _admin_connection(pg_url)
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    if name in owners:
                        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                                  sql.Identifier(owners[name])))
                    else:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    finally:
        conn.close()
    return created


def create_roles(pg_url: str, roles: dict[str, str]) -> list[str]:
    """One login role per database (role name -> password): no superuser, no CREATEDB/CREATEROLE. Existing roles get
    the new password. Returns the roles created."""
    from psycopg2 import sql

    created = []
    conn = _admin_connection(pg_url)
    try:
        with conn.cursor() as cur:
            for role, password in roles.items():
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
                            .format(sql.Identifier(role), sql.Literal(password)))
                if verb == "CREATE":
                    created.append(role)
    finally:
        conn.close()
    return created


def restrict_databases(pg_url: str, owners: dict[str, str]) -> None:
    """Each database: owned by its role (it creates its own tables), CONNECT revoked from PUBLIC (no other role but
    the superuser can open it)."""
    from psycopg2 import sql

    conn = _admin_connection(pg_url)
    try:
        with conn.cursor() as cur:
            for db, role in owners.items():
                cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db), sql.Identifier(role)))
                cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
                cur.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
                    sql.Identifier(db), sql.Identifier(role)))
    finally:
        conn.close()


def drop_databases(pg_url: str, names: Iterable[str], roles: Iterable[str] = (),
                   passfile: str | Path | None = None) -> None:
    from psycopg2 import sql

    conn = _admin_connection(pg_url, passfile)
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            for role in roles:
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    finally:
        conn.close()


def write_pgpass(path: Path, entries: Iterable[tuple[str, str, str | None]]) -> Path:
    """A libpq password file (mode 0600): (url, password, database) per line."""
    lines = [pgpass_line(url, password, db) for url, password, db in entries]
    return atomic_write(path, "".join(line + "\n" for line in lines), mode=0o600)


def init_optuna_schema(storage: str, passfile: str | Path | None = None) -> None:
    """Create Optuna's tables once, before the dashboard and several workers would race to create them."""
    import optuna

    kwargs = {"connect_args": {"passfile": str(passfile)}} if passfile else {}
    storage_obj = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
    storage_obj.remove_session()
    storage_obj.engine.dispose()


# ---- processes ----------------------------------------------------------------------------------------------
def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        try:                           # our own child (tests run `up` in-process): reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return None
    return int(fields[19])


def alive(service: dict) -> bool:
    """True while the recorded process runs and still is the process that was started (not a reused PID)."""
    return _start_ticks(service["pid"]) == service["start_ticks"]


def spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> dict:
    """Start `cmd` in a new session (its own process group), stdout and stderr to `log_path`."""
    import subprocess

    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_executable(cmd[0]), *cmd[1:]]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
    return {"name": name, "pid": proc.pid, "pgid": proc.pid, "start_ticks": _start_ticks(proc.pid),
            "cmd": cmd, "log": str(log_path), "started_at": time.time()}


def _executable(program: str) -> str:
    """`python`, `mlflow`, `optuna-dashboard` of the environment running this script (even if not on PATH)."""
    if program == "python":
        return sys.executable
    sibling = Path(sys.executable).parent / program
    return str(sibling) if sibling.is_file() else program


def stop(service: dict, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Signal the service's process group; SIGKILL it after `timeout`. False if it was not running."""
    if not alive(service):
        return False
    try:
        os.killpg(service["pgid"], sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(service) and not _group_exists(service["pgid"]):
            return True
        time.sleep(0.2)
    try:
        os.killpg(service["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10.0
    while alive(service) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# Health checks go straight to the services: never through an http(s)_proxy from the environment.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with DIRECT.open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(service: dict, url: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if not alive(service):
            raise RuntimeError(f"{service['log']}: {service['name']} exited before {url} answered. Fix: read the "
                               f"log; last lines:\n{tail(service['log'])}")
        time.sleep(0.5)
    raise RuntimeError(f"{service['log']}: {service['name']} did not answer {url} within {timeout:.0f} s. "
                       f"Fix: read the log; last lines:\n{tail(service['log'])}")


def wait_study_ready(storage: str, study_name: str, first_worker: dict, timeout: float = 1800.0,
                     passfile: str | Path | None = None) -> None:
    """Wait until the first worker has created the study and its MLflow parent run (study user attribute
    `mlflow_parent_run_id`) before starting the others: they then join that run instead of racing to create one,
    and reuse the data and feature caches it has just filled instead of computing them in parallel."""
    import optuna

    rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"passfile": str(passfile)}}
                                     if passfile else {})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if "mlflow_parent_run_id" in rdb.get_study_user_attrs(rdb.get_study_id_from_name(study_name)):
                    return
            except KeyError:          # the study does not exist yet
                pass
            if not alive(first_worker):
                raise RuntimeError(f"{first_worker['log']}: the first worker exited before the study was ready. "
                                   f"Fix: read the log; last lines:\n{tail(first_worker['log'])}")
            time.sleep(1.0)
    finally:
        rdb.remove_session()
        rdb.engine.dispose()
    raise RuntimeError(f"{first_worker['log']}: study {study_name!r} not ready after {timeout:.0f} s")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# ---- state and secrets --------------------------------------------------------------------------------------
def state_path(directory: Path) -> Path:
    return Path(directory) / "state.json"


def read_state(directory: Path) -> dict | None:
    p = state_path(directory)
    return json.loads(p.read_text()) if p.is_file() else None


def write_state(directory: Path, state: dict) -> None:
    atomic_write(state_path(directory), json.dumps(state, indent=1), mode=0o600)


def secret(directory: Path, name: str, env_var: str | None = None, env: dict[str, str] | None = None) -> str:
    """$env_var, else the one kept in DIR/<name> (mode 0600), else a new random one kept there."""
    env = os.environ if env is None else env
    if env_var and env.get(env_var):
        return env[env_var]
    path = Path(directory) / name
    if path.is_file():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    atomic_write(path, value + "\n", mode=0o600)
    return value


# ---- up / down / status -------------------------------------------------------------------------------------
def up(directory: Path = DEFAULT_DIR, workers: int = 2, pg_url: str = DEFAULT_PG_URL, mlflow_db: str = MLFLOW_DB,
       optuna_db: str = OPTUNA_DB, host: str = "127.0.0.1", mlflow_port: int = 5000, dashboard_port: int = 8080,
       study_name: str = STUDY_NAME, trials: int = 50, profile: str = "cpu", data: str | None = None,
       worker_threads: int = 0, worker_args: Sequence[str] = (), workers_only: bool = False,
       storage: str | None = None, tracking_uri: str | None = None,
       env: dict[str, str] | None = None, extra_allowed_hosts: str | None = None, auth: str = "auto",
       mlflow_workers: int = 1) -> dict:
    """Start the stack (or, with workers_only, just workers against `storage` and `tracking_uri`).

    Passwords: the admin's (in `pg_url`, or from ~/.pgpass / PGPASSWORD), the two database roles' (generated) and
    the one of a `--workers-only` storage URL go to DIR/pgpass; the processes get PGPASSFILE and password-less URLs.
    `auth`: "on", "off" or "auto" (on when `host` is not a loopback address)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)      # pgpass, secrets and state live here
    old = read_state(directory)
    if old and any(alive(s) for s in old["services"]):
        raise SystemExit(f"{state_path(directory)}: a stack started from this folder is still running. "
                         f"Fix: python tracking/stack.py down --dir {directory}")
    base_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}   # logs line by line
    extra_allowed_hosts = extra_allowed_hosts if extra_allowed_hosts is not None else \
        base_env.get("MLFLOW_ALLOWED_HOSTS")
    passfile = directory / "pgpass"
    admin_url, admin_password = without_password(pg_url)
    state: dict[str, Any] = {"dir": str(directory), "created_at": time.time(), "services": [],
                             "databases": [], "roles": [], "pg_url": admin_url}
    pgpass: list[tuple[str, str, str | None]] = []
    if admin_password is not None:
        pgpass.append((admin_url, admin_password, "*"))
    use_auth = auth == "on" or (auth == "auto" and not is_loopback(host) and not workers_only)
    try:
        if workers_only:
            if not (storage and tracking_uri):
                raise SystemExit("--workers-only needs --storage and --tracking-uri (the stores on the server machine)")
            storage, storage_password = without_password(storage)
            if storage_password is not None:
                pgpass.append((storage, storage_password, None))
            tracking_uri, tracking_password = without_password(tracking_uri)
            if tracking_password is not None:     # http://user:password@host:port: the client reads them from env
                base_env["MLFLOW_TRACKING_USERNAME"] = urlsplit(tracking_uri).username or ADMIN_USER
                base_env["MLFLOW_TRACKING_PASSWORD"] = tracking_password
        else:
            for h, port in ((host, mlflow_port), ("127.0.0.1" if not is_loopback(host) else host, dashboard_port)):
                if not port_free(h, port):
                    raise SystemExit(f"{h}:{port} is already in use. Fix: pass --mlflow-port/--dashboard-port "
                                     f"or stop what listens there")
            roles = {mlflow_db: secrets.token_urlsafe(24), optuna_db: secrets.token_urlsafe(24)}
            owners = {mlflow_db: mlflow_db, optuna_db: optuna_db}          # one role per database, of its name
            state["roles_created"] = create_roles(pg_url, roles)
            state["roles"] = list(roles)
            write_state(directory, state)
            created = create_databases(pg_url, [mlflow_db, optuna_db], owners)
            state["databases"] = [mlflow_db, optuna_db]
            state["databases_created"] = created
            restrict_databases(pg_url, owners)
            pgpass += [(database_url(admin_url, db, role), pw, db) for db, (role, pw) in
                       ((mlflow_db, (mlflow_db, roles[mlflow_db])), (optuna_db, (optuna_db, roles[optuna_db])))]
            write_pgpass(passfile, pgpass)
            storage = database_url(admin_url, optuna_db, optuna_db)
            init_optuna_schema(storage, passfile)
            client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            dash_host = host if is_loopback(host) else "127.0.0.1"   # never published beyond this machine
            tracking_uri = f"http://{client_host}:{mlflow_port}"
            state["urls"] = {"mlflow": tracking_uri, "dashboard": f"http://{dash_host}:{dashboard_port}"}
            state["allowed_hosts"] = allowed_hosts(host, extra_allowed_hosts)
            state["auth"] = use_auth
            mlflow_env = {**base_env, **MLFLOW_ENV, "PGPASSFILE": str(passfile)}
            if use_auth:
                admin = secret(directory, "mlflow_admin_password", "MLFLOW_ADMIN_PASSWORD", base_env)
                atomic_write(directory / "basic_auth.ini",
                             AUTH_INI.format(db=directory / "mlflow_auth.db", user=ADMIN_USER), mode=0o600)
                mlflow_env.update({"MLFLOW_AUTH_CONFIG_PATH": str(directory / "basic_auth.ini"),
                                   "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(directory, "mlflow_secret_key")})
                base_env.update({"MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": admin})
                state["admin"] = {"user": ADMIN_USER, "password_file": str(directory / "mlflow_admin_password")
                                  if not base_env.get("MLFLOW_ADMIN_PASSWORD") else "$MLFLOW_ADMIN_PASSWORD"}
            mlflow = spawn("mlflow", mlflow_server_command(database_url(admin_url, mlflow_db, mlflow_db),
                                                           str(directory / "mlartifacts"), host, mlflow_port,
                                                           state["allowed_hosts"], mlflow_workers,
                                                           AUTH_APP if use_auth else None),
                           directory / "logs" / "mlflow.log", mlflow_env, cwd=directory)
            state["services"].append(mlflow)
            write_state(directory, state)
            dash_allowed = ",".join(dict.fromkeys([*DASHBOARD_ALLOWED_HOSTS.split(","), dash_host, f"{dash_host}:*"]))
            dashboard = spawn("optuna-dashboard", dashboard_command(storage, dash_host, dashboard_port, dash_allowed),
                              directory / "logs" / "optuna-dashboard.log", {**base_env, "PGPASSFILE": str(passfile)},
                              cwd=directory)
            state["services"].append(dashboard)
            write_state(directory, state)
            wait_healthy(mlflow, f"{tracking_uri}/health")
            wait_healthy(dashboard, f"{state['urls']['dashboard']}/api/meta")
        if pgpass and not passfile.is_file():
            write_pgpass(passfile, pgpass)
        state["storage"] = storage
        state["tracking_uri"] = tracking_uri
        worker_env = dict(base_env)
        if passfile.is_file():
            worker_env["PGPASSFILE"] = str(passfile)
        if worker_threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                worker_env[var] = str(worker_threads)
        for i in range(workers):
            cmd = worker_command(storage, tracking_uri, study_name, trials, profile, data,
                                 str(directory / "runs"), worker_threads, worker_args)
            state["services"].append(spawn(f"worker-{i + 1}", cmd, directory / "logs" / f"worker-{i + 1}.log",
                                           worker_env))
            write_state(directory, state)
            if i == 0 and workers > 1:
                wait_study_ready(storage, study_name, state["services"][-1],
                                 passfile=passfile if passfile.is_file() else None)
    except BaseException:
        for service in reversed(state["services"]):
            stop(service)
        if state.get("databases_created") or state.get("roles_created"):
            drop_databases(pg_url, state.get("databases_created", []), state.get("roles_created", []))
        state["services"], state["databases"], state["roles"] = [], [], []
        write_state(directory, state)
        raise
    write_state(directory, state)
    return state


def down(directory: Path = DEFAULT_DIR, drop: bool = False, pg_url: str | None = None,
         timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop what `up` started from `directory` (workers first); returns the names of the services stopped.
    drop: also drop the databases and roles `up` made (admin password from --pg-url, DIR/pgpass or ~/.pgpass)."""
    state = read_state(directory)
    if state is None:
        return []
    stopped = [s["name"] for s in reversed(state["services"]) if stop(s, timeout=timeout)]
    if drop and (state.get("databases") or state.get("roles")):
        drop_databases(pg_url or state["pg_url"], state.get("databases", []), state.get("roles", []),
                       passfile=Path(directory) / "pgpass")
        state["databases"], state["roles"] = [], []
    write_state(directory, state)
    return stopped


def status(directory: Path = DEFAULT_DIR) -> list[dict]:
    """One row per service: name, pid, running, healthy (servers), log."""
    state = read_state(directory)
    if state is None:
        return []
    urls = state.get("urls", {})
    health = {"mlflow": urls.get("mlflow", "") + "/health",
              "optuna-dashboard": urls.get("dashboard", "") + "/api/meta"}
    rows = []
    for s in state["services"]:
        running = alive(s)
        rows.append({"name": s["name"], "pid": s["pid"], "running": running,
                     "healthy": http_ok(health[s["name"]]) if running and s["name"] in health else None,
                     "log": s["log"]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tracking/stack.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the stack")
    p_up.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="logs, PIDs (state.json), artifacts, runs")
    p_up.add_argument("--workers", type=int, default=2)
    p_up.add_argument("--pg-url", default=DEFAULT_PG_URL,
                      help="an admin connection to the PostgreSQL server (its password: ~/.pgpass or PGPASSWORD)")
    p_up.add_argument("--mlflow-db", default=MLFLOW_DB, help="MLflow's database, and the name of its role")
    p_up.add_argument("--optuna-db", default=OPTUNA_DB, help="Optuna's database, and the name of its role")
    p_up.add_argument("--host", default="127.0.0.1",
                      help="address MLflow listens on; 0.0.0.0 (behind a firewall) or a private address lets workers "
                           "on other machines in (and turns on basic auth, see --auth)")
    p_up.add_argument("--allowed-hosts", default=None,
                      help="more Host headers MLflow accepts, comma-separated (name, name:port, name:*): the name "
                           "remote workers use in --tracking-uri (default $MLFLOW_ALLOWED_HOSTS)")
    p_up.add_argument("--auth", choices=("auto", "on", "off"), default="auto",
                      help="MLflow basic-auth app (user admin, password $MLFLOW_ADMIN_PASSWORD or generated into "
                           "DIR/mlflow_admin_password); auto: on when --host is not a loopback address")
    p_up.add_argument("--mlflow-port", type=int, default=5000)
    p_up.add_argument("--dashboard-port", type=int, default=8080)
    p_up.add_argument("--study-name", default=STUDY_NAME)
    p_up.add_argument("--trials", type=int, default=50, help="finished trials the study stops at (all workers)")
    p_up.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    p_up.add_argument("--data", default=None, help="MVFouls root (default: the synthetic data set)")
    p_up.add_argument("--worker-threads", type=int, default=0, help="torch (and OMP/MKL) threads per worker (0: cores // 1)")
    p_up.add_argument("--workers-only", action="store_true",
                      help="start only workers, against --storage and --tracking-uri of a stack elsewhere")
    p_up.add_argument("--storage", default=os.environ.get("MVFOULS_STORAGE"),
                      help="with --workers-only: the Optuna storage URL (default $MVFOULS_STORAGE; a password in it "
                           "goes to DIR/pgpass, not to the workers' command lines)")
    p_up.add_argument("--tracking-uri", default=os.environ.get("MVFOULS_TRACKING_URI"),
                      help="with --workers-only: the MLflow server URL (default $MVFOULS_TRACKING_URI)")
    p_up.add_argument("worker_args", nargs=argparse.REMAINDER,
                      help="after --: more `python -m mvfouls_ab.study` options, e.g. -- --timeout 3600")
    p_down = sub.add_parser("down", help="stop what `up` started")
    p_down.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p_down.add_argument("--drop-databases", action="store_true", help="also drop the databases and roles `up` made")
    p_down.add_argument("--pg-url", default=None, help="admin URL for --drop-databases (default: the one of up)")
    p_status = sub.add_parser("status", help="what runs, and whether the servers answer")
    p_status.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)

    if args.cmd == "up":
        extra = [a for a in args.worker_args if a != "--"]
        state = up(args.dir, args.workers, args.pg_url, args.mlflow_db, args.optuna_db, args.host,
                   args.mlflow_port, args.dashboard_port, args.study_name, args.trials, args.profile, args.data,
                   args.worker_threads, extra, args.workers_only, args.storage, args.tracking_uri,
                   extra_allowed_hosts=args.allowed_hosts, auth=args.auth)
        for name, url in state.get("urls", {}).items():
            print(f"{name:10s} {url}")
        print(f"{'storage':10s} {redact(state['storage'])}  (password: PGPASSFILE={Path(state['dir']) / 'pgpass'})")
        if state.get("auth"):
            print(f"{'auth':10s} MLflow basic auth on: user {ADMIN_USER}, password in {state['admin']['password_file']}")
        print(f"started {len(state['services'])} processes; logs in {Path(state['dir']) / 'logs'}; "
              f"stop with: python tracking/stack.py down --dir {state['dir']}")
    elif args.cmd == "down":
        stopped = down(args.dir, args.drop_databases, args.pg_url)
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    else:
        rows = status(args.dir)
        if not rows:
            print(f"no stack recorded in {state_path(args.dir)}")
        for r in rows:
            health = "" if r["healthy"] is None else ("healthy" if r["healthy"] else "NOT answering")
            print(f"{r['name']:18s} pid {r['pid']:<8d} {'running' if r['running'] else 'stopped':8s} {health:14s} "
                  f"{r['log']}")
        return 0 if rows and any(r["running"] for r in rows) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
