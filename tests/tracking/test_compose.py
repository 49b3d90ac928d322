"""docker-compose.yml, parsed and checked against the tools it runs (Docker itself does not run here).

Every command line is compared with the one tracking/stack.py builds (the native stack runs the same commands) and
its flags with the `--help` of the pinned tools, installed here at the same versions as in the images.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.slow   # docker compose config and the pinned tools' --help

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PASSWORD = "s3cretTestOnly"          # what a user puts into .env; .env.example leaves it empty
SECRETS = {"POSTGRES_PASSWORD": PASSWORD, "MLFLOW_DB_PASSWORD": "mlflowRoleTestOnly",
           "OPTUNA_DB_PASSWORD": "optunaRoleTestOnly", "MLFLOW_ADMIN_PASSWORD": "adminTestOnly",
           "MLFLOW_SECRET_KEY": "csrfKeyTestOnly"}


def load_stack():
    spec = importlib.util.spec_from_file_location("mvfouls_stack", ROOT / "tracking" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack = load_stack()


# ---- compose's variable interpolation (the subset of the spec docker-compose.yml uses) ------------------------
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"required variable {name} is missing: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        if op and op.endswith("+"):
            return "" if unset else arg
        return val or ""

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, val = line.partition("=")
            env[key.strip()] = val.strip()
    return env


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return {**read_env_file(ENV_EXAMPLE), **SECRETS}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw, env) -> dict:
    return interpolate(raw, env)


def argv(service: dict) -> list[str]:
    """The full command line a container runs: entrypoint + command (all ours are given as lists)."""
    entry = service.get("entrypoint", [])
    cmd = service.get("command", [])
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [str(a) for a in entry + cmd]


def option_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# ---- --help of the pinned tools -----------------------------------------------------------------------------
def help_flags(cmd: list[str]) -> set[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stderr[-2000:]}"
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout))
    assert len(flags) >= 3, out.stdout
    return flags


@pytest.fixture(scope="module")
def accepted() -> dict[str, set[str]]:
    return {
        "mlflow": help_flags([stack._executable("mlflow"), "server", "--help"]),
        "optuna-dashboard": help_flags([sys.executable, str(ROOT / "tracking" / "dashboard.py"), "--help"]),
        "study": help_flags([sys.executable, "-m", "mvfouls_ab.study", "--help"]),
    }


def flags_of(cmd: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in cmd if a.startswith("--")}


# ---- tests ----------------------------------------------------------------------------------------------------
SERVERS = ("postgres", "mlflow", "optuna-dashboard")
WORKERS = ("worker", "worker-gpu")
DASHBOARD_SCRIPT = "/opt/mvfouls/dashboard.py"


def storage_url(env: dict[str, str]) -> str:
    """The workers' and dashboard's storage: the Optuna role (named like its database), no password in it."""
    return f"postgresql+psycopg2://{env['OPTUNA_DB']}@postgres:5432/{env['OPTUNA_DB']}"


def hosts_of(cmd: list[str]) -> list[str]:
    return option_value(cmd, "--allowed-hosts").split(",")


def test_services_and_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {*SERVERS, *WORKERS}
    for name in SERVERS:
        hc = services[name]["healthcheck"]
        assert hc["test"][0] in ("CMD", "CMD-SHELL") and hc.get("retries", 0) >= 3, name
        assert services[name]["restart"] == "unless-stopped"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in " ".join(services["postgres"]["healthcheck"]["test"])   # waits for the init script
    assert "http://127.0.0.1:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/api/meta" in " ".join(services["optuna-dashboard"]["healthcheck"]["test"])
    for name in ("mlflow", "optuna-dashboard"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in WORKERS:
        deps = services[name]["depends_on"]
        assert {d: c["condition"] for d, c in deps.items()} == {s: "service_healthy" for s in SERVERS}
        # a crashed worker comes back, but a config error does not loop forever
        assert services[name]["restart"] == "on-failure:5"
        # SIGTERM: the worker finishes its epoch and hands the trial back before Docker's SIGKILL
        assert services[name]["stop_grace_period"] == "2m"
    # the GPU worker is opt-in and reserves an NVIDIA device
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["worker"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert compose["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_images_pinned_and_match_the_tools_tested_here(compose):
    import mlflow
    import optuna_dashboard
    import torch

    services = compose["services"]
    image, tag = services["postgres"]["image"].rsplit(":", 1)
    assert image == "postgres" and re.fullmatch(r"\d+\.\d+", tag)
    image, tag = services["optuna-dashboard"]["image"].rsplit(":", 1)
    assert image == "ghcr.io/optuna/optuna-dashboard" and tag == f"v{optuna_dashboard.__version__}"

    mlflow_df = (ROOT / services["mlflow"]["build"]["context"] / services["mlflow"]["build"]["dockerfile"]).read_text()
    pinned = re.search(r"mlflow\[auth\]==(3\.17\.\d+)", mlflow_df)     # [auth]: Flask-WTF for basic-auth
    assert pinned and re.search(r"psycopg2(-binary)?==\d", mlflow_df)
    assert mlflow.__version__.startswith("3.17."), "the --help checked here must be that of the pinned mlflow"
    assert services["mlflow"]["image"].endswith(pinned.group(1))
    import flask_wtf  # noqa: F401 - the basic-auth app runs here too (tracking/stack.py, tests/test_stack.py)

    worker_df = (ROOT / services["worker"]["build"]["context"] / services["worker"]["build"]["dockerfile"]).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in worker_df
    for src in re.findall(r"^COPY (.+) \S+$", worker_df, re.MULTILINE):
        for path in src.split():
            if path != "README.md":          # the lead's README, required by pyproject.toml
                assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_command_lines_match_the_native_stack(compose, env):
    services = compose["services"]
    mlflow_cmd = argv(services["mlflow"])
    expected = stack.mlflow_server_command(
        f"postgresql+psycopg2://{env['MLFLOW_DB']}@postgres:5432/{env['MLFLOW_DB']}", "/mlartifacts", "0.0.0.0",
        5000, stack.allowed_hosts("127.0.0.1"), int(env["MLFLOW_WORKERS"]), stack.AUTH_APP)
    i = mlflow_cmd.index("--allowed-hosts") + 1
    assert mlflow_cmd[:i] + mlflow_cmd[i + 1:] == expected[:i] + expected[i + 1:]
    assert set(mlflow_cmd[i].split(",")) == set(expected[i].split(","))          # the same hosts
    env_mlflow = {k: str(v) for k, v in services["mlflow"]["environment"].items()}
    assert {k: env_mlflow[k] for k in stack.MLFLOW_ENV} == stack.MLFLOW_ENV
    storage = storage_url(env)
    assert argv(services["optuna-dashboard"]) == stack.dashboard_command(
        storage, "0.0.0.0", 8080, stack.DASHBOARD_ALLOWED_HOSTS, script=DASHBOARD_SCRIPT)
    for name, profile, threads in (("worker", "cpu", int(env["WORKER_THREADS"])), ("worker-gpu", "gpu", 0)):
        assert argv(services[name]) == stack.worker_command(storage, "http://mlflow:5000", env["STUDY_NAME"],
                                                            int(env["TRIALS"]), profile, "/data", "/runs", threads)


def test_every_flag_is_accepted_by_the_pinned_tools(compose, accepted):
    services = compose["services"]
    tools = {"mlflow": "mlflow", "optuna-dashboard": "optuna-dashboard", "worker": "study", "worker-gpu": "study"}
    for name, tool in tools.items():
        cmd = argv(services[name])
        unknown = flags_of(cmd) - accepted[tool]
        assert not unknown, f"{name}: flags {sorted(unknown)} are not accepted by {tool}"
    # and the native stack's lines too (with the extras it may add)
    native = [stack.mlflow_server_command("sqlite:///x.db", "/tmp/a", app_name=stack.AUTH_APP),
              stack.dashboard_command("sqlite:///x.db"),
              stack.worker_command("sqlite:///x.db", "http://127.0.0.1:5000", data="/d", out="/o", threads=1)]
    for cmd, tool in zip(native, ("mlflow", "optuna-dashboard", "study")):
        assert flags_of(cmd) <= accepted[tool], tool
    assert "basic-auth" in subprocess.run([stack._executable("mlflow"), "server", "--help"], capture_output=True,
                                          text=True, timeout=120, check=False).stdout


def test_dashboard_takes_the_workers_storage_as_positional_argument(compose, raw):
    services = compose["services"]
    dash = argv(services["optuna-dashboard"])
    assert dash[:2] == ["python", DASHBOARD_SCRIPT] and not dash[2].startswith("-")
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["optuna-dashboard"]["volumes"]}
    assert (ROOT / mounted[DASHBOARD_SCRIPT]).resolve() == ROOT / "tracking" / "dashboard.py"
    for name in WORKERS:
        assert option_value(argv(services[name]), "--storage") == dash[2]
    # Optuna and MLflow: the same server, separate databases, each opened by its own role, the ones the init
    # script creates; the URLs hold no password (each service gets its role's in PGPASSWORD)
    pg_env = services["postgres"]["environment"]
    optuna_url = urlsplit(dash[2])
    mlflow_url = urlsplit(option_value(argv(services["mlflow"]), "--backend-store-uri"))
    assert optuna_url.path == f"/{pg_env['OPTUNA_DB']}" and mlflow_url.path == f"/{pg_env['MLFLOW_DB']}"
    assert optuna_url.path != mlflow_url.path
    for url, db in ((optuna_url, "OPTUNA_DB"), (mlflow_url, "MLFLOW_DB")):
        assert url.scheme == "postgresql+psycopg2"   # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert (url.username, url.password) == (pg_env[db], None) and url.username != pg_env["POSTGRES_USER"]
    assert services["mlflow"]["environment"]["PGPASSWORD"] == pg_env["MLFLOW_DB_PASSWORD"]
    for name in ("optuna-dashboard", *WORKERS):
        assert services[name]["environment"]["PGPASSWORD"] == pg_env["OPTUNA_DB_PASSWORD"], name


def test_mlflow_requires_a_login_and_the_workers_have_one(compose, env):
    services = compose["services"]
    mlflow = services["mlflow"]
    assert option_value(argv(mlflow), "--app-name") == "basic-auth"
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_SECRET_KEY"]
    config = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    ini = (ROOT / mounted[config]).read_text()
    assert "admin_username = admin" in ini and "admin_password" not in ini      # the password comes from .env
    auth_db = re.search(r"database_uri = sqlite:///(\S+)", ini).group(1)
    assert any(auth_db.startswith(m + "/") for m in mounted if mounted[m] in compose["volumes"]), "users persist"
    for name in WORKERS:
        w_env = services[name]["environment"]
        assert (w_env["MLFLOW_TRACKING_USERNAME"], w_env["MLFLOW_TRACKING_PASSWORD"]) == \
            ("admin", env["MLFLOW_ADMIN_PASSWORD"])


def test_workers_reach_mlflow_and_the_browser_too(raw, env):
    from mlflow.server.security_utils import is_allowed_host_header

    for extra in ({}, {"BIND_ADDRESS": "10.0.0.5", "MLFLOW_ALLOWED_HOSTS": "tracking.lan,tracking.lan:5000"}):
        services = interpolate(raw, {**env, **extra})["services"]
        allowed = hosts_of(argv(services["mlflow"]))
        assert "" not in allowed
        port = option_value(argv(services["mlflow"]), "--port")
        for name in WORKERS:
            uri = urlsplit(option_value(argv(services[name]), "--tracking-uri"))
            assert (uri.hostname, str(uri.port)) == ("mlflow", port)
            assert is_allowed_host_header(allowed, uri.netloc)
        published = services["mlflow"]["ports"][0].split(":")[1]
        for host in (f"localhost:{published}", f"127.0.0.1:{published}"):
            assert is_allowed_host_header(allowed, host), host
        if extra:                # a remote worker names the published address, or a name from .env
            for host in ("10.0.0.5:5000", "tracking.lan", "tracking.lan:5000"):
                assert is_allowed_host_header(allowed, host), host
        assert not is_allowed_host_header(allowed, "evil.example.com")


@pytest.mark.parametrize("bind", [None, "from-env-example", "10.0.0.5"])
def test_published_ports_bind_to_loopback(raw, env, bind):
    """MLflow and PostgreSQL on BIND_ADDRESS (127.0.0.1 unless set); the dashboard, which has no login, on
    127.0.0.1 whatever BIND_ADDRESS is."""
    values = {**SECRETS} if bind is None else (dict(env) if bind == "from-env-example" else {**env, "BIND_ADDRESS": bind})
    services = interpolate(raw, values)["services"]
    expected_ip = bind if bind == "10.0.0.5" else "127.0.0.1"
    published = {}
    for name, service in services.items():
        for spec in service.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == ("127.0.0.1" if name == "optuna-dashboard" else expected_ip), f"{name} publishes {spec}"
            published[name] = (int(host_port), int(container_port))
    assert published == {"postgres": (5432, 5432), "mlflow": (5000, 5000), "optuna-dashboard": (8080, 8080)}


def test_workers_scale_and_mount_data_read_only(compose):
    services = compose["services"]
    for name in WORKERS:
        w = services[name]
        assert "container_name" not in w and "ports" not in w, "--scale worker=N needs neither"
        mounts = {m.split(":")[1]: m.split(":") for m in w["volumes"]}
        cmd = argv(w)
        data = mounts[option_value(cmd, "--data")]
        assert data[-1] == "ro", "the data folder is mounted read-only"
        assert option_value(cmd, "--out") in mounts and w["environment"]["MVFOULS_AB_CACHE"] in mounts
        for source, *_ in mounts.values():
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], source
    assert services["worker"]["environment"]["OMP_NUM_THREADS"] == "1"


def test_no_secret_in_the_repo_nor_on_a_command_line(raw, compose, env):
    env_example = read_env_file(ENV_EXAMPLE)
    for key in SECRETS:
        assert env_example[key] == "", key
        with pytest.raises(KeyError, match=key):     # compose refuses to start without each secret in .env
            interpolate(raw, {**env_example, **{k: v for k, v in SECRETS.items() if k != key}})
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    for service in compose["services"].values():
        for arg in argv(service):
            if "://" in arg:
                assert urlsplit(arg).password is None, arg
    # no secret reaches a process's arguments (ps, docker inspect), only environments
    for name, service in compose["services"].items():
        cmd = " ".join(argv(service) + [str(h) for h in (service.get("healthcheck") or {}).get("test", [])])
        for key, secret in SECRETS.items():
            assert secret not in cmd, (name, key)


def test_init_script_creates_both_databases_each_with_its_own_role(compose):
    """The script the postgres image runs on first start, run here against the local server."""
    import psycopg2

    services = compose["services"]
    mount = next(v for v in services["postgres"]["volumes"] if v.split(":")[1] == "/docker-entrypoint-initdb.d")
    folder = ROOT / mount.split(":")[0]
    scripts = sorted(folder.glob("*.sh"))
    assert scripts and all(os.access(s, os.X_OK) for s in scripts)
    names = [f"stk_init_{uuid.uuid4().hex[:8]}_{k}" for k in ("mlflow", "optuna")]
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": "5432", "POSTGRES_USER": "postgres",
           "MLFLOW_DB": names[0], "OPTUNA_DB": names[1], "MLFLOW_DB_PASSWORD": "it's;a\"pw",
           "OPTUNA_DB_PASSWORD": "other pw"}
    try:
        for _ in range(2):                     # idempotent: a second run keeps what exists
            out = subprocess.run(["sh", str(scripts[0])], env=env, capture_output=True, text=True, timeout=60,
                                 check=False)
            assert out.returncode == 0, out.stderr
        conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        with conn.cursor() as cur:
            cur.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = ANY(%s)", (names,))
            assert sorted(cur.fetchall()) == sorted((n, n) for n in names)          # each owned by its role
            cur.execute("SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                        "WHERE rolname = ANY(%s)", (names,))
            assert sorted(cur.fetchall()) == sorted((n, False, False, False, True) for n in names)
        conn.close()
        for role, other in (names, names[::-1]):
            with pytest.raises(psycopg2.OperationalError, match="permission denied"):
                psycopg2.connect(f"postgresql://{role}@127.0.0.1:5432/{other}")
    finally:
        stack.drop_databases("postgresql://postgres@127.0.0.1:5432/postgres", names, names)
