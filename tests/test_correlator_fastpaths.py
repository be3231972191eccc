"""The correlator's shortcuts give the answers of the long way round.

- the signal decoder (direct validator call, remembered subject matches) accepts and rejects exactly
  what ``Signal.model_validate_json`` does, with the same dead-letter reason, and a node it has
  accepted still cannot send on another node's subject;
- ``Signal.fault_key`` is ``check@entity_key()``, and the core reads the same keys from the field values;
- the core's own reads of a tenant ref's key and workload and of the worse severity give the schemas' answers;
- the fault index's node filter never answers a wrong "no" (any node name, from a signal or a checkpoint), so a
  healthy signal answered early clears nothing the full look-up would have;
- the core's per-(check, code) route cache leaves a class that depends on the message to the message;
- the signal counter's cached labels keep the check-label cap;
- incident index writes collected at the checkpoint: a refused batch is put again, in order, so the
  index ends at every incident's latest version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breakfix.bus.codec import DecodeError, decoder, encode
from breakfix.bus.memory import MemoryBus
from breakfix.correlator.app import CorrelatorConfig, build_correlator
from breakfix.correlator.checkpoint import Checkpoint
from breakfix.correlator.grouping import Correlator, signal_keys
from breakfix.correlator.index import IncidentIndex
from breakfix.correlator.metrics import CorrelatorMetrics
from breakfix.correlator.model import tenant_incident_key, tenant_key, workload, worse
from breakfix.correlator.service import ServiceConfig
from breakfix.correlator.state import FaultIndex
from breakfix.schemas import subjects
from breakfix.schemas.catalog import Catalog
from breakfix.schemas.common import GpuRef, Severity, TenantRef, first_error, max_severity
from breakfix.schemas.incident import IncidentChange
from breakfix.schemas.signal import Signal
from tests.conftest import T0, sig

BUDGET = settings(max_examples=200, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def reference(data: bytes) -> Signal | str:
    """What the decoder gave before its shortcuts: full validation, or the dead-letter reason."""
    try:
        return Signal.model_validate_json(data)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            return f"invalid Signal: {first_error(exc)}"
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return f"undecodable Signal: {type(exc).__name__}: {text}"


def decoded(data: bytes, subject: str | None = None) -> Signal | str:
    decode: Any = decoder(Signal)
    try:
        return decode(data) if subject is None else decode.with_subject(data, subject)  # type: ignore[no-any-return]
    except DecodeError as exc:
        return str(exc)


def _doc(**changes: Any) -> bytes:
    doc = json.loads(encode(sig(pod="train-0", labels={"rack": "r1"}, value=3.5)))
    doc.update(changes)
    return json.dumps(doc).encode()


MALFORMED = {
    "valid": _doc(),
    "valid, fields left out": b'{"id":"abcdefgh","cluster":"c1","node":"n1","source":"sim","check":"xid",'
                              b'"observed_at":"2026-11-23T12:00:00+01:00"}',
    "id too short": _doc(id="short"),
    "id too long": _doc(id="x" * 129),
    "id with whitespace to strip": _doc(id="  abcdefgh  "),
    "empty node": _doc(node=""),
    "unknown source": _doc(source="carrier-pigeon"),
    "bad check name": _doc(check="XID!"),
    "severity not an enum value": _doc(severity="dire"),
    "healthy as a string": _doc(healthy="yes"),
    "value infinite": _doc(value="Infinity"),
    "value a list": _doc(value=[1]),
    "negative gpu index": _doc(gpu={"index": -1}),
    "bad pci bus id": _doc(gpu={"pci_bus_id": "not-a-bus"}),
    "pci bus id to normalise": _doc(gpu={"pci_bus_id": "00000000:3B:00.0"}),
    "tenant without namespace": _doc(tenant={"pod": "p"}),
    "extra key": _doc(extra=1),
    "extra key in gpu": _doc(gpu={"index": 0, "serial": "x"}),
    "labels not strings": _doc(labels={"rack": 1}),
    "naive timestamp": _doc(observed_at="2026-11-23T12:00:00"),
    "timestamp before 1970": _doc(observed_at="1969-12-31T23:59:59Z"),
    "timestamp before year 1 in UTC": _doc(observed_at="0001-01-01T00:00:00+01:00"),
    "wrong schema": _doc(schema="breakfix.signal/v2"),
    "not json": b"{not json",
    "invalid utf-8": b'{"id": "\xc3\x28"}',
    "a list": b"[]",
}


class TestSignalDecoder:
    @pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
    def test_the_decoder_gives_what_full_validation_gives_with_the_same_reason(self, data: bytes) -> None:
        got, want = decoded(data), reference(data)
        assert got == want
        if isinstance(want, Signal):
            assert repr(got) == repr(want)

    @BUDGET
    @given(data=st.data())
    def test_any_field_replaced_decodes_as_full_validation_does(self, data: st.DataObject) -> None:
        doc = json.loads(_doc())
        key = data.draw(st.sampled_from([*sorted(doc), "extra"]))
        doc[key] = data.draw(st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(lambda d: d.isoformat())))
        raw = json.dumps(doc).encode()
        assert decoded(raw) == reference(raw)

    def test_a_node_accepted_on_its_subject_still_cannot_send_on_another_nodes(self) -> None:
        decode: Any = decoder(Signal)
        own, other = encode(sig(node="n1")), encode(sig(node="n2"))
        for _ in range(2):  # the second time the match is remembered
            assert decode.with_subject(own, subjects.signal_subject("c1", "n1")).node == "n1"
        with pytest.raises(DecodeError, match="forged Signal"):
            decode.with_subject(own, subjects.signal_subject("c1", "victim"))
        with pytest.raises(DecodeError, match="forged Signal"):
            decode.with_subject(other, subjects.signal_subject("c1", "n1"))


class TestFaultKey:
    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(gpu=st.one_of(st.none(), st.builds(GpuRef, index=st.one_of(st.none(), st.integers(0, 7)),
                                               uuid=st.one_of(st.none(), st.just(""), st.just("GPU-1")))),
           component=st.one_of(st.none(), st.just(""), st.just("mlx5_0/1")),
           tenant=st.one_of(st.none(), st.builds(TenantRef, namespace=st.just("ns"),
                                                 endpoint=st.one_of(st.none(), st.just(""), st.just("api")),
                                                 pod=st.one_of(st.none(), st.just("p-0")))))
    def test_the_core_reads_the_fault_and_gpu_keys_the_signal_gives(self, gpu: GpuRef | None, component: str | None,
                                                                    tenant: TenantRef | None) -> None:
        """``check@node[/gpu][/component][/tenant endpoint]``, from ``Signal.fault_key`` and from the compiled core's
        read of the field values (``signal_keys``) alike; ``entity_key`` is the part after the check."""
        s = sig(component=component).model_copy(update={"gpu": gpu, "tenant": tenant})
        parts = [s.node] + ([gpu.key()] if gpu is not None else []) + ([component] if component else []) \
            + ([tenant.key()] if tenant is not None and tenant.endpoint else [])
        assert s.fault_key() == f"{s.check}@{'/'.join(parts)}"
        assert s.entity_key() == "/".join(parts)
        assert signal_keys(s.__dict__) == (s.fault_key(), None if gpu is None else gpu.key())


_NODES = st.text(alphabet="ab/@-.", min_size=1, max_size=8)


class TestFaultIndex:
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(ops=st.lists(st.tuples(st.booleans(), _NODES, st.sampled_from(["", "/gpu0", "/GPU-1/mlx5_0/1", "/ns/ep"]),
                                  st.booleans()), max_size=40), probe=_NODES)
    def test_a_node_with_a_fault_open_is_never_answered_no(self, ops: list[tuple[bool, str, str, bool]],
                                                           probe: str) -> None:
        """Faults set with their node or worked out of the key (a checkpoint), dropped again in any order: every node
        holding an open fault is a "maybe", and once none is open anywhere every node is a "no"."""
        index, held = FaultIndex(), {}
        for add, node, rest, known in ops:
            fk = f"ecc.dbe@{node}{rest}"
            if add:
                index.set(fk, "inc-1", node if known else None)
                held[fk] = node
            else:
                index.pop(fk)
                held.pop(fk, None)
        for node in [*held.values(), probe]:
            assert index.may_hold(node) or node not in held.values()
        restored = FaultIndex(dict(index.items()))  # a checkpoint's index: nodes worked out of the keys
        assert restored == index
        for node in held.values():
            assert restored.may_hold(node)
        for fk in list(held):
            index.pop(fk)
            restored.pop(fk)
        assert not index.may_hold(probe) and not restored.may_hold(probe) and len(index) == 0

    @pytest.mark.parametrize("node", ["n1", "rack-2/n1", "n@1/x"])
    def test_a_healthy_signal_clears_its_fault_on_any_node_name_before_and_after_a_restore(
            self, catalog: Catalog, node: str) -> None:
        for restore in (False, True):
            core = Correlator(catalog)
            core.ingest(sig(node=node, check="clock.hw_slowdown", code=None), T0)
            if restore:
                again = Correlator(catalog)
                again.load_state(Checkpoint.decode(Checkpoint(core.to_state()).encode()).state)
                core = again
            assert core.ingest(sig(node="other", check="clock.hw_slowdown", code=None, healthy=True, at=1), T0) == []
            cleared = core.ingest(sig(node=node, check="clock.hw_slowdown", code=None, healthy=True, at=2), T0)
            assert cleared, f"the fault on {node!r} was not cleared (restored: {restore})"
            assert not any(core.state.by_fault.may_hold(n) for n in (node, "other"))


class TestTenantRefs:
    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(pod=st.one_of(st.none(), st.just(""), st.sampled_from(["api-7d9f8c6b5-x2k4p", "batch-x7k2q", "train-3",
                                                                  "lws-2-1", "p-0", "solo"]),
                         st.text(alphabet="abz-079", min_size=1, max_size=24)),
           endpoint=st.one_of(st.none(), st.just(""), st.just("api")))
    def test_the_core_reads_a_tenant_refs_key_and_workload_as_the_ref_gives_them(self, pod: str | None,
                                                                                endpoint: str | None) -> None:
        """``model.tenant_key`` and ``model.workload`` (remembered by pod name) are ``TenantRef.key`` and
        ``TenantRef.workload``, and a workload's incident key is built from the latter."""
        t = TenantRef(namespace="ns", pod=pod, endpoint=endpoint)
        assert tenant_key(t) == t.key()
        for _ in range(2):  # the second read comes from the cache
            assert workload(t) == t.workload()
        assert tenant_incident_key("c1", t) == f"tenant|c1|ns|{t.workload()}"

    def test_the_worse_severity_is_the_schemas(self) -> None:
        for a in Severity:
            for b in Severity:
                assert worse(a, b) is max_severity(a, b)


