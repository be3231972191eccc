"""The Kustomize overlays render, validate against Kubernetes 1.30, pass checkov, and hold the
install's promises: one cluster name, one correlator variant, probes, limits and a ServiceMonitor per
daemon, restricted stages, the node agent's privileges split from the collector's, narrowed RBAC,
a dry-run first install, NATS with TLS and per-identity credentials in production, and the SRE console
(liveness /healthz, readiness /readyz, its auth file from a Secret, its own NetworkPolicy).

Renders with ``kubectl kustomize`` (kubectl 1.32 on the machine), validates with
``kubernetes-validate`` and scans with checkov from ``.venv-checkov`` (``make checkov``)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("lab", "production")
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
IMAGE = "ghcr.io/breakfix/breakfix"
# daemon (pod's app.kubernetes.io/name) -> its metrics port (README "Metrics")
METRICS_PORTS = {"breakfix-correlator": 9471, "breakfix-correlator-fleet": 9472, "breakfix-remediator": 9473,
                 "breakfix-fleet-collector": 9474, "breakfix-collector": 9410, "breakfix-agent": 9410}
CONSOLE, CONSOLE_PORT = "breakfix-console", 8080  # the SRE console: a web app on port `http`, no metrics
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
Doc = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (1.27+, with kustomize) is needed to render deploy/overlays"
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(overlay: str, *kinds: str) -> list[Doc]:
    return [d for d in rendered(overlay) if d["kind"] in kinds]


def app_name(doc: Doc) -> str:
    return str(doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])


def breakfix_containers(overlay: str) -> list[tuple[Doc, Doc]]:
    return [(w, c) for w in of_kind(overlay, *WORKLOADS) for c in w["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith(IMAGE)]


def config_text(overlay: str, name: str, key: str) -> str:
    cm = next(d for d in of_kind(overlay, "ConfigMap") if d["metadata"]["name"] == name)
    return str(cm["data"][key])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_kubernetes_1_30(overlay: str) -> None:
    crds = 0
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: checked structurally below
            crds += 1
            continue
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}") from exc
    assert crds == len(METRICS_PORTS) + 1  # a ServiceMonitor per daemon, and the alert rules


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_alert_rules_ship_as_a_prometheusrule_identical_to_the_rules_file(overlay: str) -> None:
    (rule,) = of_kind(overlay, "PrometheusRule")
    plain = yaml.safe_load((DEPLOY / "prometheus" / "breakfix-rules.yaml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    assert all(r["annotations"]["runbook_url"] for g in plain["groups"] for r in g["rules"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitors_select_a_service_with_a_metrics_port(overlay: str) -> None:
    services = {(s["metadata"]["namespace"], s["metadata"]["labels"]["app.kubernetes.io/name"]): s
                for s in of_kind(overlay, "Service") if "app.kubernetes.io/name" in s["metadata"].get("labels", {})}
    for sm in of_kind(overlay, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        ns = sm["metadata"]["namespace"]
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [ns]}
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
        want = sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        if want in ("breakfix-correlator-fleet", "breakfix-fleet-collector") and overlay == "lab":
            continue  # the lab runs neither; the monitor is inert there
        svc = services[(ns, want)]
        assert any(p["name"] == "metrics" for p in svc["spec"]["ports"]), want


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over both rendered overlays (its start-up costs more than the scan)."""
    assert CHECKOV.is_file(), "checkov is not installed: run `make checkov` (make test does it first)"
    where = tmp_path_factory.mktemp("checkov")
    for overlay in OVERLAYS:
        (where / f"{overlay}.yaml").write_text(yaml.safe_dump_all(rendered(overlay)))
    out = subprocess.run([str(CHECKOV), "-d", str(where), "--framework", "kubernetes", "--skip-download",
                          "--compact", "-o", "json"], capture_output=True, text=True, timeout=300,
                         check=False)
    report: dict[str, Any] = json.loads(out.stdout)
    assert report["summary"]["parsing_errors"] == 0, out.stderr
    return report


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_with_every_exception_written_down(overlay: str, checkov_report: dict[str, Any]) -> None:
    results = checkov_report.get("results", {})
    mine = [r for r in results.get("passed_checks", []) if r["file_path"].endswith(f"/{overlay}.yaml")]
    assert len(mine) > 100, "checkov scanned nothing"
    failed = [f"{r['check_id']} {r['resource']}" for r in results.get("failed_checks", [])
              if r["file_path"].endswith(f"/{overlay}.yaml")]
    assert not failed, failed
    for doc in rendered(overlay):
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith("CKV") and len(reason) > 20, f"{doc['metadata']['name']} {key}: {value}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_correlator_variant_is_installed(overlay: str) -> None:
    correlators = [w["kind"] for w in of_kind(overlay, *WORKLOADS) if w["metadata"]["name"] == "breakfix-correlator"]
    assert correlators == (["Deployment"] if overlay == "lab" else ["StatefulSet"])
    fleet = [w for w in of_kind(overlay, *WORKLOADS) if w["metadata"]["name"] == "breakfix-correlator-fleet"]
    assert len(fleet) == (0 if overlay == "lab" else 1)


