"""The Kubernetes adapter: cordon, drain, restart, events, node condition, leader lease.

Thin over the official ``kubernetes`` client (blocking calls run in worker threads), so it
works unchanged against a real API server; tests run it against kmock, a Kubernetes API
emulator, with the eviction subresource scripted (kmock does not implement PDBs).

- cordon sets ``spec.unschedulable``, the ``breakfix.io/quarantine`` NoSchedule taint and
  ownership annotations; a node someone else cordoned is left alone, and breakfix uncordons
  only nodes whose annotation says breakfix cordoned them;
- drain evicts through the Eviction API, which honours PodDisruptionBudgets: a 429 is retried
  with backoff (``bus.retry``), never forced; modes per namespace: ``immediate``,
  ``allow-completion`` (wait for the pod to finish), ``delete-after-timeout`` (the namespace
  owner's explicit choice). Evictions run in bounded parallel. DaemonSet and mirror pods stay;
- ``drain_gpu`` evicts only the pods named for that GPU (from the incident's tenants);
- events on pods and nodes, and the ``GPUHealthy`` node condition.
All writes use JSON merge patches (``application/merge-patch+json``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from breakfix.bus.clock import SYSTEM_CLOCK, Clock
from breakfix.bus.retry import retry_when
from breakfix.remediator.actuator import StepResult
from breakfix.remediator.drain import DrainMode, DrainPolicy, EvictAction, PodFacts, drain_action
from breakfix.remediator.view import ClusterView, NodeView

QUARANTINE = "breakfix.io/quarantine"
OWNER = "breakfix.io/cordoned-by"
INCIDENT = "breakfix.io/incident"
ME = "breakfix"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
REQUEST_TIMEOUT = (10.0, 120.0)  # (connect, read) seconds for every API call: a step's timeout cancels the
#                                  await, but only this frees the worker thread of a call that never answers
NODE_EVENT_NAMESPACE = "default"  # events about a cluster-scoped object: the API server takes them only here
__all__ = ["DrainMode", "DrainPolicy", "KubernetesActuator", "api_for"]


class KubeConfigError(ValueError):
    """The Kubernetes client configuration is missing or unusable; ``str()`` is one line for the CLI."""


def load_api(*, kubeconfig: Path | None = None, context: str | None = None, host: str | None = None,
             token_file: Path | None = None, verify_ssl: bool = True, in_cluster: bool = True) -> client.ApiClient:
    """The API client from a kubeconfig file, an explicit host, or the pod's service account, in that order."""
    from kubernetes import config as kconfig
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise KubeConfigError(f"{kubeconfig}: no such kubeconfig file")
        try:
            api: client.ApiClient = kconfig.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), context=context)
            return api
        except (ConfigException, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
            why = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise KubeConfigError(f"{kubeconfig}: not a usable kubeconfig: {why}") from None
    if host:
        try:
            token = token_file.read_text().strip() if token_file else None
        except OSError as exc:
            raise KubeConfigError(f"{token_file}: cannot read the token: {exc.strerror}") from None
        return api_for(host, token=token, verify_ssl=verify_ssl)
    if in_cluster:
        try:
            kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
        except ConfigException:
            raise KubeConfigError("not running inside a Kubernetes pod (no service account token); give --kubeconfig "
                                  "FILE or kubernetes.kubeconfig / kubernetes.host in the config") from None
        return client.ApiClient()
    raise KubeConfigError("no Kubernetes configuration: give --kubeconfig FILE, kubernetes.kubeconfig, "
                          "kubernetes.host, or kubernetes.in_cluster: true")


# Connections the client keeps open. The client's default (5 per CPU) is below the threads evictions
# run on, so under a burst urllib3 would discard and reopen a connection for most requests.
POOL_CONNECTIONS = 64


def api_for(host: str, *, token: str | None = None, verify_ssl: bool = True) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = host
    cfg.verify_ssl = verify_ssl
    cfg.connection_pool_maxsize = POOL_CONNECTIONS
    if token:
        cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(p: dict[str, Any]) -> dict[str, Any]:
    meta = p.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _cordoned_by_other(n: dict[str, Any]) -> str:
    """Who cordoned the node (as the API's JSON) if not breakfix ("someone else" when unnamed); "" otherwise."""
    owner = ((n.get("metadata") or {}).get("annotations") or {}).get(OWNER)
    return (owner or "someone else") if (n.get("spec") or {}).get("unschedulable") and owner != ME else ""


def _grace_s(p: dict[str, Any]) -> float:
    """The pod's termination grace period (Kubernetes' default 30 s), as the API's JSON gives it."""
    spec = p.get("spec") or {}
    try:
        return max(0.0, float(spec.get("terminationGracePeriodSeconds", 30)))
    except (TypeError, ValueError):
        return 30.0


def _facts(p: dict[str, Any]) -> PodFacts:
    """A pod as the drain evaluator sees it, read straight from the API's JSON."""
    meta = _meta(p)
    return PodFacts(str(meta.get("namespace", "")), str(meta.get("name", "")),
                    str((p.get("status") or {}).get("phase") or "Running"),
                    tuple(str(o.get("kind", "")) for o in (meta.get("ownerReferences") or [])),
                    frozenset(meta.get("annotations") or {}), str(meta.get("uid") or ""))


class KubernetesActuator:
    """The Kubernetes half of the actuator; ``remediator.composite`` adds the node agent and provider."""

    def __init__(self, api: client.ApiClient, *, drain: DrainPolicy | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.core = client.CoreV1Api(api)
        self.drain_policy = drain or DrainPolicy()
        self.clock = clock
        self.sleep = clock.sleep
        self.evictions = 0
        # the client blocks; give it as many threads as evictions may run at once
        self._pool = ThreadPoolExecutor(max_workers=self.drain_policy.parallel + 4, thread_name_prefix="breakfix-k8s")

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        kw.setdefault("_request_timeout", REQUEST_TIMEOUT)  # a hung call must not hold a pool thread for ever
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    async def _raw(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> dict[str, Any]:
        """Call without the client's model deserialization (``_preload_content=False``); the JSON as a dict.

        Listing a busy node's pods through the generated models costs about a millisecond per pod, and a
        drain reads five fields of each; an eviction's answer is not read at all. Non-2xx answers still
        raise ``ApiException`` (the client checks the status before handing the raw response back).
        """
        kw.setdefault("_request_timeout", REQUEST_TIMEOUT)

        def call() -> dict[str, Any]:
            resp = fn(*args, _preload_content=False, **kw)
            try:
                doc = orjson.loads(resp.data) if resp.data else {}
            finally:
                resp.release_conn()
            return doc if isinstance(doc, dict) else {}

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # -- view ------------------------------------------------------------------------------------
    async def view(self) -> ClusterView:
        nodes = await self._call(self.core.list_node)
        pods = (await self._raw(self.core.list_pod_for_all_namespaces)).get("items") or []
        owned = frozenset(f"{m.get('namespace')}/{m.get('name')}" for m in map(_meta, pods)
                          if any(o.get("controller") for o in m.get("ownerReferences") or []))
        return ClusterView(nodes={n.metadata.name: NodeView(
            n.metadata.name, dict(n.metadata.labels or {}), bool(n.spec and n.spec.unschedulable),
            (n.metadata.annotations or {}).get(OWNER) == ME) for n in nodes.items}, controller_owned_pods=owned)

    # -- cordon / uncordon -----------------------------------------------------------------------
    async def _patch_node(self, node: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Any:
        """Read the node as the API's JSON, ``change`` it into a merge patch and send it with the node's
        ``resourceVersion``, so a concurrent writer (the node lifecycle controller's NoExecute taints,
        node-problem-detector, the GPU operator) makes the patch fail with 409 instead of being overwritten;
        then read and try again. Taints keep their API fields (``timeAdded``) as the server gave them."""
        for _ in range(5):
            n = await self._raw(self.core.read_node, node)
            body = change(n)
            if body is None:
                return n
            rv = (n.get("metadata") or {}).get("resourceVersion")
            if rv:
                body.setdefault("metadata", {})["resourceVersion"] = rv
            try:
                await self._call(self.core.patch_node, node, body, _content_type=MERGE)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
            return n
        raise ApiException(status=409, reason=f"node {node} kept changing; gave up after 5 tries")

    async def node_state(self, node: str) -> tuple[bool, str]:
        """(whether the Node's ``Ready`` condition is ``True``, the kubelet's ``status.nodeInfo.bootID``);
        (False, "") while the API server cannot say (an error, a connection blip)."""
        try:
            n = await self._raw(self.core.read_node_status, node)
        except Exception:
            return False, ""
        status = n.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        return ready, str((status.get("nodeInfo") or {}).get("bootID") or "")

    async def cordon(self, node: str, *, incident: str, reason: str) -> StepResult:
        """Cordon and taint ``breakfix.io/quarantine``. A node someone else cordoned keeps their cordon and
        ownership but gets the taint as well, so it stays fenced if they uncordon it during the repair."""

        def change(n: dict[str, Any]) -> dict[str, Any]:
            spec = n.get("spec") or {}
            taints = [t for t in spec.get("taints") or [] if t.get("key") != QUARANTINE]
            taints.append({"key": QUARANTINE, "value": "true", "effect": "NoSchedule"})
            if _cordoned_by_other(n):
                return {"metadata": {"annotations": {INCIDENT: incident}}, "spec": {"taints": taints}}
            return {"metadata": {"annotations": {OWNER: ME, INCIDENT: incident, "breakfix.io/reason": reason[:200],
                                                 "breakfix.io/cordoned-at": _stamp(self.clock.now())}},
                    "spec": {"unschedulable": True, "taints": taints}}

        other = _cordoned_by_other(await self._patch_node(node, change))  # the node the patch was made against
        if other:
            return StepResult(True, f"{node} already cordoned by {other}; left as is and tainted "
                                    f"{QUARANTINE}=true:NoSchedule", {"cordoned_by": other})
        return StepResult(True, f"cordoned {node} and tainted {QUARANTINE}=true:NoSchedule",
                          {"annotation": f"{OWNER}={ME}"})

    async def uncordon(self, node: str, *, incident: str) -> StepResult:
        """Remove breakfix's taint; uncordon only a cordon breakfix made (someone else's stays)."""

        def change(n: dict[str, Any]) -> dict[str, Any] | None:
            ann = (n.get("metadata") or {}).get("annotations") or {}
            taints = (n.get("spec") or {}).get("taints") or []
            keep = [t for t in taints if t.get("key") != QUARANTINE]
            if ann.get(OWNER) != ME:
                return {"metadata": {"annotations": {INCIDENT: None}}, "spec": {"taints": keep}} \
                    if len(keep) != len(taints) or INCIDENT in ann else None
            return {"metadata": {"annotations": {OWNER: None, INCIDENT: None, "breakfix.io/reason": None,
                                                 "breakfix.io/cordoned-at": None}},
                    "spec": {"unschedulable": False, "taints": keep}}

        n = await self._patch_node(node, change)
        if ((n.get("metadata") or {}).get("annotations") or {}).get(OWNER) == ME:
            return StepResult(True, f"uncordoned {node}")
        other = _cordoned_by_other(n)
        return StepResult(True, f"{node} stays cordoned: cordoned by {other}" if other else f"{node} schedulable")

    # -- drain -----------------------------------------------------------------------------------
    async def _pod_docs(self, node: str) -> list[dict[str, Any]]:
        """The pods on ``node`` as the API's JSON (strict on the node even if a server ignores the selector)."""
        doc = await self._raw(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
        return [p for p in doc.get("items") or [] if (p.get("spec") or {}).get("nodeName") == node]

    async def _pods_on(self, node: str) -> list[PodFacts]:
        out = []
        for p in await self._pod_docs(node):
            facts = _facts(p)
            if drain_action(facts, self.drain_policy).action is EvictAction.SKIP:
                continue
            out.append(facts)
        return out

    async def pods_running(self, node: str, pods: tuple[str, ...]) -> bool:
        """Whether any of these ``namespace/pod`` still runs on ``node`` (deferred repair waits for none)."""
        on_node = {f"{p.namespace}/{p.name}" for p in await self._pods_on(node)}
        return any(p in on_node for p in pods)

    async def _evict(self, ns: str, name: str, sem: asyncio.Semaphore) -> tuple[bool, str, bool]:
        """(moved, why, ending): ``ending`` when the pod was told to go and is still ending gracefully (evicted, or
        deleted after PDB refusals), so the drain waits for it; a pod gone or finished is not waited for."""
        action = drain_action(PodFacts(ns, name), self.drain_policy).action
        clock = self.clock
        deadline = clock.monotonic() + self.drain_policy.timeout_s
        async with sem:
            if action is EvictAction.WAIT_FOR_COMPLETION:
                while clock.monotonic() < deadline:
                    try:
                        p = await self._call(self.core.read_namespaced_pod, name, ns)
                    except ApiException as exc:
                        if exc.status == 404:
                            return True, f"{ns}/{name} finished", False
                        raise
                    if p.status and p.status.phase in ("Succeeded", "Failed"):
                        return True, f"{ns}/{name} completed", False
                    await self.sleep(self.drain_policy.retry_s)
                return False, f"{ns}/{name} did not complete within {self.drain_policy.timeout_s:g}s", False
            body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=ns))

            def pdb_blocked(exc: BaseException) -> bool:
                return isinstance(exc, ApiException) and exc.status in (429, 500, 503) \
                    and clock.monotonic() < deadline

            try:
                await retry_when(lambda: self._raw(self.core.create_namespaced_pod_eviction, name, ns, body),
                                 pdb_blocked, wait_s=self.drain_policy.retry_s, sleep=self.sleep)
            except ApiException as exc:
                if exc.status == 404:
                    return True, f"{ns}/{name} already gone", False
                if exc.status == 429 and action is EvictAction.EVICT_THEN_DELETE:
                    await self._call(self.core.delete_namespaced_pod, name, ns)
                    return True, f"{ns}/{name} deleted after {self.drain_policy.timeout_s:g}s of PDB refusals " \
                                 f"(namespace drain mode delete-after-timeout)", True
                return False, f"{ns}/{name} not evicted: HTTP {exc.status} {exc.reason}", False
            self.evictions += 1
            return True, f"evicted {ns}/{name}", True

    async def _drain(self, node: str, pods: list[PodFacts]) -> StepResult:
        sem = asyncio.Semaphore(self.drain_policy.parallel)
        results = await asyncio.gather(*(self._evict(p.namespace, p.name, sem) for p in pods))
        failed = [why for ok, why, _ in results if not ok]
        if failed:
            return StepResult(False, f"{len(failed)} of {len(pods)} pods on {node} not moved: {failed[0]}",
                              {"evicted": str(len(pods) - len(failed)), "blocked": str(len(failed))})
        evicted = {f"{p.namespace}/{p.name}": p.uid for p, (_, _, ending) in zip(pods, results, strict=True) if ending}
        left, waited = await self._until_gone(node, evicted)
        if left:
            return StepResult(False, f"{len(left)} of {len(evicted)} evicted pods on {node} still terminating after "
                                     f"{waited:.3g}s: {sorted(left)[0]}",
                              {"evicted": str(len(pods)), "terminating": str(len(left))})
        return StepResult(True, f"evicted {len(pods)} pods from {node}", {"evicted": str(len(pods))})

    async def _until_gone(self, node: str, evicted: dict[str, str]) -> tuple[set[str], float]:
        """Wait until the evicted pods have left the node (deleted, or ended), as ``kubectl drain`` does: an
        accepted eviction only starts a pod's graceful termination, and its processes hold the GPU until it
        ends, so a reset right after would find the GPU busy. ``evicted``: ``namespace/name`` -> the evicted pod's
        UID. As ``kubectl drain``, a pod counts as gone once its UID changed: a StatefulSet recreates ``train-3``
        under the same name, on this node too when only a GPU is being drained and the node stays schedulable.
        Returns the pods still there at the deadline, and how long it waited: ``gone_timeout_s``, or the longest
        grace period of those pods plus 30 s."""
        wait = self.drain_policy.gone_timeout_s
        if not evicted or wait <= 0:
            return set(), 0.0
        if not (await self.node_state(node))[0]:  # no kubelet to end them: they would read Running forever, and the
            return set(), 0.0                # reboot this drain usually precedes is what ends them
        start = self.clock.monotonic()
        deadline = start + wait
        poll = min(0.5, self.drain_policy.retry_s)
        while True:
            there = {k: p for p in await self._pod_docs(node)
                     if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                     for m in (_meta(p),) for k in (f"{m.get('namespace', '')}/{m.get('name', '')}",)
                     if k in evicted and (not evicted[k] or str(m.get("uid") or "") in ("", evicted[k]))}
            left = set(there)
            # a pod's own grace period (a trainer checkpointing for 20 minutes) stretches the wait: it is the pod's
            # to use, and ending it early would only leave its processes holding the GPU
            grace = max((_grace_s(there[k]) for k in left), default=0.0)
            deadline = max(deadline, start + grace + 30.0)
            if not left or self.clock.monotonic() >= deadline:
                return left, self.clock.monotonic() - start
            await self.sleep(min(poll, max(0.0, deadline - self.clock.monotonic())))
            poll = min(poll * 2, 10.0)  # 0.5 s, 1, 2, ... 10: prompt for the usual 30 s, light for a long grace

    async def drain(self, node: str, *, incident: str) -> StepResult:
        return await self._drain(node, await self._pods_on(node))

    async def drain_gpu(self, node: str, gpu: int, *, incident: str, pods: tuple[str, ...] = ()) -> StepResult:
        """Evict only the pods that hold this GPU (``namespace/pod`` from the incident's tenants)."""
        on_node = {f"{p.namespace}/{p.name}": p for p in await self._pods_on(node)}
        result = await self._drain(node, [on_node[p] for p in dict.fromkeys(pods) if p in on_node])
        return StepResult(result.ok, result.detail.replace(f"from {node}", f"from {node} gpu{gpu}"), result.evidence)

    # -- pods, events, conditions -----------------------------------------------------------------
    async def restart_pod(self, namespace: str, pod: str, *, incident: str) -> StepResult:
        try:
            await self._call(self.core.delete_namespaced_pod, pod, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return StepResult(True, f"{namespace}/{pod} already gone")
            return StepResult(False, f"delete {namespace}/{pod}: HTTP {exc.status}")
        return StepResult(True, f"deleted {namespace}/{pod}; its controller recreates it")

    async def event(self, namespace: str, kind: str, name: str, reason: str, message: str, *,
                    incident: str, warning: bool = True) -> StepResult:
        if kind == "Node":  # an event about a cluster-scoped object lives in "default" (or ""), else the API
            namespace = NODE_EVENT_NAMESPACE  # server refuses it: involvedObject.namespace does not match
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"generateName": "breakfix-", "namespace": namespace, "labels": {INCIDENT: incident}},
              "involvedObject": {"kind": kind, "name": name, "namespace": namespace if kind != "Node" else "",
                                 **({"uid": name} if kind == "Node" else {})},  # as the kubelet: describe finds it
              "reason": reason, "message": message[:1000], "type": "Warning" if warning else "Normal",
              "source": {"component": "breakfix-remediator"}, "firstTimestamp": _stamp(self.clock.now()),
              "lastTimestamp": _stamp(self.clock.now()),
              "count": 1}
        await self._call(self.core.create_namespaced_event, namespace, ev)
        return StepResult(True, f"event {reason} on {kind} {namespace + '/' if kind != 'Node' else ''}{name}")

    async def notify_tenant(self, namespace: str, pod: str | None, message: str, *, incident: str) -> StepResult:
        return await self.event(namespace, "Pod" if pod else "Namespace", pod or namespace, "GPUFault", message,
                                incident=incident)

    async def set_gpu_condition(self, node: str, healthy: bool, reason: str, message: str) -> StepResult:
        """``GPUHealthy`` on the node's status, as a strategic merge patch: node conditions merge on ``type``, so
        the kubelet's own conditions are neither read nor written back (no race with its heartbeats)."""
        status = "True" if healthy else "False"
        now = _stamp(self.clock.now())
        n = await self._raw(self.core.read_node_status, node)
        conds: list[dict[str, Any]] = (n.get("status") or {}).get("conditions") or []
        was: dict[str, Any] = next((c for c in conds if c.get("type") == "GPUHealthy"), {})
        since = was.get("lastTransitionTime") if was.get("status") == status and was.get("lastTransitionTime") else now
        cond = {"type": "GPUHealthy", "status": status, "reason": reason, "message": message[:500],
                "lastTransitionTime": since, "lastHeartbeatTime": now}  # the transition is when the status changed
        await self._call(self.core.patch_node_status, node, {"status": {"conditions": [cond]}},
                         _content_type=STRATEGIC)
        return StepResult(True, f"{node} GPUHealthy={cond['status']}")
