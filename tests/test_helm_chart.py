"""The Helm chart (deploy/helm/fluxserve) describes a fleet that works, checked offline.

Helm itself (the Helm v4 SDK bundled by `helm-python-sdk`) lints and renders the chart for several value
sets (the defaults, and deploy/helm/fluxserve/ci/: a Redis store, a PostgreSQL store in a Secret of the
user's, two worker groups scaling to zero) and refuses bad values through values.schema.json. The
rendered core objects pass `kubernetes-validate --strict` (schemas bundled, unknown fields refused) for
Kubernetes 1.25 (the oldest the chart accepts), 1.30 and the newest version it knows; KEDA's
ScaledObject and TriggerAuthentication and prometheus-operator's ServiceMonitor are checked against their
CRDs' models (cloudcoil) with unknown keys refused.

Then the rendering is checked against the code: every worker has a GPU limit and a grace period longer
than its longest job; every ScaledObject counts the keys (`fluxserve.jobs.redis.active_key`) or runs the
query (`fluxserve.jobs.postgres.active_jobs_query`) the store really maintains, for exactly the models its
workers claim; the models file is what the catalog reads; probes ask routes the apps serve; commands and
FLUXSERVE_* settings exist.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from fluxserve.catalog import RESERVED_SLUGS, SLUG_PATTERN, ModelConfigError, check_slug, model_table
from fluxserve.config import Settings, flat_fields
from fluxserve.jobs.postgres import active_jobs_query
from fluxserve.jobs.redis import active_key
from fluxserve.metrics import Metrics

pytestmark = pytest.mark.deploy

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) bundles Helm for this platform only "
                                                  "where its wheel exists (manylinux x86-64)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1")
prometheus_operator = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "fluxserve"
RELEASE, NAMESPACE = "demo", "gpu"
VALUE_SETS = {
    "defaults": None,
    "redis": CHART / "ci" / "redis-values.yaml",
    "postgres": CHART / "ci" / "postgres-values.yaml",
    "two-groups": CHART / "ci" / "two-groups-values.yaml",
}
# The oldest Kubernetes the chart accepts (Chart.yaml's kubeVersion), 1.30, and the newest whose schemas
# kubernetes-validate bundles.
KUBE_VERSIONS = ["1.25", "1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2])]
CRD_MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
}
API_PORT = 8000


# --- rendering ------------------------------------------------------------------------------------------


@functools.cache
def chart() -> Any:
    return helm.Chart.load(CHART)


def values_of(value_set: str) -> dict | None:
    path = VALUE_SETS[value_set]
    return yaml.safe_load(path.read_text()) if path else None


@functools.cache
def rendered_text(value_set: str) -> dict[str, str]:
    return chart().render(values_of(value_set), name=RELEASE, namespace=NAMESPACE)


def render_values(values: dict | None) -> list[dict]:
    return docs_of(chart().render(values, name=RELEASE, namespace=NAMESPACE))


def docs_of(templates: dict[str, str]) -> list[dict]:
    return [doc for name, text in sorted(templates.items()) if not name.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def rendered(value_set: str) -> list[dict]:
    return copy.deepcopy(docs_of(rendered_text(value_set)))


def merged_values(value_set: str) -> dict:
    """The values a release would use: the chart's defaults under the value set's."""
    return chart().merge_values(values_of(value_set))


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in of_kind(docs, kind)}


def component(doc: dict) -> str:
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, container) for every container of the Deployments and Jobs."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def env_of(container: dict) -> dict[str, Any]:
    """name -> literal value (or the valueFrom mapping)."""
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def overlay(base: dict, over: dict) -> dict:
    """`over` laid on `base`, maps merged at any depth (what the chart does with a worker group)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def worker_groups(value_set: str) -> dict[str, dict]:
    """Each workers[] entry as the chart reads it (workerDefaults with the entry laid on it, its models
    all of the table when it names none), by name."""
    values = merged_values(value_set)
    groups = {entry["name"]: overlay(values["workerDefaults"], entry) for entry in values["workers"]}
    for group in groups.values():
        group["models"] = group["models"] or sorted(model_table_of(value_set))
    return groups


