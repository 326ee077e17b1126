"""deploy/ holds together: every file parses, and what one file names another declares.

The Kubernetes manifests (deploy/k8s) and the compose file (deploy/compose.yaml) are read as
data. Their settings are built with Orchestra's own loader from what a pod or a container
would really see: the image's environment (the Containerfile's ENV), the manifest's
environment over it (Secret values filled in), and the ConfigMap's orchestra.toml. So an
unknown key, a port that is not the one the service listens on, or a grace period shorter
than the service's drain fails here rather than in a cluster.

Each check returns the problems it finds. The files as written must have none, and each
kind of break, made in a fresh reading of them, must be named (``test_a_break_is_named``):
no check can pass by looking at nothing.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from ruamel.yaml import YAML

from orchestra.auth import is_loopback
from orchestra.config import ENV_PREFIX, Settings
from orchestra.config_file import load
from orchestra.errors import ConfigError
from tests.integration.test_container import final_env

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KINDS = ("ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget")
HEALTH = "/health"
#: What each probe asks: liveness whether the process answers, whatever the database's state.
PROBE_PATHS = {
    "startupProbe": HEALTH,
    "readinessProbe": HEALTH,
    "livenessProbe": f"{HEALTH}?probe=live",
}
#: Seconds uvicorn gives open HTTP connections (an SSE stream, a ?wait= poll) to close after
#: SIGTERM (``timeout_graceful_shutdown`` in cli.py's serve); the worker pool's shutdown_grace
#: starts only after it, so a service with a task running and a stream open takes both.
HTTP_DRAIN_S = 5.0
#: The issue's margin on top of the drain: handing tasks back, closing the database.
MARGIN_S = 5.0
#: The official postgres image keeps its data here up to version 17; from 18 one level up.
PGDATA_BEFORE_18 = "/var/lib/postgresql/data"
PGDATA_FROM_18 = "/var/lib/postgresql"

_yaml = YAML(typ="safe", pure=True)


@dataclass
class Deploy:
    """deploy/ as data: the Kubernetes objects by kind, the kustomization, the manifest files
    on disk, and the compose file with its variables filled in by their defaults."""

    k8s: dict[str, dict[str, Any]]
    kustomization: dict[str, Any]
    k8s_files: list[str]
    compose: dict[str, Any]
    #: deploy/prometheus.yml, and deploy/grafana's provisioning files and dashboards by path
    #: (relative to deploy/grafana).
    prometheus: dict[str, Any]
    grafana: dict[str, Any]
    #: deploy/alerts.yml: the alerting rules prometheus.yml loads.
    alerts: dict[str, Any]


def _docs(path: Path) -> list[Any]:
    return [doc for doc in _yaml.load_all(path.read_text(encoding="utf-8")) if doc is not None]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Fill in compose's ``${NAME:-default}`` as docker compose and podman-compose do; any
    other ``$`` form is refused here, so the test never reads a value compose would not."""
    text = text.replace("$$", "\0")
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), text)
    assert "$" not in text, "deploy/compose.yaml: only ${NAME:-default} is understood here"
    return text.replace("\0", "$")


def read_deploy(env: Mapping[str, str] | None = None) -> Deploy:
    """Parse every file under deploy/ (``env``: the variables compose would see)."""
    k8s: dict[str, dict[str, Any]] = {}
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in files:
        [doc] = _docs(K8S / name)  # one object per file
        assert doc["kind"] not in k8s, f"{name}: a second {doc['kind']}"
        k8s[doc["kind"]] = doc
    [kustomization] = _docs(K8S / "kustomization.yaml")
    text = interpolate((DEPLOY / "compose.yaml").read_text(encoding="utf-8"), env or {})
    compose = _yaml.load(text)
    # Services merged from one anchor share its nested values; compose treats them apart.
    compose["services"] = {n: copy.deepcopy(s) for n, s in compose["services"].items()}
    [prometheus] = _docs(DEPLOY / "prometheus.yml")
    grafana: dict[str, Any] = {}
    for path in sorted((DEPLOY / "grafana").rglob("*")):
        name = path.relative_to(DEPLOY / "grafana").as_posix()
        if path.suffix == ".json":
            grafana[name] = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            [grafana[name]] = _docs(path)
    [alerts] = _docs(DEPLOY / "alerts.yml")
    return Deploy(k8s, kustomization, files, compose, prometheus, grafana, alerts)


