"""deploy/: the Compose file, the Kubernetes manifests and the HAProxy config are valid and agree
with each other and with the server. Offline: no Docker, no cluster, no network.

Schemas: the Compose specification as vendored by check-jsonschema, and the Kubernetes schemas
bundled with kubernetes-validate (strict: unknown fields fail). HAProxy: `haproxy -c`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import replicas_config  # noqa: E402

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
K8S = DEPLOY / "k8s"
CONFIG_DOC = REPO / "docs" / "configuration.md"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
)
LOOPBACK_PORTS = [18001, 18002, 18003]

needs_haproxy = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed (CI installs Debian's haproxy 2.6: apt-get install haproxy)",
)


# -- helpers -----------------------------------------------------------------------------------


def documented_variables() -> set[str]:
    """Every environment variable named in the first column of docs/configuration.md's table."""
    names: set[str] = set()
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split(" | ")[0]))
    return names


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, with `${VAR:-default}` read as its default."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {
        key: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value)) for key, value in env.items()
    }


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every non-empty YAML document under deploy/k8s, with its file."""
    found = [
        (path, doc)
        for path in sorted(K8S.glob("*.y*ml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert found, "no manifests in deploy/k8s"
    return found


def resource(kind: str, name: str) -> dict[str, Any]:
    matches = [
        doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(ctr: dict[str, Any], port: int | str) -> int:
    """The containerPort a probe or Service port (a number or a port name) refers to."""
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in ctr["ports"]}
        return port
    return next(p["containerPort"] for p in ctr["ports"] if p.get("name") == port)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def haproxy_check(cfg_text: str, tmp_path: Path) -> str:
    """Run `haproxy -c` on ``cfg_text``; assert it is valid and warning-free; return its output."""
    assert HAPROXY is not None
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(cfg_text)
    proc = subprocess.run(
        [HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output
    return output


def directives(cfg_text: str) -> list[str]:
    """The config's lines without comments and blank lines, stripped."""
    lines = (line.split("#", 1)[0].strip() for line in cfg_text.splitlines())
    return [line for line in lines if line]


def sections(cfg_text: str) -> dict[str, list[str]]:
    """``{"backend tracefix": [its directives], ...}``: a section runs to the next header."""
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in cfg_text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = result.setdefault(line.strip(), [])
        else:
            current.append(line.strip())
    return result


# -- Compose -----------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_check_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt service key fails it."""
    broken = compose()
    broken["services"]["tracefix"]["helthcheck"] = broken["services"]["tracefix"]["healthcheck"]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"redis", "tracefix", "haproxy"} <= set(services)
    redis, tracefix, haproxy = services["redis"], services["tracefix"], services["haproxy"]

    # Stock images for Redis and HAProxy; the server is built from the repository's Dockerfile.
    assert redis["image"] == "redis:7-alpine" and "build" not in redis
    assert haproxy["image"] == "haproxy:2.6" and "build" not in haproxy
    assert (COMPOSE.parent / tracefix["build"] / "Dockerfile").resolve() == REPO / "Dockerfile"

    # Redis is a cache whose keys all expire.
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-ttl"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert "--maxmemory" in command
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])

    # The server: replicas sharing their HTTP episodes through the redis service.
    env = compose_env(tracefix)
    store = urlsplit(env["EPISODE_STORE"])
    assert store.scheme == "redis" and store.hostname == "redis" and store.hostname in services
    assert tracefix["deploy"]["replicas"] >= 2
    assert "/health" in " ".join(tracefix["healthcheck"]["test"])
    assert "ports" not in tracefix, "only HAProxy publishes a port"
    assert tracefix["depends_on"]["redis"]["condition"] == "service_healthy"

    # HAProxy: publishes 8000 and reads deploy/haproxy.cfg.
    assert "8000:8000" in [str(port) for port in haproxy["ports"]]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert (COMPOSE.parent / "haproxy.cfg").is_file()
    assert haproxy["depends_on"]["tracefix"]["condition"] == "service_healthy"