@pytest.mark.parametrize(("overlay", "cluster"), [("lab", "lab"), ("production", "prod-a")])
def test_the_cluster_name_is_set_in_one_place_and_reaches_every_config(overlay: str, cluster: str) -> None:
    text = (DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text()
    assert text.count(f"cluster={cluster}") == 1
    seen = []
    for name, key in (("breakfix-collector", "collector.yaml"), ("breakfix-agent", "agent.yaml"),
                      ("breakfix-remediator", "remediator.yaml")):
        seen.append(yaml.safe_load(config_text(overlay, name, key))["cluster"])
    seen += [e["value"] for _, c in breakfix_containers(overlay) for e in c.get("env", [])
             if e["name"] == "BREAKFIX_CLUSTER"]
    assert set(seen) == {cluster} and len(seen) == (3 if overlay == "lab" else 4)
    assert "CLUSTER" not in yaml.safe_dump_all(rendered(overlay)).replace("BREAKFIX_CLUSTER", "")
    # every scrape is labelled with the cluster: the alert rules keep it, the Alertmanager inhibit rules match on it
    labels = [r["replacement"] for m in of_kind(overlay, "ServiceMonitor") for e in m["spec"]["endpoints"]
              for r in e.get("relabelings", []) if r.get("targetLabel") == "cluster"]
    assert labels and set(labels) == {cluster} and len(labels) == len(of_kind(overlay, "ServiceMonitor"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployed_configs_validate_against_the_real_config_models(overlay: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from breakfix.collectors.config import CollectorConfig
    from breakfix.remediator.config import RemediatorConfig
    from breakfix.remediator.policy import Policy, check_names
    from breakfix.schemas.catalog import default_catalog

    monkeypatch.setenv("NODE_NAME", "gpu-node-000")
    collector = CollectorConfig.model_validate(yaml.safe_load(config_text(overlay, "breakfix-collector",
                                                                          "collector.yaml")))
    assert collector.sources.nvml.enabled and not collector.agent.enabled
    # the exporter is not on the collector pod's loopback (its own pod network): read fleet-wide instead
    assert not collector.sources.dcgm.enabled
    agent = CollectorConfig.model_validate(yaml.safe_load(config_text(overlay, "breakfix-agent", "agent.yaml")))
    s = agent.sources
    assert agent.agent.enabled and not any(x.enabled for x in (s.nvml, s.kmsg, s.dcgm, s.fabric, s.endpoint,
                                                               s.podresources))
    remediator = RemediatorConfig.model_validate(yaml.safe_load(config_text(overlay, "breakfix-remediator",
                                                                            "remediator.yaml")))
    assert remediator.policy == Path("/etc/breakfix/policy.yaml")
    policy = Policy.model_validate(yaml.safe_load(config_text(overlay, "breakfix-remediator", "policy.yaml")))
    check_names(policy, default_catalog(), "policy.yaml", {})  # every category and code it names exists
    assert policy.dry_run, "a first install must change nothing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_daemon_has_its_metrics_port_probes_and_resources(overlay: str) -> None:
    daemons = set()
    for w, c in breakfix_containers(overlay):
        name = app_name(w)
        if name == CONSOLE:  # no metrics port: its own probes test below
            continue
        daemons.add(name)
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [METRICS_PORTS[name]], name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        for part in ("requests", "limits"):
            assert set(c["resources"][part]) == {"cpu", "memory"}, (name, part)
        if "--metrics-port" in c["args"]:
            assert c["args"][c["args"].index("--metrics-port") + 1] == str(METRICS_PORTS[name])
    expected = set(METRICS_PORTS) - ({"breakfix-correlator-fleet", "breakfix-fleet-collector"}
                                     if overlay == "lab" else set())
    assert daemons == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_correlator_fleet_and_remediator_run_restricted(overlay: str) -> None:
    ns = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in of_kind(overlay, "Namespace")}
    assert ns["breakfix"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in of_kind(overlay, *WORKLOADS):
        if w["metadata"]["namespace"] != "breakfix":
            continue
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostPID" not in pod and "hostNetwork" not in pod
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}, w["metadata"]["name"]


def _secret_volumes(pod: Doc) -> list[str]:
    """The pod's volumes that carry Secret files (a secret volume, or a projected one with a secret source)."""
    out = []
    for v in pod.get("volumes") or []:
        if "secret" in v or any("secret" in src for src in (v.get("projected") or {}).get("sources") or []):
            out.append(v["name"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_non_root_pod_can_read_the_secret_files_it_mounts(overlay: str) -> None:
    """The kubelet writes Secret files owned by root (mode 0400 here); a process running as uid 65532 reads them
    only through the group the pod's fsGroup gives them. Without it the daemon cannot open its NATS creds."""
    for w in of_kind(overlay, *WORKLOADS):
        pod = w["spec"]["template"]["spec"]
        secrets = _secret_volumes(pod)
        sc = pod.get("securityContext") or {}
        uids = {c.get("securityContext", {}).get("runAsUser", sc.get("runAsUser")) for c in pod["containers"]}
        if not secrets or uids == {0}:
            continue
        assert sc.get("fsGroup") == 65532, (f"{w['kind']} {w['metadata']['name']} runs as {uids} and mounts "
                                            f"{secrets} without fsGroup: root's 0400 files are unreadable")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_agent_container_holds_reset_and_reboot_privileges(overlay: str) -> None:
    privileged = []
    for w in of_kind(overlay, *WORKLOADS):
        pod = w["spec"]["template"]["spec"]
        if pod.get("hostPID"):
            assert w["metadata"]["name"] == "breakfix-agent"
        for c in pod["containers"] + pod.get("initContainers", []):
            if c.get("securityContext", {}).get("privileged"):
                privileged.append(f"{w['metadata']['name']}/{c['name']}")
    assert privileged == ["breakfix-agent/agent"]
    collector = next(w for w in of_kind(overlay, "DaemonSet") if w["metadata"]["name"] == "breakfix-collector")
    sc = collector["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYSLOG"]} and sc["allowPrivilegeEscalation"] is False
    agent = next(w for w in of_kind(overlay, "DaemonSet") if w["metadata"]["name"] == "breakfix-agent")
    assert agent["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    header = (DEPLOY / "base" / "agent.yaml").read_text().split("apiVersion", 1)[0]
    for why in ("nvidia-smi --gpu-reset", "hostPID", "nsenter", "NVIDIA container toolkit", "DCGM image"):
        assert why in header, f"agent.yaml must say why: {why}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_remediator_rbac_is_narrowed_to_what_it_does(overlay: str) -> None:
    bindings = [b for b in of_kind(overlay, "ClusterRoleBinding", "RoleBinding")
                if any(s["name"] == "breakfix-remediator" for s in b["subjects"])]
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in of_kind(overlay, "ClusterRole", "Role")}
    evict_namespaces = set()
    for b in bindings:
        ref = b["roleRef"]
        role = roles[(ref["kind"], b["metadata"].get("namespace") if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for res in rule["resources"]:
                if role["kind"] == "ClusterRole":
                    assert not ({"delete", "create", "*"} & set(rule["verbs"])), f"cluster-wide {res}: {rule}"
                    assert res in ("nodes", "nodes/status", "pods")
                    if res == "pods":
                        assert set(rule["verbs"]) == {"get", "list", "watch"}
                elif res == "pods/eviction":
                    evict_namespaces.add(role["metadata"]["namespace"])
    config = yaml.safe_load(config_text(overlay, "breakfix-remediator", "remediator.yaml"))
    assert evict_namespaces == set(config["kubernetes"]["drain_namespaces"]) and evict_namespaces


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_nats_monitor_port_is_not_reachable(overlay: str) -> None:
    for svc in of_kind(overlay, "Service"):
        assert all(p["port"] != 8222 for p in svc["spec"]["ports"]), svc["metadata"]["name"]
    for pol in of_kind(overlay, "NetworkPolicy"):
        for rule in pol["spec"].get("ingress", []):
            assert all(p["port"] != 8222 for p in rule.get("ports", [])), pol["metadata"]["name"]
    if overlay == "lab":
        assert "http: 127.0.0.1:8222" in config_text(overlay, "nats-config", "nats.conf")
    else:
        values = yaml.safe_load((DEPLOY / "overlays" / "production" / "nats-values.yaml").read_text())
        assert values["service"]["ports"]["monitor"] == {"enabled": False}


def test_production_nats_runs_tls_with_client_verification_and_jwt_auth() -> None:
    values = yaml.safe_load((DEPLOY / "overlays" / "production" / "nats-values.yaml").read_text())
    cfg = values["config"]
    assert cfg["nats"]["tls"]["enabled"] and cfg["nats"]["tls"]["merge"]["verify"] is True
    assert cfg["cluster"]["tls"]["enabled"] and cfg["cluster"]["replicas"] == 3
    assert "resolver" not in cfg  # bus init's MEMORY resolver comes in through auth.conf (nats-auth-conf.sh)
    assert cfg["merge"] == {"$include": "../breakfix-auth/auth.conf"}
    assert cfg["cluster"]["tls"]["secretName"] != cfg["nats"]["tls"]["secretName"]  # routes need clientAuth too
    assert values["podDisruptionBudget"]["enabled"] and not values["natsBox"]["enabled"]


def test_production_connects_every_daemon_with_tls_and_its_own_identity() -> None:
    identities = {}
    for w, c in breakfix_containers("production"):
        args = c["args"]
        flags = {f: args[args.index(f) + 1] for f in ("--creds", "--tls-ca", "--tls-cert", "--tls-key")}
        name = Path(flags["--creds"]).stem
        assert flags == {"--creds": f"/etc/breakfix/nats/{name}.creds", "--tls-ca": "/etc/breakfix/nats/ca.crt",
                         "--tls-cert": f"/etc/breakfix/nats/{name}.crt", "--tls-key": f"/etc/breakfix/nats/{name}.key"}
        assert {"/etc/breakfix/nats"} <= {m["mountPath"] for m in c["volumeMounts"]}
        identities[app_name(w)] = name
    # the node's collector and agent are the node (role node, named after it); every other daemon is itself
    assert identities == {"breakfix-collector": "node", "breakfix-agent": "node", "breakfix-remediator": "remediator",
                          "breakfix-correlator": "correlator-$(BREAKFIX_PARTITION)",
                          "breakfix-correlator-fleet": "correlator-fleet",
                          "breakfix-fleet-collector": "fleet-collector", CONSOLE: "console"}
    lab_args = [a for _, c in breakfix_containers("lab") for a in c["args"]]
    assert "--creds" not in lab_args


def test_production_has_disruption_budgets_and_network_policies() -> None:
    pdbs = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for p in
            of_kind("production", "PodDisruptionBudget")}
    assert pdbs == {"breakfix-remediator", "breakfix-correlator"}
    denied = {p["metadata"]["namespace"] for p in of_kind("production", "NetworkPolicy")
              if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]}
    assert denied == {"breakfix", "breakfix-node"}


def test_fleet_collector_verifies_prometheus_tls() -> None:
    (c,) = [c for w, c in breakfix_containers("production") if app_name(w) == "breakfix-fleet-collector"]
    args = c["args"]
    assert args[args.index("--prometheus") + 1].startswith("https://")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["REQUESTS_CA_BUNDLE"] == "/etc/breakfix/prometheus/ca.crt"
    assert not any("insecure" in a or "no-verify" in a or "disable" in a for a in args)


AUTH_CONF = DEPLOY / "overlays" / "production" / "nats-auth-conf.sh"
BUS_INIT_CONF = """# Written by 'breakfix bus init'.
server_name: "breakfix-c1"
listen: "0.0.0.0:4222"
http: "127.0.0.1:8222"  # monitoring on loopback only
operator: "/keys/operator.jwt"
system_account: ASYS
resolver: MEMORY
resolver_preload: {
  ASYS: "jwt-sys"
  AAPP: "jwt-app"
}
jetstream: { store_dir: "/keys/jetstream", max_memory_store: 256MB, max_file_store: 50GB }
tls {
  cert_file: "/keys/tls/server.crt"
  verify: true
}
"""


def test_auth_conf_keeps_only_operator_system_account_and_resolver(tmp_path: Path) -> None:
    (tmp_path / "nats-server.conf").write_text(BUS_INIT_CONF)
    out = subprocess.run([str(AUTH_CONF), str(tmp_path)], capture_output=True, text=True, timeout=30, check=True)
    body = [ln for ln in out.stdout.splitlines() if not ln.startswith("#")]
    assert body == ['operator: "/etc/breakfix-auth/operator.jwt"', "system_account: ASYS", "resolver: MEMORY",
                    "resolver_preload: {", '  ASYS: "jwt-sys"', '  AAPP: "jwt-app"', "}"]
    missing = subprocess.run([str(AUTH_CONF), str(tmp_path / "nope")], capture_output=True, text=True, timeout=30,
                             check=False)
    assert missing.returncode == 2 and "breakfix bus init" in missing.stderr


def test_auth_conf_from_a_real_bus_init_is_accepted_by_nats_server(tmp_path: Path) -> None:
    import datetime as dt
    import importlib

    try:
        authinit = importlib.import_module("breakfix.bus.authinit")
    except ImportError:
        pytest.skip("breakfix bus init (breakfix.bus.authinit) is not on this branch yet; the layout test ran")
    authinit.init_bus(tmp_path / "keys", cluster="c1", now=dt.datetime.now(dt.UTC))
    auth = subprocess.run([str(AUTH_CONF), str(tmp_path / "keys"), str(tmp_path / "keys" / "operator.jwt")],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    (tmp_path / "auth.conf").write_text(auth)
    (tmp_path / "server.conf").write_text('listen: "127.0.0.1:-1"\ninclude ./auth.conf\n')
    server = shutil.which("nats-server") or str(ROOT / ".venv" / "bin" / "nats-server")
    out = subprocess.run([server, "-c", str(tmp_path / "server.conf"), "-t"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.nats
async def test_the_deployed_agent_config_runs_as_its_own_process_and_answers_only_its_node(
        nats_server: Any, tmp_path: Path) -> None:
    """The lab overlay's agent ConfigMap, as rendered (only NATS URL, state dir and listen port moved to the
    test's), runs `breakfix collector` as a pure node agent: no signal source, answers its node's subject."""
    import asyncio
    import os
    import socket
    import sys
    from datetime import UTC, datetime

    import aiohttp
    import nats

    from tests.conftest import wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = yaml.safe_load(config_text("lab", "breakfix-agent", "agent.yaml"))
    cfg.update(state_dir=str(tmp_path / "agent"), http_listen=f"127.0.0.1:{port}",
               nats={"url": nats_server.url}, spool={"dir": str(tmp_path / "agent" / "spool")})
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "breakfix"
    proc = await asyncio.create_subprocess_exec(str(exe), "collector", "--config", str(tmp_path / "agent.yaml"),
                                                env={**os.environ, "NODE_NAME": "gpu-node-7"},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    nc = await nats.connect(nats_server.url)
    try:
        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    body = await r.json()
                    return r.status == 200 and body["nats"] is True and body["stale_sources"] == {}
            except (aiohttp.ClientError, OSError):
                return False

        await wait_until(healthy, 30, "the agent's /healthz with NATS up")
        cmd = {"id": "deploy-test-validate-1", "node": "gpu-node-7", "action": "validate", "level": 1,
               "issued_at": datetime.now(UTC).isoformat()}
        reply = json.loads((await nc.request("breakfix.agent.lab.gpu-node-7", json.dumps(cmd).encode(),
                                             timeout=10)).data)
        # no DCGM here: the agent ran the configured NVIDIA dcgmi path and reported that it is missing
        assert reply["node"] == "gpu-node-7" and reply["action"] == "validate" and reply["ok"] is False
        assert "dcgmi diag -r 1" in reply["detail"]
        other = {**cmd, "id": "deploy-test-validate-2", "node": "gpu-node-8"}
        refused = json.loads((await nc.request("breakfix.agent.lab.gpu-node-7", json.dumps(other).encode(),
                                               timeout=10)).data)
        assert refused["ok"] is False and "gpu-node-8" in refused["detail"]
    finally:
        await nc.close()
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_breakfix_pod_is_admitted_to_nats_by_the_network_policy(overlay: str) -> None:
    nats = next(p for p in of_kind(overlay, "NetworkPolicy") if p["metadata"]["name"] == "nats")
    client = next(r for r in nats["spec"]["ingress"] if r["ports"] == [{"port": 4222, "protocol": "TCP"}])
    (peer,) = client["from"]
    (ns_rule,) = peer["namespaceSelector"]["matchExpressions"]
    for w, _c in breakfix_containers(overlay):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["metadata"]["namespace"] in ns_rule["values"], w["metadata"]["name"]
        assert peer["podSelector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]


# -- the SRE console (components/console) ---------------------------------------------------------------------
def console_of(overlay: str) -> tuple[Doc, Doc]:
    (found,) = [(w, c) for w, c in breakfix_containers(overlay) if app_name(w) == CONSOLE]
    return found


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_probes_liveness_on_healthz_and_readiness_on_readyz_at_its_http_port(overlay: str) -> None:
    w, c = console_of(overlay)
    assert (w["kind"], w["metadata"]["namespace"], w["spec"]["replicas"]) == ("Deployment", "breakfix", 1)
    assert c["command"] == ["breakfix", "console"]
    assert c["ports"] == [{"name": "http", "containerPort": CONSOLE_PORT}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # the port opens once the state is loaded (at most 60 s): the startup probe waits longer than that
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] > 60
    for part in ("requests", "limits"):
        assert set(c["resources"][part]) == {"cpu", "memory"}, part
    pod = w["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_listens_on_all_addresses_with_its_auth_file_from_the_operators_secret(overlay: str) -> None:
    w, c = console_of(overlay)
    args = c["args"]
    assert flag(args, "--listen") == f"0.0.0.0:{CONSOLE_PORT}"  # lab mode (no --auth) would refuse it
    assert flag(args, "--nats") == "nats://nats.breakfix.svc:4222"
    assert flag(args, "--auth") == "/etc/breakfix/console/auth.yaml"
    pod = w["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/breakfix/console"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": "breakfix-console-auth", "defaultMode": 0o400,
                                "items": [{"key": "auth.yaml", "path": "auth.yaml"}]}
    # uid 65532 reads the root-owned 0400 files through the group kubelet gives them
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 65532
    assert not of_kind(overlay, "Secret"), "secrets are made by the operator, never rendered from deploy/"
    assert "env" not in c and "envFrom" not in c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_service_keeps_routing_to_it_while_nats_is_down(overlay: str) -> None:
    w, _c = console_of(overlay)
    (svc,) = [s for s in of_kind(overlay, "Service") if s["metadata"]["name"] == CONSOLE]
    assert svc["metadata"]["namespace"] == "breakfix"
    assert svc["spec"]["ports"] == [{"name": "http", "port": CONSOLE_PORT, "targetPort": "http"}]
    assert svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    # /readyz is 503 during a NATS outage, when the last state and the banner are what the on-call needs
    assert svc["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_port_is_admitted_only_from_the_ingress_namespace(overlay: str) -> None:
    w, _c = console_of(overlay)
    labels = w["spec"]["template"]["metadata"]["labels"]

    def selects(pol: Doc) -> bool:
        sel = pol["spec"]["podSelector"]
        if not sel:
            return True
        assert all(e["operator"] == "In" for e in sel.get("matchExpressions", []))
        exprs_ok = all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))
        return exprs_ok and sel.get("matchLabels", {}).items() <= labels.items()

    ingress = [p for p in of_kind(overlay, "NetworkPolicy") if p["metadata"]["namespace"] == "breakfix"
               and "Ingress" in p["spec"]["policyTypes"] and selects(p)]
    rules = [r for p in ingress for r in p["spec"].get("ingress", [])]
    assert {p["metadata"]["name"] for p in ingress} == {"default-deny-ingress", "console"}
    ingress_ns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    assert rules == [{"ports": [{"port": "http", "protocol": "TCP"}], "from": [ingress_ns]}]
    if overlay == "production":  # and it talks to NATS and DNS only
        (egress,) = [p for p in of_kind(overlay, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]
                     and selects(p)]
        assert [(r["ports"], r["to"]) for r in egress["spec"]["egress"]] == [
            ([{"port": 4222, "protocol": "TCP"}],
             [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}]),
            ([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
             [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}])]


def test_production_console_connects_as_its_own_console_identity_from_its_secret() -> None:
    w, c = console_of("production")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/breakfix/nats"]
    (volume,) = [v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "breakfix-nats-console"}},
        {"secret": {"name": "breakfix-nats-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    assert flag(c["args"], "--creds") == "/etc/breakfix/nats/console.creds"
    # the patch replaced the args: what the component passes is still there
    assert flag(c["args"], "--listen") == f"0.0.0.0:{CONSOLE_PORT}"
    assert flag(c["args"], "--auth") == "/etc/breakfix/console/auth.yaml"
    _lw, lab = console_of("lab")
    assert not {"--creds", "--tls-ca", "--tls-cert", "--tls-key"} & set(lab["args"])
    assert all(m["mountPath"] != "/etc/breakfix/nats" for m in lab["volumeMounts"])


@pytest.mark.nats
async def test_the_deployed_console_args_serve_on_all_addresses_and_answer_both_probes(
        nats_server: Any, tmp_path: Path) -> None:
    """The lab overlay's console args, as rendered (only the NATS URL, the port and the auth file's path moved to
    the test's), run `breakfix console` on 0.0.0.0, which it refuses without --auth; /healthz and /readyz say 200."""
    import asyncio
    import socket
    import sys

    import aiohttp

    from tests.conftest import wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _w, c = console_of("lab")
    (tmp_path / "auth.yaml").write_text("mode: proxy\nproxy: {trusted: [10.0.0.0/8], groups: {sre: operator}}\n")
    moved = {"--nats": nats_server.url, "--listen": f"0.0.0.0:{port}", "--auth": str(tmp_path / "auth.yaml")}
    args = list(c["args"])
    for name, value in moved.items():
        args[args.index(name) + 1] = value
    exe = str(Path(sys.executable).parent / "breakfix")
    at = args.index("--auth")
    no_auth = args[:at] + args[at + 2:]
    refused = await asyncio.create_subprocess_exec(exe, "console", *no_auth, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode == 2 and "give --auth FILE to listen on 0.0.0.0" in out.decode()
    proc = await asyncio.create_subprocess_exec(exe, "console", *args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async def both_ok() -> bool:
            try:
                async with aiohttp.ClientSession() as http:
                    codes = []
                    for path in ("/healthz", "/readyz"):
                        async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                            codes.append(r.status)
                    return codes == [200, 200]
            except (aiohttp.ClientError, OSError):
                return False

        await wait_until(both_ok, 30, "the deployed console's /healthz and /readyz")
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_still_renders_without_the_console_component(overlay: str, tmp_path: Path) -> None:
    """The console is optional: dropping its one line from an overlay drops it, and its production NATS
    patch (targeted, console-nats.yaml) then matches nothing instead of failing the render."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    lines = kustomization.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.strip().startswith("- ../../components/console")]
    assert len(kept) == len(lines) - 1
    kustomization.write_text("".join(kept))
    out = subprocess.run([str(shutil.which("kubectl")), "kustomize", str(copy / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert not [d for d in docs if d["kind"] in WORKLOADS | {"Service"} and d["metadata"]["name"] == CONSOLE]
    assert len(docs) == len(rendered(overlay)) - 2  # the Deployment and the Service
