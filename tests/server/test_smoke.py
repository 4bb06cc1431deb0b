"""The server starts, authenticates and streams (the harness itself works)."""

from __future__ import annotations

import trio

from .conftest import Harness, read_sse


async def test_server_health_and_stream(harness: Harness) -> None:
    """/health needs no key; a session message streams SSE with X-Response-Id."""
    with trio.fail_after(10):
        async with harness.client_for(None) as anonymous:
            assert (await anonymous.get("/health")).json() == {"status": "ok"}
        sid = (await harness.client.post("/v1/sessions")).json()["id"]
        async with harness.client.stream(
            "POST", f"/v1/sessions/{sid}/messages", json={"message": "hi"}
        ) as response:
            assert response.status_code == 200
            rid = response.headers["X-Response-Id"]
            events = await read_sse(response)
    assert [e.id for e in events] == list(range(len(events)))
    assert events[0].event == "message.created"
    assert events[0].data["id"] == rid
    assert events[-1].event == "message.completed"