class TestRoutes:
    def test_an_xid_154_is_classed_by_its_own_message_every_time(self, catalog: Catalog) -> None:
        core = Correlator(catalog)
        for message in ("GPU Reset Required", "Node Reboot Required", "Drain and Reset", ""):
            s = sig(code="154", message=message)
            assert core._route(s, s.check, s.code).fc == catalog.classify(check="xid", code="154", message=message)


class TestSignalCounter:
    def test_checks_past_the_label_cap_count_as_other_every_time(self) -> None:
        metrics = CorrelatorMetrics()
        checks = [f"c.k{i}" for i in range(130)]
        for _ in range(2):
            for c in checks:
                metrics.consumed(sig(check=c, code=None), "BREAKFIX_SIGNALS")
        values = metrics.signals.values
        assert values[("sim", "c.k0")] == 2
        assert values[("sim", "other")] == 4  # checks 129 and 130, twice each
        assert sum(values.values()) == 260


class RefusingIndexBus(MemoryBus):
    """A memory bus with pipelined key-value puts whose first batch the store refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    async def kv_put_start(self, bucket: str, values: Mapping[str, bytes]) -> Awaitable[None]:
        self.batches += 1
        refused = self.batches == 1
        if not refused:
            await self.kv_put_many(bucket, values)

        async def acks() -> None:
            if refused:
                raise RuntimeError("store refused the puts")

        return acks()


class TestIndexWrites:
    async def test_a_refused_index_batch_is_put_again_and_the_index_ends_at_the_latest(
            self, catalog: Catalog) -> None:
        bus = RefusingIndexBus()
        await bus.ensure_streams(subjects.STREAMS)
        # two GPUs, each told of a new fault in every batch of four: every batch changes both incidents
        signals = [sig(node=f"n{i % 2}", check=f"test.fault{i // 2}", code=None, at=i, n=i) for i in range(16)]
        for s in signals:
            await bus.publish(subjects.signal_subject(s.cluster, s.node), encode(s))
        # an index interval of 0: every batch's changes are put in the index with that batch
        svc = build_correlator(CorrelatorConfig(catalog=catalog, service=ServiceConfig(batch=4, index_interval_s=0.0)),
                               bus=bus, clock=lambda: T0)
        stop = asyncio.Event()
        task = asyncio.create_task(svc.run(stop), name="test-correlator")
        while svc.signal_stats.handled < len(signals):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        stop.set()
        await task
        assert bus.batches > 1, "the changes came in several batches"
        latest: dict[str, IncidentChange] = {}
        for m in bus.messages(subjects.INCIDENTS.name):
            ch = IncidentChange.model_validate_json(m.data)
            if ch.incident.id not in latest or ch.incident.version >= latest[ch.incident.id].incident.version:
                latest[ch.incident.id] = ch
        index = await IncidentIndex(bus).snapshot()
        assert index == {i: ch.incident for i, ch in latest.items()}
        assert index == {i: inc.snapshot() for i, inc in svc.core.incidents.items()}
