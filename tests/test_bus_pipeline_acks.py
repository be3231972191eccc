"""The pipelined publisher's ack decoder (breakfix.bus.pipeline): whatever comes back on an ack
inbox resolves that publish's future, as a ``PublishAck`` or a ``PublishError``, never an exception
escaping the subscription callback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from breakfix.bus.pipeline import PipelinedPublisher, PublishError
from breakfix.bus.protocol import PublishAck


@dataclass
class _Msg:
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Nc:
    def new_inbox(self) -> str:
        return "_INBOX.test"


async def _ack(data: bytes, headers: dict[str, str] | None = None) -> asyncio.Future[PublishAck]:
    pub = PipelinedPublisher(_Nc())  # type: ignore[arg-type]
    fut: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
    pub._futures["1"] = fut
    await pub._on_ack(_Msg("_INBOX.test.1", data, headers or {}))  # type: ignore[arg-type]
    assert fut.done()
    return fut


async def test_a_stored_message_resolves_to_its_stream_and_sequence() -> None:
    fut = await _ack(b'{"stream":"BREAKFIX_SIGNALS","seq":42,"duplicate":true}')
    assert fut.result() == PublishAck(stream="BREAKFIX_SIGNALS", seq=42, duplicate=True)


async def test_a_server_error_keeps_its_jetstream_code() -> None:
    fut = await _ack(b'{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}')
    exc = fut.exception()
    assert isinstance(exc, PublishError) and exc.err_code == 10071 and "wrong last sequence" in str(exc)


async def test_no_responders_is_a_503_publish_error() -> None:
    exc = (await _ack(b"", {"Status": "503"})).exception()
    assert isinstance(exc, PublishError) and exc.status == "503"


@pytest.mark.parametrize("data", [
    b"", b"{", b"[]", b'"ok"', b"null", b'{"error":"boom"}', b'{"error":[1]}', b'{"seq":"x"}', b'{"seq":[]}',
    b'{"stream":"S","seq":1e400}',
])
async def test_an_unreadable_ack_is_a_publish_error_for_that_publish_only(data: bytes) -> None:
    fut = await _ack(data)
    assert isinstance(fut.exception(), PublishError), data