def model_table_of(value_set: str) -> dict:
    return merged_values(value_set)["models"] or {"flux-dev": "black-forest-labs/FLUX.1-dev"}


def models_file(docs: list[dict], tmp_path: Path) -> Path:
    """The rendered models file (the ConfigMap every process mounts), written where this test can read it."""
    (config_map,) = [doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("-models")]
    path = tmp_path / "models.toml"
    path.write_text(config_map["data"]["models.toml"])
    return path


def worker_deployment_name(group: str) -> str:
    return f"{RELEASE}-fluxserve-worker-{group}"


# --- Helm: lint, render, schema -------------------------------------------------------------------------


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_lints(value_set, kube):
    report = helm.lint(CHART, values_of(value_set), strict=True, kube_version=f"v{kube}.0", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors (strict)
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_renders_the_fleet(value_set):
    docs = rendered(value_set)
    groups = worker_groups(value_set)
    values = merged_values(value_set)
    slugs = list(dict.fromkeys(slug for group in groups.values() for slug in group["models"]))
    api = {name: doc for name, doc in by_name(docs, "Deployment").items() if component(doc) == "api"}
    workers = {name: doc for name, doc in by_name(docs, "Deployment").items() if component(doc) == "worker"}
    assert list(api) == [f"{RELEASE}-fluxserve-api"]  # one API serves every model of the table
    assert sorted(workers) == sorted(worker_deployment_name(name) for name in groups)
    assert len(by_name(docs, "ScaledObject")) == len(groups)
    assert len(by_name(docs, "TriggerAuthentication")) == 1
    assert list(by_name(docs, "PodDisruptionBudget")) == list(api)
    assert f"{RELEASE}-fluxserve-api" in by_name(docs, "Service")
    assert set(slugs) <= set(model_table_of(value_set))
    secrets = by_name(docs, "Secret")
    assert list(secrets) == ([] if values["store"]["existingSecret"] else [f"{RELEASE}-fluxserve-store"])
    jobs = of_kind(docs, "Job")
    postgres = value_set == "postgres"
    assert len(jobs) == (1 if postgres else 0)  # `fluxserve migrate`: a schema on PostgreSQL only
    if postgres:
        (job,) = jobs
        assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    notes = rendered_text(value_set)["fluxserve/templates/NOTES.txt"]
    assert "fluxserve keys create" in notes and "kubectl exec" in notes


BAD_VALUES = {
    "no GPU": {"workers": [{"name": "w", "gpu": {"count": 0}}]},
    "a misspelt key": {"workers": [{"name": "w", "maxJobSecond": 600}]},
    "an unknown top-level key": {"worker": [{"name": "w"}]},
    "a slug that is no path segment": {"models": {"flux/dev": "black-forest-labs/FLUX.1-dev"}},
    "a model without its location": {"models": {"flux-dev": {"speed_preset": "turbo"}}},
    "a worker group that cannot name objects": {"workers": [{"name": "GPU_Group"}]},
    "a worker without a name": {"workers": [{"models": ["flux-dev"]}]},
    "no worker group": {"workers": []},
    "an unsupported store": {"store": {"url": "mysql://db/fluxserve"}},
    "a secret of unknown store type": {"store": {"url": "", "existingSecret": "mine"}},
    "a job that never ends": {"workers": [{"name": "w", "maxJobSeconds": 0}]},
    "negative replicas": {"workers": [{"name": "w", "keda": {"minReplicas": -1}}]},
    "a bad auth mode": {"api": {"auth": "sometimes"}},
    "a memory size that is no quantity": {"workers": [{"name": "w", "shmSize": "lots"}]},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_fail_the_schema(case):
    values = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmValuesError):  # as `helm install` / `helm template` would
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert helm.lint(CHART, values)["errors"]


@pytest.mark.parametrize(("values", "message"), [
    ({"workers": [{"name": "w", "maxJobSeconds": 900, "terminationGracePeriodSeconds": 600}]},
     "shorter than its maxJobSeconds"),
    ({"workers": [{"name": "w"}, {"name": "w"}]}, "two groups are named"),
    ({"workers": [{"name": "w", "modelCache": {"type": "hostPath"}}]}, "modelCache.hostPath is required"),
    ({"store": {"existingSecret": "mine", "type": "redis", "url": ""}, "workers": [{"name": "w"}]}, None),
    ({"store": {"url": "redis://:p%40ss@redis:6379/0"}}, "percent-encoded credentials"),
    ({"workers": [{"name": "w", "models": ["flux-schnell"]}]}, '"flux-schnell" is not in `models`'),
    ({"api": {"defaultModel": "flux-schnell"}}, 'api.defaultModel: "flux-schnell" is not in `models`'),
])
def test_templates_refuse_what_the_schema_cannot_see(values, message):
    if message is None:  # the counterpart that renders
        assert render_values(values)
        return
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


# --- the rendered objects against Kubernetes' and the CRDs' schemas -------------------------------------


def kubernetes_validate_cli(path: Path, kube: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", kube, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_core_kinds_pass_kubernetes_validate_strict(value_set, kube, tmp_path):
    core = [doc for doc in rendered(value_set) if (doc["apiVersion"], doc["kind"]) not in CRD_MODELS]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    done = kubernetes_validate_cli(path, kube)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(core), done.stdout  # each found its schema (no "Couldn't find schema")


def test_kubernetes_validate_strict_has_teeth(tmp_path):
    """A misspelt field in an otherwise valid Deployment fails the same check."""
    broken = next(doc for doc in rendered("redis") if doc["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = kubernetes_validate_cli(path, KUBE_VERSIONS[0])
    assert done.returncode == 1 and "imagePullPolicyy" in done.stdout, done.stdout


def strict(schema: Any) -> Any:
    """The JSON schema with `additionalProperties: false` on every object that lists its properties."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> Any:
    model = CRD_MODELS[(api_version, kind)]
    schema = strict(model.model_json_schema(by_alias=True))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    model = CRD_MODELS[(doc["apiVersion"], doc["kind"])]
    model.model_validate(doc)  # types and required fields, as the CRD's model has them
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_custom_resources_pass_their_strict_schemas(value_set):
    crds = [doc for doc in rendered(value_set) if (doc["apiVersion"], doc["kind"]) in CRD_MODELS]
    assert {doc["kind"] for doc in crds} >= {"ScaledObject", "TriggerAuthentication"}
    if value_set == "redis":
        assert "ServiceMonitor" in {doc["kind"] for doc in crds}
    for doc in crds:
        assert not crd_errors(doc), (doc["kind"], doc["metadata"]["name"], crd_errors(doc))


@pytest.mark.parametrize(("kind", "path", "key"), [
    ("ScaledObject", ["spec"], "minReplicas"),  # minReplicaCount is the field
    ("ScaledObject", ["spec", "triggers", 0], "metadataa"),
    ("ScaledObject", ["spec", "advanced", "scalingModifiers"], "formulas"),
    ("TriggerAuthentication", ["spec", "secretTargetRef", 0], "secret"),
    ("ServiceMonitor", ["spec", "endpoints", 0], "paths"),
])
def test_strict_crd_check_has_teeth(kind, path, key):
    doc = next(doc for doc in rendered("redis" if kind != "ScaledObject" or "advanced" not in path
                                       else "two-groups") if doc["kind"] == kind)
    target = doc
    for step in path:
        target = target[step]
    target[key] = "1"
    errors = crd_errors(doc)
    assert errors and any(key in error for error in errors), errors


# --- the rendering against the code ---------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_worker_has_a_gpu_and_outlasts_its_longest_job(value_set):
    docs = rendered(value_set)
    for name, group in worker_groups(value_set).items():
        deployment = by_name(docs, "Deployment")[worker_deployment_name(name)]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        assert int(limits[group["gpu"]["resource"]]) == group["gpu"]["count"] >= 1, name
        grace = pod["terminationGracePeriodSeconds"]
        expected = group["terminationGracePeriodSeconds"] or group["maxJobSeconds"] + group["drainMarginSeconds"]
        assert grace == expected and grace >= group["maxJobSeconds"], (name, grace, group["maxJobSeconds"])
        # The drain: preStop sends the worker its SIGTERM and waits for the process to end; /ready says
        # "draining" meanwhile (tests/test_k8s_drain.py runs it on real processes).
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"] and "kill -TERM 1" in command[2] and "kill -0 1" in command[2]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        # A rolling update never asks for more GPUs than the group holds.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        assert ("replicas" in deployment["spec"]) == (not merged_values(value_set)["keda"]["enabled"])
        shm = next(volume for volume in pod["volumes"] if volume["name"] == "shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": group["shmSize"]}
        if group["gpu"]["type"]:
            assert pod["nodeSelector"][group["gpu"]["typeLabel"]] == group["gpu"]["type"]


def store_url(value_set: str) -> str | None:
    return merged_values(value_set)["store"]["url"] or None


def secret_data(docs: list[dict]) -> dict[str, str]:
    secrets = of_kind(docs, "Secret")
    return secrets[0]["stringData"] if secrets else {}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_scaled_objects_count_what_the_store_maintains(value_set):
    """Each ScaledObject targets a worker Deployment and counts QUEUED + PROCESSING jobs of exactly the
    slugs that Deployment's workers claim, with the store's real key names or query."""
    docs = rendered(value_set)
    deployments = by_name(docs, "Deployment")
    (auth,) = of_kind(docs, "TriggerAuthentication")
    values = merged_values(value_set)
    for scaled in of_kind(docs, "ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        assert component(target) == "worker"
        env = env_of(target["spec"]["template"]["spec"]["containers"][0])
        slugs = env["FLUXSERVE_WORKER_MODELS"].split(",")
        store_triggers = [t for t in scaled["spec"]["triggers"] if t["type"] != "prometheus"]
        for trigger in store_triggers:
            assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        if value_set == "postgres":
            (trigger,) = store_triggers
            assert trigger["type"] == "postgresql"
            assert trigger["metadata"]["query"] == active_jobs_query(slugs)
            assert float(trigger["metadata"]["targetQueryValue"]) > 0  # KEDA refuses 0
        else:
            prefix = env["FLUXSERVE_REDIS_PREFIX"]
            assert [t["type"] for t in store_triggers] == ["redis"] * len(slugs)
            assert [t["metadata"]["listName"] for t in store_triggers] == [active_key(prefix, s) for s in slugs]
            url = urlsplit(store_url(value_set) or "")
            for trigger in store_triggers:
                assert trigger["metadata"]["databaseIndex"] == (url.path.lstrip("/") or "0")
                assert trigger["metadata"]["enableTLS"] == str(url.scheme == "rediss").lower()
        # Several triggers: the group's count is their sum (KEDA would take the max of separate metrics).
        names = [t["name"] for t in store_triggers]
        modifiers = scaled["spec"].get("advanced", {}).get("scalingModifiers")
        if len(names) > 1:
            formula = " + ".join(names)
            if any(t["type"] == "prometheus" for t in scaled["spec"]["triggers"]):
                formula = f"max({formula}, prometheus)"
            assert modifiers["formula"] == formula and modifiers["metricType"] == "AverageValue"
        else:
            assert modifiers is None
        group = worker_groups(value_set)[target["metadata"]["labels"]["fluxserve.io/worker-group"]]
        assert scaled["spec"]["minReplicaCount"] == group["keda"]["minReplicas"]
    # What the TriggerAuthentication points at exists in the Secret the chart writes.
    if not values["store"]["existingSecret"]:
        data = secret_data(docs)
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == of_kind(docs, "Secret")[0]["metadata"]["name"] and ref["key"] in data


def test_two_groups_scale_to_zero_on_their_own_models():
    docs = rendered("two-groups")
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind(docs, "ScaledObject")}
    assert len(scaled) == 2 and all(doc["spec"]["minReplicaCount"] == 0 for doc in scaled.values())
    listened = {name: {t["metadata"]["listName"] for t in doc["spec"]["triggers"]} for name, doc in scaled.items()}
    assert listened == {
        worker_deployment_name("dev-h100"): {active_key("fluxserve", "flux-dev"),
                                             active_key("fluxserve", "juggernaut-pro-flux")},
        worker_deployment_name("schnell-l4"): {active_key("fluxserve", "flux-schnell")},
    }


@pytest.mark.parametrize(("url", "address", "connection"), [
    ("redis://redis:6379/0", "redis.gpu.svc:6379", None),  # a Service of the release's namespace
    ("redis://:pw@redis-master/3", "redis-master.gpu.svc:6379", None),
    ("rediss://user:pw@cache.example.com:6380/1", "cache.example.com:6380", None),
    ("redis://10.0.0.5:6379/0", "10.0.0.5:6379", None),
    ("postgresql://fs:pw@db:5432/fluxserve?sslmode=disable", None,
     "postgresql://fs:pw@db.gpu.svc:5432/fluxserve?sslmode=disable"),
    ("postgresql://fs:p%40ss@db.example.com/fluxserve", None, "postgresql://fs:p%40ss@db.example.com/fluxserve"),
])
def test_keda_reads_the_store_from_its_own_namespace(url, address, connection):
    """KEDA's operator runs in its own namespace: it gets a host it can resolve, and for Redis host:port
    (its redis scaler takes no URL) with the URL's credentials; the processes keep the URL as given."""
    docs = render_values({"store": {"url": url}})
    data = secret_data(docs)
    assert data["store-url"] == url
    parts = urlsplit(url)
    if address is not None:
        assert data["keda-redis-address"] == address
        assert data.get("keda-redis-password") == (parts.password or None)
        assert data.get("keda-redis-username") == (parts.username or None)
    else:
        assert data["keda-postgres-connection"] == connection
        (auth,) = of_kind(docs, "TriggerAuthentication")
        assert auth["spec"]["secretTargetRef"] == [{"parameter": "connection", "name": f"{RELEASE}-fluxserve-store",
                                                    "key": "keda-postgres-connection"}]


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """GET a path of the API or the worker app (built on a throwaway SQLite store, not started) -> its
    status: 200 or 503 for a route that exists (/ready is 503 while nothing is loaded), 404 otherwise."""
    from fastapi.testclient import TestClient

    from fluxserve.api import create_app
    from fluxserve.api.worker_app import create_worker_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("helm-routes"), store={"url": None},
                        outputs={"url": None}, accounts={"store_url": None})
    apps = {"serve": create_app(settings), "worker": create_worker_app(settings)}
    clients = {name: TestClient(app, base_url=f"http://127.0.0.1:{API_PORT}") for name, app in apps.items()}
    yield lambda name, path: clients[name].get(path).status_code
    for app in apps.values():
        app.state.services.jobs.close()
        app.state.services.accounts.close()


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_point_at_real_routes(value_set, answers):
    docs = rendered(value_set)
    probed = 0
    for _workload, container in containers(docs):
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe not in container:
                continue
            get = container[probe]["httpGet"]
            assert ports[get["port"]] == API_PORT == int(env_of(container)["FLUXSERVE_PORT"])
            assert answers(container["args"][0], get["path"]) in (200, 503), (container["name"], get["path"])
            probed += 1
    assert probed >= 4
    assert answers("worker", "/no-such-probe") == 404  # the check can fail
    for service in of_kind(docs, "Service"):
        assert all(port["targetPort"] == "http" for port in service["spec"]["ports"])


def test_models_file_is_what_the_catalog_reads(tmp_path):
    """The model table is rendered as a models file the service reads as it is: the slugs, in the chart's
    values, with their options (whole numbers as integers)."""
    docs = rendered("redis")
    table = model_table(Settings(models_file=models_file(docs, tmp_path)))
    assert list(table) == ["flux-dev"]
    flux = table["flux-dev"]
    assert (flux.model.model, flux.speed.preset, flux.accounts.price_per_image) == (
        "black-forest-labs/FLUX.1-dev", "turbo", 2)
    two = model_table(Settings(models_file=models_file(rendered("two-groups"), tmp_path)))
    assert sorted(two) == sorted(model_table_of("two-groups"))
    assert two["juggernaut-pro-flux"].model.base_model == "black-forest-labs/FLUX.1-dev"


def test_slugs_follow_the_catalog():
    """The schema takes the slugs the service takes, and the templates refuse the API's own paths."""
    schema = chart().schema
    assert schema["properties"]["models"]["propertyNames"]["pattern"] == SLUG_PATTERN.pattern
    for reserved in sorted(RESERVED_SLUGS):
        for slug in (reserved, reserved.capitalize()):
            with pytest.raises(helm.HelmRenderError, match="is a path of the API"):
                chart().render({"models": {slug: "black-forest-labs/FLUX.1-dev"}}, name=RELEASE)
            with pytest.raises(ModelConfigError):
                check_slug(slug, "test")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_commands_and_settings_exist(value_set, tmp_path):
    """What the pods run are commands the CLI has, with FLUXSERVE_* settings the service knows (a
    misspelt one would be ignored silently) and values it accepts: each process reads the same models
    file, mounted where FLUXSERVE_MODELS_FILE says, and each worker group's models are in it."""
    from fluxserve.cli import app

    cli = typer.main.get_command(app)
    commands = cli.commands  # type: ignore[attr-defined]
    known = {"FLUXSERVE_" + name.upper() for name in flat_fields()}
    roles = set()
    docs = rendered(value_set)
    local_models_file = models_file(docs, tmp_path)
    for workload, container in containers(docs):
        args = container["args"]
        assert args[0] in commands, args
        roles.add(args[0])
        if args[0] == "serve":
            assert args[1:] == ["--no-worker"]  # the GPU work is the workers'
        env = env_of(container)
        unknown = {name for name in env if name.startswith("FLUXSERVE_")} - known
        assert not unknown, f"{workload['metadata']['name']}: unknown settings {unknown}"
        assert env["FLUXSERVE_STORE"] == {"secretKeyRef": {"name": env["FLUXSERVE_STORE"]["secretKeyRef"]["name"],
                                                            "key": env["FLUXSERVE_STORE"]["secretKeyRef"]["key"]}}
        literal = {name.removeprefix("FLUXSERVE_").lower(): value for name, value in env.items()
                   if name.startswith("FLUXSERVE_") and isinstance(value, str)}
        mounted = Path(literal.pop("models_file"))
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert mounts["models-file"] == str(mounted.parent) and mounted.name == "models.toml"
        assert volumes["models-file"]["configMap"]["name"] == f"{RELEASE}-fluxserve-models"
        settings = Settings().with_overrides(**literal, models_file=local_models_file)
        if args[0] == "worker":
            assert settings.worker_slugs == env["FLUXSERVE_WORKER_MODELS"].split(",")
    assert {"serve", "worker"} <= roles
    # The key commands NOTES.txt and the README give.
    create = commands["keys"].commands["create"]
    assert {"--name", "--credits"} <= {opt for param in create.params for opt in param.opts}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_services_and_ingress_reach_the_api_pods(value_set):
    docs = rendered(value_set)
    deployments = of_kind(docs, "Deployment")
    services = by_name(docs, "Service")
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matched = [d for d in deployments
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {name} selects no pod"
        if name == f"{RELEASE}-fluxserve-api":
            assert {component(d) for d in matched} == {"api"}
    for ingress in of_kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert (path["path"], path["pathType"]) == ("/", "Prefix")
                assert path["backend"]["service"]["name"] == f"{RELEASE}-fluxserve-api"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [d for d in deployments if d["spec"]["selector"]["matchLabels"] == selector]


def test_the_prometheus_trigger_asks_for_metrics_fluxserve_exports():
    (scaled,) = of_kind(rendered("redis"), "ScaledObject")
    (prometheus,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    metrics = Metrics()
    metrics.watch_store(lambda: {"QUEUED": 1})
    exported = set(re.findall(r"^(fluxserve_\w+?)(?:_bucket|_sum|_count|_total|_created)?[{ ]",
                              metrics.render().decode(), re.M))
    asked = set(re.findall(r"fluxserve_\w+", prometheus["metadata"]["query"]))
    assert asked and asked <= exported, (asked, exported)
    for state in re.findall(r'state="(\w+)"', prometheus["metadata"]["query"]):
        assert f'fluxserve_jobs{{state="{state}"}}' in metrics.render().decode()
