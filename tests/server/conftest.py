"""Server test harness: a real runtime, hypercorn on 127.0.0.1:0, httpx over the socket.

These tests wait on real sockets, so they use the real clock (no autojump),
with ``trio.fail_after`` guards where a hang is possible.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
import trio
from hypercorn.trio import serve

from runtime import MemoryStore, Pricing, Runtime
from server import create_app
from server._serve import hypercorn_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ..fakes import FakeModel

KEY = "pk_test_alice"
OTHER_KEY = "pk_test_bob"


@attrs.define
class Harness:
    """A running server and what is behind it."""

    rt: Runtime
    store: MemoryStore
    model: FakeModel
    base_url: str
    client: httpx.AsyncClient
    #: The account id of ``KEY`` / ``OTHER_KEY``.
    account: str
    other_account: str

    async def new_session(self) -> str:
        """Create a session with ``KEY``; its id."""
        response = await self.client.post("/v1/sessions")
        assert response.status_code == 201
        sid: str = response.json()["id"]
        return sid

    def workspace_of(self, sid: str) -> Path:
        return self.rt.data_dir / "workspaces" / sid

    def client_for(self, key: str | None) -> httpx.AsyncClient:
        """A new client with ``key`` (None: no Authorization header). Close it."""
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30)


@asynccontextmanager
async def open_harness(
    data_dir: Path,
    model: FakeModel,
    store: MemoryStore | None = None,
    **app_kwargs: Any,
) -> AsyncIterator[Harness]:
    """Start a runtime and a server on a free loopback port; stop both on exit."""
    store = store if store is not None else MemoryStore()
    account = store.ensure_account_for_key(KEY)
    other = store.ensure_account_for_key(OTHER_KEY)
    async with Runtime.open(
        data_dir=data_dir,
        model=model,
        store=store,
        prices={"fake": Pricing(1_000_000.0, 2_000_000.0)},
    ) as rt:
        app = create_app(rt, **app_kwargs)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    serve,
                    app,
                    hypercorn_config("127.0.0.1", 0),
                    shutdown_trigger=trio.sleep_forever,
                )
            )
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(base_url=binds[0], headers=headers, timeout=30) as client:
                yield Harness(rt, store, model, binds[0], client, account, other)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def harness(tmp_path: Path, model: FakeModel) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, model) as h:
        yield h


@attrs.frozen
class SSE:
    """One parsed server-sent event."""

    id: int
    event: str
    data: dict[str, Any]


def parse_sse(text: str) -> list[SSE]:
    """Parse a text/event-stream body (comments such as ': ping' are skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            events.append(SSE(int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


async def read_sse(response: httpx.Response) -> list[SSE]:
    """Read a streamed response to its end and parse it."""
    return parse_sse((await response.aread()).decode())