def settings_of(toml_text: str, env: Mapping[str, str], tmp: Path) -> Settings | str:
    """The settings a service gets from this file and environment, or the loader's error."""
    path = tmp / "orchestra.toml"
    path.write_text(toml_text, encoding="utf-8")
    try:
        return load(path, env)
    except ConfigError as exc:
        return f"settings: {exc.message}"


def seconds(duration: Any) -> float | None:
    """A compose duration ("20s", "1m30s", 15) in seconds; None if it is not one."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    if not parts or "".join(n + u for n, u in parts) != str(duration):
        return None
    return sum(float(n) * units[u] for n, u in parts)


def _overridden(toml_text: str, env: Mapping[str, str]) -> list[str]:
    """Keys the file sets that an ORCHESTRA_ variable also sets (the variable wins)."""

    def keys(table: Mapping[str, Any], prefix: str = "") -> list[str]:
        out: list[str] = []
        for key, value in table.items():
            dotted = f"{prefix}{key}".lower()
            out += keys(value, f"{dotted}.") if isinstance(value, Mapping) else [dotted]
        return out

    from_env = {
        name[len(ENV_PREFIX) :].lower().replace("__", ".")
        for name in env
        if name.startswith(ENV_PREFIX) and "__" in name
    }
    return [key for key in keys(tomllib.loads(toml_text)) if key in from_env]


# --- Kubernetes ---------------------------------------------------------------------------------


def _container(d: Deploy) -> dict[str, Any]:
    """The Deployment's one container (itself, not a copy)."""
    container: dict[str, Any]
    [container] = d.k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _pod_labels(d: Deploy) -> dict[str, str]:
    labels: dict[str, str] = d.k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    return labels


