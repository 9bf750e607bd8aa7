"""deploy/: the Dockerfile, the compose stack and the Kubernetes manifests are valid and agree.

* `docker compose config` (or Debian's `docker-compose config`) accepts the compose file;
* every Kubernetes object validates against the Kubernetes JSON schema (kubernetes-validate,
  strict: unknown fields are errors), and `kubectl kustomize` renders the kustomization;
* the files the Dockerfile copies and the files compose mounts exist, the build context
  (after .dockerignore) builds the package, and the image runs what it declares;
* the proxy configurations (compose file, Kubernetes ConfigMap) pass qtrap's own validation
  and point at the services, ports, GPUs and exporter that the deployment defines;
* the Prometheus configurations pass `promtool check config` (with the rule files) and
  scrape what the deployment runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from qtrap_proxy.config import ProxyConfig, load_config
from tests.helpers import BIN, ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_PROXY = COMPOSE_DIR / "proxy.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
PROM_COMPOSE = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
COUNTERS = DEPLOY / "dcgm-counters.csv"
# Kubernetes versions the manifests must be valid for: the oldest supported here and the
# newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.29", "latest")
# Mounted by compose, but maintained with the dashboards; checked once they exist.
GRAFANA_PATHS = ("grafana/",)

SETUP_HINT = "run `bash scripts/setup.sh --test` (Debian packages prometheus and docker-compose)"


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- docker compose


@cache
def _compose_cmd() -> list[str]:
    """`docker compose` (the v2 plugin) if it works, else Debian's `docker-compose`."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail(f"neither `docker compose` nor `docker-compose` is installed: {SETUP_HINT}")


@cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    svc = _compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def _gpu_ids(svc: dict[str, Any]) -> list[str] | str:
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1, devices
    dev = devices[0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"], dev
    return "all" if dev.get("count") == "all" else [str(i) for i in dev["device_ids"]]


def _default_env(text: str) -> str:
    """Compose interpolation of `${VAR:-default}` with the variables unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_compose_config_accepted_by_docker_compose() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    cmd = [*_compose_cmd(), "-f", str(COMPOSE_FILE), "config"]
    r = subprocess.run(cmd, cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"{shlex.join(cmd)}:\n{r.stdout}\n{r.stderr}"
    rendered = yaml.safe_load(r.stdout)
    assert set(rendered["services"]) == {
        "vllm-bf16",
        "vllm-fp8",
        "tgi-bf16",
        "dcgm-exporter",
        "qtrap-proxy",
        "prometheus",
        "grafana",
    }
    # Interpolation defaults give pinned images, never an empty tag.
    for name, svc in rendered["services"].items():
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), (name, image)


def test_compose_runs_vllm_at_two_precisions_and_tgi_on_their_own_gpus() -> None:
    bf16, fp8, tgi = _service("vllm-bf16"), _service("vllm-fp8"), _service("tgi-bf16")
    assert _default_env(bf16["image"]).startswith("vllm/vllm-openai:")
    assert _default_env(fp8["image"]).startswith("vllm/vllm-openai:")
    assert _default_env(tgi["image"]).startswith("ghcr.io/huggingface/text-generation-inference:")
    assert bf16["command"][0] == fp8["command"][0] == "Qwen/Qwen3-8B"
    assert "--dtype=bfloat16" in bf16["command"]
    assert "--quantization=fp8" in fp8["command"]
    assert "--model-id=Qwen/Qwen3-8B" in tgi["command"]
    ids = [_gpu_ids(s) for s in (bf16, fp8, tgi)]
    flat = [i for group in ids for i in group]
    assert len(flat) == len(set(flat)) == 3, f"each backend has a GPU of its own: {ids}"


def test_compose_dcgm_exporter_collects_energy_every_100_ms() -> None:
    svc = _service("dcgm-exporter")
    assert _default_env(svc["image"]).startswith("nvcr.io/nvidia/k8s/dcgm-exporter:")
    cmd = svc["command"]
    assert cmd[cmd.index("-c") + 1] == "100"
    counters_in_container = cmd[cmd.index("-f") + 1]
    mounts = {_split_volume(v)[1]: _split_volume(v)[0] for v in svc["volumes"]}
    assert (COMPOSE_DIR / mounts[counters_in_container]).resolve() == COUNTERS
    assert _gpu_ids(svc) == "all"
    assert svc["environment"]["NODE_NAME"] == svc["hostname"]


def _split_volume(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    return parts[0], parts[1]


def test_compose_bind_mounts_exist() -> None:
    """Every file or folder compose mounts from the repository exists (named volumes aside)."""
    missing, pending = [], []
    named = set(_compose().get("volumes", {}))
    for name, svc in _compose()["services"].items():
        for spec in svc.get("volumes", []):
            source, _target = _split_volume(spec)
            if source in named:
                continue
            path = (COMPOSE_DIR / source).resolve()
            rel = path.relative_to(ROOT).as_posix()
            if not path.exists():
                (pending if rel.startswith(GRAFANA_PATHS) else missing).append(f"{name}: {rel}")
    assert not missing, missing
    build = _service("qtrap-proxy")["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    if pending:
        pytest.skip(f"Grafana provisioning not in the tree yet: {pending}")


def test_compose_grafana_provisioning_points_at_mounted_dashboards() -> None:
    mounts = dict(_split_volume(v)[::-1] for v in _service("grafana")["volumes"])
    providers = sorted((ROOT / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
    if not providers:
        pytest.skip("grafana/provisioning/dashboards/ not in the tree yet")
    dashboards_target = next(t for t, s in mounts.items() if s.rstrip("/").endswith("grafana/dashboards"))
    for f in providers:
        for p in yaml.safe_load(f.read_text()).get("providers", []):
            path = p.get("options", {}).get("path", "")
            assert path.startswith(dashboards_target), (f.name, path, dashboards_target)


# ---------------------------------------------------------------- proxy configuration


def _check_config_cli(path: Path) -> None:
    r = _run([str(BIN / "qtrap-proxy"), "check-config", "--config", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_proxy_config_is_valid_and_matches_the_stack(tmp_path: Path) -> None:
    _check_config_cli(COMPOSE_PROXY)
    cfg = load_config(COMPOSE_PROXY)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    assert _service("qtrap-proxy")["ports"] == [f"{cfg.server.port}:{cfg.server.port}"]
    mounts = {_split_volume(v)[1]: _split_volume(v)[0] for v in _service("qtrap-proxy")["volumes"]}
    assert (COMPOSE_DIR / mounts["/etc/qtrap/proxy.yaml"]).resolve() == COMPOSE_PROXY
    assert cfg.ledger.path.startswith("/var/lib/qtrap/") and "/var/lib/qtrap" in mounts

    exporter = _service("dcgm-exporter")
    assert cfg.meter.kind == "dcgm"
    assert [urlparse(u)[:3] for u in cfg.meter.urls] == [("http", "dcgm-exporter:9400", "/metrics")]
    for b in cfg.backends:
        svc_name, port = urlparse(b.url).hostname, urlparse(b.url).port
        assert svc_name is not None
        svc = _service(svc_name)
        command = " ".join(svc["command"])
        assert f"--port={port}" in command, (b.name, command)
        assert [d.host for d in b.devices] == [exporter["environment"]["NODE_NAME"]], b.name
        assert [str(d.index) for d in b.devices] == _gpu_ids(svc), b.name
        if b.kind == "vllm":
            assert svc["command"][0] == b.model, b.name
            assert ("--quantization=fp8" in svc["command"]) == (b.precision == "fp8"), b.name


# ---------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _copy_sources() -> list[str]:
    sources = []
    for op, rest in _dockerfile_instructions():
        if op in ("COPY", "ADD"):
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            assert "--from" not in rest, "multi-stage copies are not build-context files"
            sources += args[:-1]
    return sources


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((negate, re.compile(rx)))
    return rules


def _ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder excludes its files."""
    parts = rel.split("/")
    ignored = False
    for negate, rx in rules:
        if any(rx.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerfile_copies_existing_files_not_excluded_from_the_context() -> None:
    rules = _dockerignore()
    sources = _copy_sources()
    assert sources, "the Dockerfile copies nothing"
    for src in sources:
        assert not any(c in src for c in "*?["), f"COPY {src}: name files explicitly"
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src.rstrip("/"), rules), f"COPY {src}: excluded by .dockerignore"
    # The context keeps out what must not be sent to the daemon.
    for rel in (".venv/bin/python", ".git/HEAD", "tests/helpers.py", "loadgen-out/report.json"):
        assert _ignored(rel, rules), rel


def test_dockerfile_declares_a_non_root_proxy_on_8080_with_a_healthcheck() -> None:
    ins = _dockerfile_instructions()
    ops = [op for op, _ in ins]
    base = next(rest for op, rest in ins if op == "FROM")
    assert re.fullmatch(r"python:3\.1[12]-slim", base), base
    user = [rest for op, rest in ins if op == "USER"]
    assert user and not user[-1].startswith(("root", "0")), user
    assert ("EXPOSE", "8080") in ins
    assert "HEALTHCHECK" in ops
    health = next(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8080/health" in health
    install = " ".join(rest for op, rest in ins if op == "RUN")
    assert 'pip install ".[gpu]"' in install
    entry = next(rest for op, rest in ins if op == "ENTRYPOINT")
    assert yaml.safe_load(entry) == ["qtrap-proxy", "serve", "--config", "/etc/qtrap/proxy.yaml"]
    cmd = yaml.safe_load(next(rest for op, rest in ins if op == "CMD"))
    # The image's entrypoint and default arguments are a valid `qtrap-proxy serve` call.
    from qtrap_proxy.cli import _parser

    args = _parser().parse_args([*yaml.safe_load(entry)[1:], *cmd])
    assert (args.command, args.config, args.host, args.port) == (
        "serve",
        "/etc/qtrap/proxy.yaml",
        "0.0.0.0",
        8080,
    )


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 (bdist_wheel built in) satisfies pyproject's setuptools>=69 without `wheel`."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= (70, 1)


def test_docker_build_context_builds_the_package(tmp_path: Path) -> None:
    """The files the Dockerfile copies, as the context sends them, make an installable wheel."""
    rules = _dockerignore()
    ctx = tmp_path / "ctx"
    for src in _copy_sources():
        path = ROOT / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if not _ignored(rel, rules):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
    out = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ctx)]
    if _setuptools_builds_wheels():
        cmd.insert(5, "--no-build-isolation")  # offline: the environment's setuptools builds it
    r = _run(cmd, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("qtrap-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    for required in ("qtrap_proxy/cli.py", "qtrap_proxy/energy/meters.py", "qtrap_sim/profiles/h100.json"):
        assert required in names, required
    assert "qtrap-proxy = qtrap_proxy.cli:main" in entry_points
    assert re.search(r"Requires-Dist: nvidia-ml-py.*extra == \"gpu\"", metadata), "the gpu extra"


# ---------------------------------------------------------------- Kubernetes


@cache
def _k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def test_k8s_manifests_validate_against_the_kubernetes_schema() -> None:
    import kubernetes_validate

    assert _k8s_objects()
    for version in K8S_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        for fname, obj in _k8s_objects():
            where = f"{fname}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')} (Kubernetes {v})"
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{where}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{where}: {e.message}")


def test_k8s_schema_validation_rejects_a_broken_manifest() -> None:
    """The validator is strict and works offline (schemas bundled): a wrong field fails."""
    import kubernetes_validate

    proxy = yaml.safe_load(yaml.safe_dump(_k8s("Deployment", "qtrap-proxy")))
    proxy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(proxy, "1.29", strict=True)
    proxy = yaml.safe_load(yaml.safe_dump(_k8s("Deployment", "qtrap-proxy")))
    proxy["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(proxy, "1.29", strict=True)


def test_k8s_kustomization_lists_every_manifest() -> None:
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kz["kind"] == "Kustomization" and kz["namespace"] == "qtrap"
    files = sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
    assert sorted(kz["resources"]) == files
    proxy_images = [c["image"] for c in _pod_spec(_k8s("Deployment", "qtrap-proxy"))["containers"]]
    assert [i["name"] for i in kz["images"]] == proxy_images
    for _, obj in _k8s_objects():
        assert obj["metadata"].get("namespace", "qtrap") == "qtrap"


def test_k8s_kustomize_renders() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (the manifests are validated without it above)")
    r = _run(["kubectl", "kustomize", str(K8S)])
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(rendered) == len(_k8s_objects())
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "qtrap", obj["metadata"]["name"]


def test_k8s_workloads_have_labels_resources_and_probes() -> None:
    for fname, obj in _k8s_objects():
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "qtrap", (fname, obj["kind"])
        if obj["kind"] not in ("Deployment", "DaemonSet"):
            continue
        name = obj["metadata"]["name"]
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        for c in _pod_spec(obj)["containers"]:
            res = c["resources"]
            assert res["requests"]["memory"] and res["limits"]["memory"], name
            assert "cpu" in res["requests"], name
            assert "readinessProbe" in c and "livenessProbe" in c, name


def _proxy_configmap() -> ProxyConfig:
    cm = _k8s("ConfigMap", "qtrap-proxy-config")
    return load_config(data=yaml.safe_load(cm["data"]["proxy.yaml"]))


def test_k8s_proxy_configmap_is_valid_and_matches_the_manifests(tmp_path: Path) -> None:
    cm = _k8s("ConfigMap", "qtrap-proxy-config")
    (tmp_path / "proxy.yaml").write_text(cm["data"]["proxy.yaml"])
    _check_config_cli(tmp_path / "proxy.yaml")
    cfg = _proxy_configmap()
    deploy = _k8s("Deployment", "qtrap-proxy")
    assert deploy["spec"]["replicas"] >= 2
    pod = _pod_spec(deploy)
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The image reads /etc/qtrap/proxy.yaml; the ConfigMap is mounted there.
    assert volumes[mounts["/etc/qtrap"]]["configMap"]["name"] == "qtrap-proxy-config"
    assert cfg.ledger.path.startswith("/var/lib/qtrap/")
    assert "emptyDir" in volumes[mounts["/var/lib/qtrap"]], "one ledger per replica"
    assert container["args"] == ["--host", cfg.server.host, "--port", str(cfg.server.port)]
    assert container["ports"][0]["containerPort"] == cfg.server.port
    assert pod["securityContext"]["runAsNonRoot"] is True

    # Backends: Services of the vLLM Deployments, on the node and port the config names.
    for b in cfg.backends:
        host, port = urlparse(b.url).hostname, urlparse(b.url).port
        svc = _k8s("Service", str(host))
        assert [p["port"] for p in svc["spec"]["ports"]] == [port], b.name
        dep = _k8s("Deployment", str(host))
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert dep["spec"]["replicas"] == 1, "one GPU server per backend entry"
        node = _pod_spec(dep)["nodeSelector"]["kubernetes.io/hostname"]
        assert [d.host for d in b.devices] == [node], b.name
        (vllm,) = _pod_spec(dep)["containers"]
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == str(len(b.devices)), b.name
        assert vllm["args"][0] == b.model and f"--port={port}" in vllm["args"], b.name
        assert ("--quantization=fp8" in vllm["args"]) == (b.precision == "fp8"), b.name
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert (labels["qtrap.io/backend"], labels["qtrap.io/precision"]) == (b.name, b.precision)
    assert {b.precision for b in cfg.backends} == {"bf16", "fp8"}

    # Meter: the dcgm-exporter DaemonSet's headless Service.
    assert cfg.meter.kind == "dcgm"
    (url,) = cfg.meter.urls
    svc = _k8s("Service", str(urlparse(url).hostname))
    assert svc["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in svc["spec"]["ports"]] == [urlparse(url).port]
    ds = _k8s("DaemonSet", "dcgm-exporter")
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_dcgm_exporter_collects_energy_every_100_ms_labelled_by_node() -> None:
    ds = _k8s("DaemonSet", "dcgm-exporter")
    pod = _pod_spec(ds)
    (c,) = pod["containers"]
    assert c["image"].startswith("nvcr.io/nvidia/k8s/dcgm-exporter:")
    args = c["args"]
    assert args[args.index("-c") + 1] == "100"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "the exporter takes no GPU"
    counters_path = args[args.index("-f") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    folder, fname = counters_path.rsplit("/", 1)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[folder])
    cm = _k8s("ConfigMap", volume["configMap"]["name"])
    assert cm["data"][fname] == COUNTERS.read_text(), "the same counters as deploy/dcgm-counters.csv"


def test_dcgm_counters_include_energy_and_power() -> None:
    fields = {}
    for line in COUNTERS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind, _help = (p.strip() for p in line.split(",", 2))
            fields[name] = kind
    assert fields["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    assert fields["DCGM_FI_DEV_POWER_USAGE"] == "gauge"
    assert all(re.fullmatch(r"DCGM_FI_[A-Z0-9_]+", f) for f in fields)


# ---------------------------------------------------------------- Prometheus


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"promtool is not installed: {SETUP_HINT}")
    return path


def _promtool_check(config: Path) -> None:
    r = _run([_promtool(), "check", "config", str(config)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_prometheus_config_passes_promtool_with_its_rules() -> None:
    _promtool_check(PROM_COMPOSE)
    cfg = yaml.safe_load(PROM_COMPOSE.read_text())
    # The rule files resolve against the config's folder in the repository and in the
    # container alike (the two are mounted side by side).
    named = set(_compose()["volumes"])
    binds = [_split_volume(v) for v in _service("prometheus")["volumes"] if _split_volume(v)[0] not in named]
    mounts = {target: (COMPOSE_DIR / source).resolve() for source, target in binds}
    assert mounts == {"/etc/prometheus/prometheus.yml": PROM_COMPOSE, "/etc/prometheus/rules": RULES_DIR}
    assert cfg["rule_files"] == ["rules/*.yml"]


def test_compose_prometheus_scrapes_every_metrics_endpoint_of_the_stack() -> None:
    cfg = yaml.safe_load(PROM_COMPOSE.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in cfg["scrape_configs"]
    }
    proxy = load_config(COMPOSE_PROXY)
    assert targets["qtrap-proxy"] == [f"qtrap-proxy:{proxy.server.port}"]
    backend_targets = sorted(f"{urlparse(b.url).hostname}:{urlparse(b.url).port}" for b in proxy.backends)
    assert sorted(targets["vllm"] + targets["tgi"]) == backend_targets
    assert [urlparse(u).netloc for u in proxy.meter.urls] == targets["dcgm-exporter"]
    # Backend series carry the proxy's own labels for the backend they come from.
    by_target = {
        t: sc.get("labels", {})
        for job in cfg["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    for b in proxy.backends:
        labels = by_target[f"{urlparse(b.url).hostname}:{urlparse(b.url).port}"]
        assert labels == {"pool": b.pool, "backend": b.name, "precision": b.precision}


def test_k8s_prometheus_config_passes_promtool_with_its_rules(tmp_path: Path) -> None:
    cm = _k8s("ConfigMap", "prometheus-config")
    cfg = yaml.safe_load(cm["data"]["prometheus.yml"])
    # In the cluster the rules come from a ConfigMap made of deploy/prometheus/rules/
    # (docs/deploy.md); check the same files here.
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    cfg["rule_files"] = [str(RULES_DIR / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    _promtool_check(path)
    dep = _k8s("Deployment", "prometheus")
    (c,) = _pod_spec(dep)["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(dep)["volumes"]}
    assert volumes[mounts["/etc/prometheus/rules"]]["configMap"]["optional"] is True
    assert volumes[mounts["/etc/prometheus/prometheus.yml"]]["configMap"]["name"] == "prometheus-config"


def test_k8s_prometheus_scrapes_each_replica_and_each_exporter() -> None:
    cfg = yaml.safe_load(_k8s("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    proxy = _proxy_configmap()
    # Per-pod addresses come from headless Services.
    for job, service, port in (
        ("qtrap-proxy", "qtrap-proxy-metrics", 8080),
        ("dcgm-exporter", "dcgm-exporter", 9400),
    ):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [f"{service}.qtrap.svc"] and sd["type"] == "A" and sd["port"] == port
        svc = _k8s("Service", service)
        assert svc["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in svc["spec"]["ports"]] == [port]
    assert _k8s("Service", "qtrap-proxy-metrics")["spec"]["publishNotReadyAddresses"] is True
    vllm = {t: sc["labels"] for sc in jobs["vllm"]["static_configs"] for t in sc["targets"]}
    assert vllm == {
        f"{urlparse(b.url).hostname}.qtrap.svc:{urlparse(b.url).port}": {
            "pool": b.pool,
            "backend": b.name,
            "precision": b.precision,
        }
        for b in proxy.backends
    }


def test_compose_and_k8s_scrape_jobs_share_names() -> None:
    """Recording rules and dashboards select by job: both deployments use the same names."""
    compose_jobs = {j["job_name"] for j in yaml.safe_load(PROM_COMPOSE.read_text())["scrape_configs"]}
    k8s_cfg = yaml.safe_load(_k8s("ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    k8s_jobs = {j["job_name"] for j in k8s_cfg["scrape_configs"]}
    assert k8s_jobs == compose_jobs - {"tgi"}


def test_k8s_proxy_probes_use_the_split_health_routes() -> None:
    """Liveness asks only whether the process answers; readiness whether it can serve and record. Both
    routes stay open with auth on (a probe carries no key)."""
    from qtrap_proxy.auth import Role, role_of
    from qtrap_proxy.openapi import OPERATIONS

    (container,) = _pod_spec(_k8s("Deployment", "qtrap-proxy"))["containers"]
    live = container["livenessProbe"]["httpGet"]["path"]
    ready = container["readinessProbe"]["httpGet"]["path"]
    assert (live, ready) == ("/health/live", "/health/ready")
    documented = {op.path for op in OPERATIONS if op.method == "get"}
    for path in (live, ready):
        assert path in documented
        assert role_of(path, "GET", (), protect_metrics=True) is Role.OPEN


# ---------------------------------------------------------------- Kubernetes: the fleet ledger overlay

K8S_FLEET = DEPLOY / "k8s-fleet-ledger"


def test_k8s_fleet_ledger_overlay_renders_valid_manifests_and_points_every_replica_at_postgresql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/k8s-fleet-ledger: the base plus PostgreSQL; the proxy's environment sets ledger.url and the
    password from the Secret, which the proxy's configuration accepts (the environment overrides the file)."""
    import kubernetes_validate

    r = _run(["kubectl", "kustomize", str(K8S_FLEET)])
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(rendered) == len(_k8s_objects()) + 2  # the StatefulSet and its Service
    for obj in rendered:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for version in K8S_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} (Kubernetes {v}): {'.'.join(str(p) for p in e.path)}: {e.message}")
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "qtrap", where
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    pg = by_name[("StatefulSet", "qtrap-ledger")]
    (db,) = _pod_spec(pg)["containers"]
    assert "readinessProbe" in db and "livenessProbe" in db and db["resources"]["limits"]["memory"]
    assert by_name[("Service", "qtrap-ledger")]["spec"]["ports"][0]["port"] == 5432
    (proxy,) = _pod_spec(by_name[("Deployment", "qtrap-proxy")])["containers"]
    env = {e["name"]: e for e in proxy["env"]}
    url = env["QTRAP_LEDGER__URL"]["value"]
    assert url == "postgresql://qtrap@qtrap-ledger:5432/qtrap"  # no password in it
    secret = env["QTRAP_LEDGER_PASSWORD"]["valueFrom"]["secretKeyRef"]
    db_env = {e["name"]: e for e in db["env"]}
    assert db_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert db_env["POSTGRES_USER"]["value"] == "qtrap" and db_env["POSTGRES_DB"]["value"] == "qtrap"
    monkeypatch.setenv("QTRAP_LEDGER__URL", url)
    cfg = _proxy_configmap()
    assert cfg.ledger.url == url and cfg.ledger.password_env == "QTRAP_LEDGER_PASSWORD"
    assert cfg.ledger.retention_days == 30  # the file's other ledger keys stay