def test_compose_settings_are_documented() -> None:
    """Every variable set for the server exists (docs/configuration.md lists them all)."""
    env = compose_env(compose()["services"]["tracefix"])
    assert set(env) <= documented_variables(), set(env) - documented_variables()


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(K8S.glob("*.y*ml")), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        # Raises ValidationError (a bad or unknown field) or SchemaNotFoundError (unknown kind).
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validation above is not vacuous: a misspelt container field fails it."""
    deployment = resource("Deployment", "tracefix")
    container(deployment)["readinesProbe"] = container(deployment)["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment() -> None:
    deployment = resource("Deployment", "tracefix")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    ctr = container(deployment)
    labels = spec["template"]["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], labels)
    assert spec["replicas"] >= 2
    assert pod["terminationGracePeriodSeconds"] >= 30

    # Probes on /health at the container's port; liveness gives up later than readiness.
    ports = {p["containerPort"] for p in ctr["ports"]}
    assert ports == {8000}
    ready, live = ctr["readinessProbe"], ctr["livenessProbe"]
    for probe in (ready, live):
        assert probe["httpGet"]["path"] == "/health"
        assert container_port(ctr, probe["httpGet"]["port"]) == 8000
    assert live["failureThreshold"] > ready.get("failureThreshold", 3)

    # Requests and limits for CPU and memory.
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(ctr["resources"][kind])

    # The image's user (Dockerfile: USER 1000), not root.
    user = re.search(r"^USER\s+(\d+)\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user[1])
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False

    # Every variable set for the server exists.
    names = {item["name"] for item in ctr["env"]}
    assert names <= documented_variables(), names - documented_variables()
    assert "MAX_CONCURRENT_ENVS" in names


def test_service_selects_the_deployment() -> None:
    deployment = resource("Deployment", "tracefix")
    service = resource("Service", "tracefix")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    assert container_port(container(deployment), port.get("targetPort", port["port"])) == 8000


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = resource("HorizontalPodAutoscaler", "tracefix")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "tracefix",
    )
    metrics = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert "cpu" in metrics
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_episode_store_points_at_the_redis_service() -> None:
    env = {
        item["name"]: item.get("value")
        for item in container(resource("Deployment", "tracefix"))["env"]
    }
    store = urlsplit(env["EPISODE_STORE"])
    service = resource("Service", store.hostname or "")
    assert store.scheme == "redis"
    assert store.port in {port["port"] for port in service["spec"]["ports"]}
    redis = resource("Deployment", store.hostname or "")
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert container(redis)["image"] == "redis:7-alpine"
    args = container(redis)["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-ttl"


def test_disruption_budget_selects_the_deployment() -> None:
    labels = resource("Deployment", "tracefix")["spec"]["template"]["metadata"]["labels"]
    pdbs = [doc for _, doc in manifests() if doc["kind"] == "PodDisruptionBudget"]
    for pdb in pdbs:
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


# -- HAProxy -----------------------------------------------------------------------------------


@needs_haproxy
def test_haproxy_config_is_valid(tmp_path: Path) -> None:
    haproxy_check(HAPROXY_CFG.read_text(), tmp_path)


def test_haproxy_balances_per_request_without_affinity() -> None:
    cfg = HAPROXY_CFG.read_text()
    for line in directives(cfg):
        keyword = line.split()[0]
        assert keyword != "cookie" and not keyword.startswith("stick"), line
        assert not line.startswith(("balance source", "balance hdr", "balance uri")), line
    backend = sections(cfg)["backend tracefix"]
    assert "balance roundrobin" in backend
    assert "option httpchk GET /health" in backend
    assert "http-check expect status 200" in backend
    assert "option redispatch" in backend
    # Retries only when no answer came at all: a POST /step that was processed is never replayed.
    (retry_on,) = [line for line in backend if line.startswith("retry-on ")]
    assert retry_on.split()[1:] == ["conn-failure", "empty-response"]
    assert any(line.startswith("timeout tunnel ") for line in sections(cfg)["defaults"])


def test_haproxy_servers_are_the_compose_service() -> None:
    """server-template names the Compose service and the port the server listens on."""
    cfg = HAPROXY_CFG.read_text()
    templates = [line for line in directives(cfg) if line.startswith("server-template ")]
    assert templates
    for line in templates:
        _, _, _, address, *params = line.split()
        host, port = address.rsplit(":", 1)
        assert host in compose()["services"] and port == "8000"
        assert params[params.index("resolvers") + 1] == "docker"
    assert any(line.startswith("bind :8000") for line in sections(cfg)["frontend tracefix"])


@needs_haproxy
def test_haproxy_loopback_rendering_is_valid(tmp_path: Path) -> None:
    rendered = replicas_config.render_loopback(HAPROXY_CFG.read_text(), LOOPBACK_PORTS)
    haproxy_check(rendered, tmp_path)
    rendered = replicas_config.render_loopback(
        HAPROXY_CFG.read_text(), LOOPBACK_PORTS, listen_port=18000, stats_port=18404
    )
    haproxy_check(rendered, tmp_path)


def test_render_loopback_replaces_every_server_block() -> None:
    original = HAPROXY_CFG.read_text()
    rendered = replicas_config.render_loopback(original, LOOPBACK_PORTS)
    assert "server-template" not in rendered
    expected = [f"server r{i} 127.0.0.1:{port} check" for i, port in enumerate(LOOPBACK_PORTS, 1)]
    for name in ("backend tracefix", "backend tracefix_pinned"):
        servers = [line for line in sections(rendered)[name] if line.startswith("server ")]
        assert servers == expected
    # Everything outside the blocks is untouched, the markers stay, and rendering again works.
    assert rendered.count(replicas_config.BEGIN_MARKER) == original.count(
        replicas_config.BEGIN_MARKER
    )
    blocks = re.compile(r"# servers:begin\n.*?# servers:end", re.DOTALL)
    assert blocks.sub("", rendered) == blocks.sub("", original)
    assert replicas_config.render_loopback(rendered, LOOPBACK_PORTS) == rendered
    assert "bind :8000" in rendered and "bind :8404" in rendered


def test_render_loopback_binds() -> None:
    rendered = replicas_config.render_loopback(
        HAPROXY_CFG.read_text(), [18001], listen_port=18000, stats_port=18404
    )
    assert "bind 127.0.0.1:18000" in sections(rendered)["frontend tracefix"]
    assert "bind 127.0.0.1:18404" in sections(rendered)["frontend stats"]


@pytest.mark.parametrize(
    ("cfg_text", "ports", "kwargs"),
    [
        ("backend b\n    # servers:begin\n    # servers:end\n", [], {}),
        ("backend b\n    # servers:begin\n    # servers:end\n", [0], {}),
        ("backend b\n    # servers:begin\n    # servers:end\n", [65536], {}),
        ("backend b\n    server s 127.0.0.1:1 check\n", [18001], {}),
        ("backend b\n    # servers:begin\n    # servers:end\n", [18001], {"listen_port": 18000}),
    ],
    ids=["no ports", "port 0", "port too high", "no markers", "no bind line"],
)
def test_render_loopback_rejects(cfg_text: str, ports: list[int], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        replicas_config.render_loopback(cfg_text, ports, **kwargs)