def label_problems(d: Deploy) -> list[str]:
    """Every selector picks the Deployment's pods."""
    labels = _pod_labels(d)
    pod_spec = d.k8s["Deployment"]["spec"]["template"]["spec"]
    selectors = {
        "Deployment selector": d.k8s["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service selector": d.k8s["Service"]["spec"]["selector"],
        "PodDisruptionBudget selector": d.k8s["PodDisruptionBudget"]["spec"]["selector"][
            "matchLabels"
        ],
    }
    for i, spread in enumerate(pod_spec.get("topologySpreadConstraints") or []):
        selectors[f"topologySpreadConstraints[{i}]"] = spread["labelSelector"]["matchLabels"]
    return [
        f"{what} {dict(selector)} does not match the pod labels {labels}"
        for what, selector in selectors.items()
        if not selector or any(labels.get(k) != v for k, v in selector.items())
    ]


def _port_number(container: Mapping[str, Any], port: Any) -> int | None:
    """The container port a probe's or Service's port names (by name or number)."""
    for declared in container.get("ports") or []:
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    return None


def probe_problems(d: Deploy) -> list[str]:
    """Readiness and liveness ask /health on a declared port; liveness gives up later."""
    container = _container(d)
    out: list[str] = []
    windows: dict[str, float] = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                out.append(f"{kind}: missing")
            continue
        get = probe.get("httpGet") or {}
        if get.get("path") != PROBE_PATHS[kind]:
            out.append(f"{kind}: asks {get.get('path')!r}, not {PROBE_PATHS[kind]}")
        if _port_number(container, get.get("port")) is None:
            out.append(f"{kind}: port {get.get('port')!r} is not a declared container port")
        windows[kind] = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    if windows.get("livenessProbe", 0) <= windows.get("readinessProbe", 0):
        out.append("livenessProbe: restarts a pod no later than readinessProbe takes it out")
    target = d.k8s["Service"]["spec"]["ports"][0]["targetPort"]
    if _port_number(container, target) is None:
        out.append(f"Service targetPort {target!r} is not a declared container port")
    return out


def _secret_values(d: Deploy) -> dict[str, str]:
    secret = d.k8s["Secret"]
    data = {k: b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def reference_problems(d: Deploy) -> list[str]:
    """The ConfigMap, Secret, their keys and the image the Deployment names exist."""
    out: list[str] = []
    container = _container(d)
    pod_spec = d.k8s["Deployment"]["spec"]["template"]["spec"]
    configmap, secret = d.k8s["ConfigMap"], d.k8s["Secret"]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    config_files: list[str] = []
    for volume in pod_spec.get("volumes") or []:
        source = volume.get("configMap")
        if source is None:
            continue
        if source["name"] != configmap["metadata"]["name"]:
            out.append(f"volume {volume['name']}: no ConfigMap named {source['name']!r}")
        for item in source.get("items") or []:
            if item["key"] not in configmap.get("data", {}):
                out.append(f"volume {volume['name']}: the ConfigMap has no key {item['key']!r}")
            if volume["name"] in mounts:
                config_files.append(f"{mounts[volume['name']]}/{item['path']}")
    values = _secret_values(d)
    env = {e["name"]: e for e in container.get("env") or []}
    for name, entry in env.items():
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref["name"] != secret["metadata"]["name"]:
            out.append(f"env {name}: no Secret named {ref['name']!r}")
        elif ref["key"] not in values:
            out.append(f"env {name}: the Secret has no key {ref['key']!r}")
    config = (env.get("ORCHESTRA_CONFIG") or {}).get("value")
    if config not in config_files:
        out.append(f"ORCHESTRA_CONFIG {config!r} is not the mounted ConfigMap file {config_files}")
    image = re.sub(r":[^/:]+$", "", str(container["image"]).split("@")[0])  # less its tag
    if image not in [i["name"] for i in d.kustomization.get("images") or []]:
        out.append(f"kustomization.yaml: no images entry for the Deployment's image {image!r}")
    return out


def kustomization_problems(d: Deploy) -> list[str]:
    """kustomization.yaml lists every manifest file, and only those."""
    listed = sorted(d.kustomization.get("resources") or [])
    return [] if listed == d.k8s_files else [f"kustomization lists {listed}, not {d.k8s_files}"]


def _pod_env(d: Deploy) -> dict[str, str]:
    """The environment the container starts with: the image's, then the Deployment's."""
    env = dict(final_env())
    values = _secret_values(d)
    for entry in _container(d).get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None and ref["key"] in values:
            env[entry["name"]] = values[ref["key"]]
    return env


def _pre_stop_seconds(container: Mapping[str, Any]) -> float | str:
    hook = (container.get("lifecycle") or {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    return f"preStop {hook}: only a sleep is understood here"


def k8s_settings_problems(d: Deploy, tmp: Path) -> list[str]:
    """The ConfigMap's orchestra.toml loads under the pod's environment, and what it says
    agrees with the Deployment: port, listen address, database, keys, grace period."""
    toml_text = (d.k8s["ConfigMap"].get("data") or {}).get("orchestra.toml")
    if toml_text is None:
        return ["the ConfigMap holds no orchestra.toml"]
    env = _pod_env(d)
    settings = settings_of(toml_text, env, tmp)
    if isinstance(settings, str):
        return [settings]
    container = _container(d)
    out = [
        f"the ConfigMap sets {key}, but the environment overrides it"
        for key in _overridden(toml_text, env)
    ]
    if _port_number(container, "http") != settings.server.port:
        out.append(f"container port http is not the service's port {settings.server.port}")
    if is_loopback(settings.server.host):
        out.append(f"[server] host {settings.server.host}: unreachable from other pods")
    if not settings.database.url.startswith("postgresql+psycopg://"):
        out.append(f"[database] url: not PostgreSQL ({settings.database.url.split(':')[0]})")
    for name, provider in settings.providers.items():
        if provider.api_key_env and provider.api_key_env not in env:
            out.append(f"providers.{name}: {provider.api_key_env} is not in the pod's env")
    pre_stop = _pre_stop_seconds(container)
    if isinstance(pre_stop, str):
        return [*out, pre_stop]
    needed = pre_stop + HTTP_DRAIN_S + settings.workers.shutdown_grace + MARGIN_S
    grace = d.k8s["Deployment"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")
    if grace is None or grace < needed:
        out.append(f"terminationGracePeriodSeconds {grace} < {needed:g} (preStop, drain, grace)")
    return out


# --- compose ------------------------------------------------------------------------------------


def _compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, written as a mapping or as a list of NAME=value."""
    env = service.get("environment") or {}
    if isinstance(env, Mapping):
        return {k: str(v) for k, v in env.items()}
    return dict(str(item).partition("=")[::2] for item in env)


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def compose_problems(d: Deploy, tmp: Path) -> list[str]:
    """PostgreSQL with a named volume and pg_isready, and three Orchestra replicas built from
    the Containerfile that wait for it, reach it, report /health and stop in time."""
    services = d.compose["services"]
    replicas = {n: s for n, s in services.items() if "build" in s}
    out = [] if len(replicas) == 3 else [f"{len(replicas)} Orchestra services, not 3"]
    host_ports: list[str] = []
    for name, service in replicas.items():
        build = service["build"]
        containerfile = DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")
        if not containerfile.is_file():
            out.append(f"{name}: builds from {containerfile}, which does not exist")
            continue
        if containerfile.resolve() != ROOT / "Containerfile":
            out.append(f"{name}: builds from {containerfile}, not the repository's Containerfile")
        env = {**final_env(), **_compose_env(service)}
        settings = settings_of("", env, tmp)
        if isinstance(settings, str):
            out.append(f"{name}: {settings}")
            continue
        url = urlsplit(settings.database.url)
        database = services.get(url.hostname or "")
        if database is None or not str(database.get("image", "")).startswith(
            ("docker.io/library/postgres:", "postgres:")
        ):
            out.append(f"{name}: the database host {url.hostname!r} is not the postgres service")
        else:
            db_env = database["environment"]
            wanted = (db_env["POSTGRES_USER"], db_env["POSTGRES_PASSWORD"], db_env["POSTGRES_DB"])
            got = (url.username, unquote(url.password or ""), url.path.lstrip("/"))
            if url.scheme != "postgresql+psycopg" or url.port not in (None, 5432):
                out.append(f"{name}: database URL {url.scheme}://…:{url.port}")
            if got != wanted:
                out.append(f"{name}: user, password, database {got[0]}/…/{got[2]} != postgres's")
            waits = service.get("depends_on") or {}
            if (
                not isinstance(waits, Mapping)
                or waits.get(url.hostname, {}).get("condition") != "service_healthy"
            ):
                out.append(f"{name}: does not wait for {url.hostname} to be healthy")
        check = " ".join(service["healthcheck"]["test"])
        found = re.search(r"https?://[^\s'\"]+", check)
        health = urlsplit(found.group(0)) if found else None
        if health is None or health.path != HEALTH or health.port != settings.server.port:
            out.append(f"{name}: healthcheck asks {found and found.group(0)}, not {HEALTH}")
        for mapping in service.get("ports") or []:
            host, _, port = str(mapping).rpartition(":")
            host_ports.append(host)
            if int(port) != settings.server.port:
                out.append(f"{name}: publishes container port {port}, not {settings.server.port}")
        stop = seconds(service.get("stop_grace_period", "10s"))
        needed = HTTP_DRAIN_S + settings.workers.shutdown_grace + MARGIN_S
        if stop is None or stop < needed:
            out.append(
                f"{name}: stop_grace_period {service.get('stop_grace_period')} < {needed:g}s"
            )
    if len(set(host_ports)) != len(host_ports):
        out.append(f"replicas share a host port: {host_ports}")
    return out + _postgres_problems(d)


def _postgres_problems(d: Deploy) -> list[str]:
    services = d.compose["services"]
    out: list[str] = []
    for name, service in services.items():
        image = str(service.get("image", ""))
        if not image.startswith(("docker.io/library/postgres:", "postgres:")):
            continue
        env = _compose_env(service)
        command = [str(c) for c in service["healthcheck"]["test"]]
        if "pg_isready" not in command:
            out.append(f"{name}: the healthcheck is not pg_isready")
        elif (_flag(command, "-U"), _flag(command, "-d")) != (
            env["POSTGRES_USER"],
            env["POSTGRES_DB"],
        ):
            out.append(f"{name}: pg_isready checks another user or database")
        major = re.match(r"\d+", image.rpartition(":")[2])
        pgdata = PGDATA_FROM_18 if major and int(major.group(0)) >= 18 else PGDATA_BEFORE_18
        volumes = [str(v).split(":") for v in service.get("volumes") or []]
        if not any(v[0] in (d.compose.get("volumes") or {}) and v[1] == pgdata for v in volumes):
            out.append(f"{name}: no named volume declared at the top mounted at {pgdata}")
    return out if services.get("postgres") else [*out, "no postgres service"]


# --- monitoring: Prometheus and Grafana ---------------------------------------------------------


def _mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts of files under deploy/: {path in the container: path
    relative to deploy/} (named volumes left out)."""
    out = {}
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith("./"):
            out[rest.split(":")[0]] = source[2:]
    return out


def _mounted_at(service: Mapping[str, Any], container_path: str) -> str | None:
    """What under deploy/ a container sees at ``container_path``, through its bind mounts."""
    for target, source in _mounts(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source + container_path[len(target) :]
    return None


def monitoring_problems(d: Deploy, tmp: Path) -> list[str]:
    """Prometheus scrapes /metrics of every Orchestra replica, at its port, with a key unless
    /metrics is public; Grafana finds its data source (the Prometheus service) and the
    dashboard, which names that data source."""
    services = d.compose["services"]
    replicas = {n: s for n, s in services.items() if "build" in s}
    out: list[str] = []
    prometheus, grafana = services.get("prometheus"), services.get("grafana")
    if prometheus is None or grafana is None:
        return ["compose has no prometheus or no grafana service"]
    flag = next((c for c in prometheus.get("command") or [] if c.startswith("--config.file=")), "")
    if _mounted_at(prometheus, flag.partition("=")[2]) != "prometheus.yml":
        out.append(f"prometheus: {flag or 'no --config.file'} is not deploy/prometheus.yml")
    jobs = d.prometheus.get("scrape_configs") or []
    targets = {
        t: job
        for job in jobs
        for static in job.get("static_configs") or []
        for t in static.get("targets") or []
    }
    for name, service in replicas.items():
        settings = settings_of("", {**final_env(), **_compose_env(service)}, tmp)
        if isinstance(settings, str):
            continue  # compose_problems names it
        job = targets.get(f"{name}:{settings.server.port}")
        if job is None:
            out.append(f"prometheus.yml does not scrape {name}:{settings.server.port}")
            continue
        if job.get("metrics_path", "/metrics") != "/metrics":
            out.append(f"prometheus.yml scrapes {job['metrics_path']}, not /metrics")
        if not settings.metrics.enabled:
            out.append(f"{name}: [metrics] enabled is false")
        elif not settings.metrics.public and "authorization" not in job:
            out.append(f"{name}: /metrics needs a key, and prometheus.yml sends none")
    for name, doc in d.grafana.items():
        if name.startswith("provisioning/datasources/"):
            for source in doc.get("datasources") or []:
                url = urlsplit(source.get("url", ""))
                if url.hostname != "prometheus" or url.port != 9090:
                    out.append(f"grafana {name}: data source {source.get('url')} is not Prometheus")
        if name.startswith("provisioning/dashboards/"):
            for provider in doc.get("providers") or []:
                folder = _mounted_at(grafana, provider.get("options", {}).get("path", ""))
                inside = (folder or "").removeprefix("grafana/")
                if folder is None or not any(n.startswith(f"{inside}/") for n in d.grafana):
                    out.append(f"grafana {name}: {provider.get('options')} holds no dashboard")
    sources = {
        s.get("uid")
        for n, doc in d.grafana.items()
        if n.startswith("provisioning/datasources/")
        for s in doc.get("datasources") or []
    }
    for name, doc in d.grafana.items():
        if name.endswith(".json"):
            for panel in doc.get("panels") or []:
                for target in panel.get("targets") or []:
                    uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
                    if uid not in sources:
                        out.append(f"grafana {name}: {panel['title']!r} uses data source {uid}")
    return out


def _exported() -> set[str]:
    """Every series name /metrics can carry (a histogram's three; PostgreSQL's too), and
    Prometheus's ``up``."""
    from orchestra import metrics

    text = metrics.exposition({"queued": 0}, [("p", "ollama", True)], listening=True).decode()
    names = {"up"}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names |= (
                {f"{name}{s}" for s in ("_bucket", "_sum", "_count")}
                if kind == ("histogram")
                else {name}
            )
    return names


def alert_problems(d: Deploy) -> list[str]:
    """prometheus.yml loads the rules file compose mounts (deploy/alerts.yml), and each rule
    is named and reads only series Orchestra exports."""
    from tests.integration.test_metrics import metric_names

    out: list[str] = []
    prometheus = d.compose["services"].get("prometheus") or {}
    loaded = [_mounted_at(prometheus, f) for f in d.prometheus.get("rule_files") or []]
    if loaded != ["alerts.yml"]:
        out.append(f"prometheus.yml's rule_files are {loaded} under deploy/, not [alerts.yml]")
    exported = _exported()
    rules = [r for g in d.alerts.get("groups") or [] for r in g.get("rules") or []]
    if not rules:
        out.append("alerts.yml has no rule")
    for rule in rules:
        name, expr = rule.get("alert"), str(rule.get("expr", ""))
        if not name or not (rule.get("annotations") or {}).get("summary"):
            out.append(f"a rule without a name or a summary: {rule}")
        for metric in metric_names(expr) or {"(none)": set()}:
            if metric not in exported:
                out.append(f"alert {name}: {metric} is not a series Orchestra exports")
    return out


# --- tests --------------------------------------------------------------------------------------


def every_problem(d: Deploy, tmp: Path) -> list[str]:
    """All the checks above, on one reading of deploy/."""
    return [
        *label_problems(d),
        *probe_problems(d),
        *reference_problems(d),
        *kustomization_problems(d),
        *k8s_settings_problems(d, tmp),
        *compose_problems(d, tmp),
        *monitoring_problems(d, tmp),
        *alert_problems(d),
    ]


def test_every_manifest_is_one_object_of_a_kind_the_issue_asks_for() -> None:
    d = read_deploy()
    assert set(KINDS) <= set(d.k8s)
    assert d.k8s["Deployment"]["spec"]["replicas"] == 3


def test_the_files_under_deploy_agree_with_each_other(tmp_path: Path) -> None:
    assert every_problem(read_deploy(), tmp_path) == []


def test_a_database_password_from_the_environment_reaches_both_sides(tmp_path: Path) -> None:
    d = read_deploy({"ORCHESTRA_DB_PASSWORD": "from-the-env"})
    assert d.compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "from-the-env"
    assert compose_problems(d, tmp_path) == []


@dataclass(frozen=True)
class Swap:
    """Replace ``old`` (which must be there) with ``new`` in a text value."""

    old: str
    new: str


DELETE = object()
POD: tuple[str | int, ...] = ("k8s", "Deployment", "spec", "template", "spec")
CONTAINER = (*POD, "containers", 0)
TOML = ("k8s", "ConfigMap", "data", "orchestra.toml")
SECRET = ("k8s", "Secret", "stringData")
REPLICA = ("compose", "services", "orchestra-2")
URL = ("compose", "services", "orchestra-1", "environment", "ORCHESTRA_DATABASE__URL")
POSTGRES = ("compose", "services", "postgres")
COMPONENT = "app.kubernetes.io/component"
GRAFANA_SOURCES = ("grafana", "provisioning/datasources/prometheus.yaml")
DASHBOARD = ("grafana", "dashboards/orchestra.json")

#: (what breaks, where, the new value, what the problem says)
BREAKS: list[tuple[str, tuple[str | int, ...], object, str]] = [
    ("service-selector", ("k8s", "Service", "spec", "selector", COMPONENT), "api", "Service sel"),
    (
        "pdb-selector",
        ("k8s", "PodDisruptionBudget", "spec", "selector", "matchLabels", COMPONENT),
        "api",
        "PodDisruptionBudget selector",
    ),
    ("pod-labels", (*POD[:-1], "metadata", "labels", COMPONENT), DELETE, "Deployment selector"),
    ("probe-port", (*CONTAINER, "readinessProbe", "httpGet", "port"), "htp", "port 'htp' is not"),
    ("probe-path", (*CONTAINER, "livenessProbe", "httpGet", "path"), "/healthz", "'/healthz'"),
    ("probe-missing", (*CONTAINER, "readinessProbe"), DELETE, "readinessProbe: missing"),
    ("liveness-first", (*CONTAINER, "livenessProbe", "failureThreshold"), 1, "no later than"),
    ("service-port", ("k8s", "Service", "spec", "ports", 0, "targetPort"), 8080, "targetPort 8080"),
    ("configmap-name", ("k8s", "ConfigMap", "metadata", "name"), "x", "no ConfigMap named"),
    ("configmap-key", TOML, DELETE, "the ConfigMap has no key 'orchestra.toml'"),
    (
        "config-path",
        (*CONTAINER, "env", 0, "value"),
        Swap("/etc/orchestra/orchestra.toml", "/etc/orchestra.toml"),
        "ORCHESTRA_CONFIG '/etc/orchestra.toml' is not the mounted ConfigMap file",
    ),
    ("secret-name", ("k8s", "Secret", "metadata", "name"), "x", "no Secret named"),
    ("secret-key", (*SECRET, "database-url"), DELETE, "the Secret has no key 'database-url'"),
    ("image", (*CONTAINER, "image"), "ghcr.io/x/orchestra:1", "no images entry"),
    ("kustomize-files", ("kustomization", "resources", 4), DELETE, "kustomization lists"),
    (
        "termination-grace",
        (*POD, "terminationGracePeriodSeconds"),
        15,
        "terminationGracePeriodSeconds 15 < 25",
    ),
    (
        "shutdown-grace",
        TOML,
        Swap("shutdown_grace = 10.0", "shutdown_grace = 20.0"),
        "terminationGracePeriodSeconds 30 < 35",
    ),
    (
        "unknown-key",
        TOML,
        Swap("concurrency = 4", "concurency = 4"),
        "workers.concurency: unknown setting",
    ),
    ("bad-value", TOML, Swap('format = "json"', 'format = "yaml"'), "logging.format"),
    (
        "overridden-key",
        TOML,
        Swap("[workers]", "[server]\nport = 9000\n\n[workers]"),
        "the ConfigMap sets server.port, but the environment overrides it",
    ),
    ("container-port", (*CONTAINER, "ports", 0, "containerPort"), 9000, "not the service's port"),
    (
        "provider-key-env",
        TOML,
        Swap('"OPENAI_API_KEY"', '"HOSTED_API_KEY"'),
        "HOSTED_API_KEY is not in the pod's env",
    ),
    ("not-postgres", (*SECRET, "database-url"), "sqlite+aiosqlite:///o.db", "not PostgreSQL"),
    ("compose-db-host", URL, Swap("@postgres:", "@db:"), "the database host 'db'"),
    ("compose-password", URL, Swap(":orchestra@", ":other@"), "user, password, database"),
    (
        "compose-stop-grace",
        (*REPLICA, "stop_grace_period"),
        "15s",
        "orchestra-2: stop_grace_period 15s < 20s",
    ),
    (
        "compose-shutdown-grace",
        (*REPLICA, "environment", "ORCHESTRA_WORKERS__SHUTDOWN_GRACE"),
        "30",
        "orchestra-2: stop_grace_period 20s < 40s",
    ),
    (
        "compose-unknown-setting",
        (*REPLICA, "environment", "ORCHESTRA_WORKERS__CONCURENCY"),
        "2",
        "orchestra-2: settings: ORCHESTRA_WORKERS__CONCURENCY",
    ),
    (
        "compose-healthcheck",
        (*REPLICA, "healthcheck", "test", 3),
        Swap("/health'", "/healthz'"),
        "orchestra-2: healthcheck asks http://127.0.0.1:8000/healthz",
    ),
    ("containerfile", (*REPLICA, "build", "dockerfile"), "Dockerfile", "orchestra-2: builds from"),
    (
        "compose-depends-on",
        (*REPLICA, "depends_on", "postgres", "condition"),
        "service_started",
        "orchestra-2: does not wait for postgres",
    ),
    ("compose-replicas", ("compose", "services", "orchestra-3"), DELETE, "2 Orchestra services"),
    ("compose-host-port", (*REPLICA, "ports", 0), "8001:8000", "share a host port"),
    ("pg-isready", (*POSTGRES, "healthcheck", "test", 5), "postgres", "pg_isready checks another"),
    ("pgdata-18", (*POSTGRES, "image"), "postgres:18", "mounted at /var/lib/postgresql"),
    ("volume-undeclared", ("compose", "volumes"), DELETE, "no named volume"),
    (
        "prometheus-target",
        ("prometheus", "scrape_configs", 0, "static_configs", 0, "targets", 1),
        "orchestra-2:9000",
        "does not scrape orchestra-2:8000",
    ),
    (
        "metrics-private",
        (*REPLICA, "environment", "ORCHESTRA_METRICS__PUBLIC"),
        "false",
        "orchestra-2: /metrics needs a key",
    ),
    (
        "prometheus-config",
        ("compose", "services", "prometheus", "command", 0),
        "--config.file=/etc/prometheus.yml",
        "is not deploy/prometheus.yml",
    ),
    (
        "grafana-datasource",
        (*GRAFANA_SOURCES, "datasources", 0, "url"),
        "http://localhost:9090",
        "is not Prometheus",
    ),
    (
        "grafana-panel-source",
        (*DASHBOARD, "panels", 0, "targets", 0, "datasource", "uid"),
        "other",
        "uses data source other",
    ),
    (
        "grafana-dashboards-path",
        ("grafana", "provisioning/dashboards/orchestra.yaml", "providers", 0, "options", "path"),
        "/etc/dashboards",
        "holds no dashboard",
    ),
    ("no-grafana", ("compose", "services", "grafana"), DELETE, "no prometheus or no grafana"),
    (
        "alerts-not-mounted",
        ("compose", "services", "prometheus", "volumes", 1),
        DELETE,
        "rule_files are [None] under deploy/",
    ),
    (
        "alert-metric",
        ("alerts", "groups", 0, "rules", 1, "expr"),
        Swap("orchestra_database_up", "orchestra_db_up"),
        "orchestra_db_up is not a series Orchestra exports",
    ),
    (
        "alert-summary",
        ("alerts", "groups", 0, "rules", 2, "annotations"),
        DELETE,
        "a rule without a name or a summary",
    ),
]


def _change(d: Deploy, path: tuple[str | int, ...], value: object) -> None:
    node: Any = {
        "k8s": d.k8s,
        "kustomization": d.kustomization,
        "compose": d.compose,
        "prometheus": d.prometheus,
        "grafana": d.grafana,
        "alerts": d.alerts,
    }
    *parents, last = path
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    elif isinstance(value, Swap):
        assert value.old in node[last], (path, node[last])
        node[last] = node[last].replace(value.old, value.new)
    else:
        assert isinstance(node, dict) or int(last) < len(node), path
        node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "expected"), [pytest.param(*b[1:], id=b[0]) for b in BREAKS]
)
def test_a_break_is_named(
    path: tuple[str | int, ...], value: object, expected: str, tmp_path: Path
) -> None:
    """Each kind of mismatch, made in a fresh reading of deploy/, is reported."""
    d = read_deploy()
    assert every_problem(d, tmp_path) == []
    _change(d, path, value)
    problems = every_problem(d, tmp_path)
    assert any(expected in p for p in problems), problems


def test_compose_durations_read_as_compose_reads_them() -> None:
    assert [seconds(v) for v in ("20s", "1m30s", "1m", 15, "500ms")] == [20, 90, 60, 15, 0.5]
    assert seconds("twenty") is None
    assert seconds("20 s") is None


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian's prometheus package; .ci/run installs it)",
)
def test_the_alerting_rules_load_and_fire_when_they_should() -> None:
    """Prometheus's own tools: the rules parse (``promtool check rules``), and each one fires
    on the series its test feeds it, and only then (``promtool test rules``, with
    deploy/alerts_test.yml): a missed schedule tick after an outage longer than the rule's
    window came back as a series already at 1, which ``increase()`` did not see."""
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")):
        done = subprocess.run(
            ["promtool", *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
