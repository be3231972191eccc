"""End to end through a real nats-server: sim signals -> incidents -> executed plans."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from breakfix.bus.codec import decoder, encode
from breakfix.bus.consumer import ConsumerSpec, run_consumer
from breakfix.bus.jetstream import JetStreamBus
from breakfix.bus.protocol import Delivery
from breakfix.bus.server import EmbeddedNats
from breakfix.cli.demo import run_demo
from breakfix.collectors.sim import load_scenario
from breakfix.correlator.grouping import Correlator
from breakfix.correlator.service import CorrelatorService
from breakfix.remediator.policy import Policy
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.incident import ActionKind, ActionOutcome, IncidentChange, IncidentStatus
from tests.conftest import sig

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module", params=[False, True], ids=["open-bus", "secured-bus"])
def demo_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, catalog: Catalog,  # type: ignore[no-untyped-def]
                policy: Policy):
    """The whole demo scenario, once on the open lab bus and once over TLS with one JWT identity per
    process (the production permission templates): every outcome below must hold on both."""
    fast = policy.model_copy(update={"settle_s": 0.5})
    return asyncio.run(run_demo(scenario=load_scenario("mixed"), nodes=16, data_dir=tmp_path_factory.mktemp("demo"),
                                catalog=catalog, policy=fast, duration_s=60, speed=2.0, secure=request.param))


def by_category(result, category: str):  # type: ignore[no-untyped-def]
    found = [i for i in result.console.incidents.values() if i.category == category]
    assert len(found) == 1, f"{category}: {[(i.category, i.node) for i in result.console.incidents.values()]}"
    return found[0]


def executed(result, incident_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.action.value for r in result.console.actions
            if r.incident_id == incident_id and r.kind is ActionKind.STEP and r.outcome is ActionOutcome.SUCCEEDED
            and r.action is not None]


class TestDemoPipeline:
    def test_application_fault_stays_in_tenant_domain(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        inc = by_category(demo_result, "application_fault")
        assert inc.domain.value == "tenant"
        assert executed(demo_result, inc.id) == ["notify_tenant", "restart_pod"]
        assert inc.status is IncidentStatus.RESOLVED
        node = demo_result.cluster.nodes[inc.node]
        assert not node.cordoned and node.reboots == 0 and not node.gpu_resets, "the node is not touched"

    def test_dbe_with_remap_is_drained_reset_validated_and_returned(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        inc = by_category(demo_result, "gpu_drain_reset_required")
        assert executed(demo_result, inc.id) == ["cordon", "drain_gpu", "reset_gpu", "validate", "return_to_service"]
        assert inc.status is IncidentStatus.RESOLVED
        assert set(inc.codes) == {"xid:48", "xid:63", "xid:45"}, "collateral XID 45 folded into the DBE incident"
        node = demo_result.cluster.nodes[inc.node]
        assert node.gpu_resets == {3: 1} and not node.cordoned

    def test_gpu_off_the_bus_reboots_the_node_once(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        inc = by_category(demo_result, "node_reboot_required")
        assert executed(demo_result, inc.id) == ["cordon", "drain", "reboot", "validate", "return_to_service"]
        assert demo_result.cluster.nodes[inc.node].reboots == 1

    def test_unknown_code_is_escalated_without_reset_or_reboot(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        inc = by_category(demo_result, "unknown_fault")
        assert inc.status is IncidentStatus.ESCALATED
        assert executed(demo_result, inc.id) == ["cordon", "escalate"]
        node = demo_result.cluster.nodes[inc.node]
        assert node.cordoned and node.reboots == 0 and not node.gpu_resets

    def test_self_clearing_fault_resolves_without_action(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        inc = by_category(demo_result, "thermal_power")
        assert inc.status is IncidentStatus.RESOLVED
        assert executed(demo_result, inc.id) == []

    def test_resent_signal_is_counted_once_and_malformed_is_dead_lettered(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        assert demo_result.duplicates_dropped == 1
        assert by_category(demo_result, "application_fault").signal_count == 2
        assert len(demo_result.console.dead_letters) == 1
        subject, reason = demo_result.console.dead_letters[0]
        assert subject.startswith("breakfix.signals.") and "invalid Signal" in reason

    def test_five_incidents_and_full_audit_trail(self, demo_result) -> None:  # type: ignore[no-untyped-def]
        assert len(demo_result.console.incidents) == 5
        plans = [r for r in demo_result.console.actions if r.kind is ActionKind.PLAN
                 and r.outcome is ActionOutcome.PLANNED]
        assert len(plans) == 4
        assert all(r.actor == "remediator/demo" and r.rule for r in demo_result.console.actions)


async def test_duplicate_without_msg_id_is_counted_once_by_the_correlator(nats_server: EmbeddedNats,
                                                                            catalog: Catalog) -> None:
    """A re-send that slips past JetStream's window is still one signal on the incident."""
    pub = await JetStreamBus.connect(nats_server.url)
    await pub.ensure_streams(subjects.STREAMS)
    corr_bus = await JetStreamBus.connect(nats_server.url)
    watch = await JetStreamBus.connect(nats_server.url)
    seen: list[IncidentChange] = []

    async def on_change(ch: IncidentChange, _m: Delivery) -> None:
        seen.append(ch)

    stop = asyncio.Event()
    service = CorrelatorService(corr_bus, Correlator(catalog), lambda: datetime.now(UTC))
    tasks = [asyncio.create_task(service.run(stop), name="corr"),
             asyncio.create_task(run_consumer(watch, ConsumerSpec(subjects.INCIDENTS.name, "w", subjects.INCIDENTS_ALL,
                                                                  decoder(IncidentChange), on_change), stop=stop),
                                 name="watch")]
    s = sig(code="48")
    for _ in range(2):
        await pub.publish(subjects.signal_subject("c1", "n1"), encode(s))  # no msg-id
    await pub.publish(subjects.signal_subject("c1", "n1"), encode(sig(code="63", at=0.2)), msg_id="x63")
    for _ in range(100):
        if any("xid:63" in ch.incident.codes for ch in seen):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    for b in (pub, corr_bus, watch):
        await b.close()
    last = seen[-1].incident
    assert last.signal_count == 2
    assert service.core.incidents[last.id].duplicate_count == 1
    assert last.category == "gpu_drain_reset_required"

