"""Leader election through a ``coordination.k8s.io/v1`` Lease: only the leader acts.

``LeaseElector.try_acquire`` is one round: read the Lease; create it if missing; take it over
when it expired (``renewTime + leaseDurationSeconds`` in the past) or renew it when we hold it,
always writing with the read ``resourceVersion`` so two candidates racing for an expired
lease cannot both win (the API server rejects the stale write with 409). The remediator calls
it every ``lease_s / 3`` and stops acting the moment it is not the holder. Writes are JSON merge
patches that carry the read ``resourceVersion`` as a precondition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from kubernetes import client
from kubernetes.client.exceptions import ApiException


class LeaseElector:
    def __init__(self, api: client.ApiClient, *, name: str, namespace: str, identity: str, lease_s: int = 15,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_s = lease_s
        self.clock = clock
        self.leader = False

    def _lease(self, now: datetime, acquire: datetime, transitions: int, version: str | None = None) -> client.V1Lease:
        return client.V1Lease(
            api_version="coordination.k8s.io/v1", kind="Lease",
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=version),
            spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_s,
                                    acquire_time=acquire, renew_time=now, lease_transitions=transitions))

    def _round(self) -> bool:
        now = self.clock()
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.coord.create_namespaced_lease(self.namespace, self._lease(now, now, 0))
            except ApiException as exc2:
                if exc2.status == 409:
                    return False  # someone else created it first
                raise
            return True
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renew = spec.renew_time if spec else None
        duration = (spec.lease_duration_seconds if spec else None) or self.lease_s
        if isinstance(renew, str):
            renew = datetime.fromisoformat(renew.replace("Z", "+00:00"))
        expired = renew is None or renew + timedelta(seconds=duration) < now
        if holder not in (None, "", self.identity) and not expired:
            return False
        transitions = (spec.lease_transitions or 0) if spec else 0
        acquire = (spec.acquire_time if spec and holder == self.identity else None) or now
        if isinstance(acquire, str):
            acquire = datetime.fromisoformat(acquire.replace("Z", "+00:00"))
        version = lease.metadata.resource_version if lease.metadata else None
        body = self._lease(now, acquire, transitions + (holder != self.identity), version)
        patch = self.coord.api_client.sanitize_for_serialization(body)
        try:  # a merge patch carrying resourceVersion: the API server refuses it (409) if the lease moved on
            self.coord.patch_namespaced_lease(self.name, self.namespace, patch,
                                              _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status == 409:
                return False  # lost the race for this round
            raise
        return True

    async def try_acquire(self) -> bool:
        self.leader = await asyncio.to_thread(self._round)
        return self.leader
