"""The sessions API over HTTP: create, list, get, delete (one and bulk), the
session record while a turn runs, history, auth, tenant isolation, and the
JSON errors of the routing layer."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import trio

from runtime import TextChunk, UsageChunk

from .conftest import KEY, OTHER_KEY, SSE, Harness, read_sse

SESSION_FIELDS = {
    "id",
    "created_at",
    "last_activity",
    "busy",
    "persistent",
    "ttl",
    "status",
    "metadata",
    "model",
    "active_response_id",
}
HISTORY_FIELDS = {"id", "status", "input", "output_text", "tool_calls", "usage", "created_at"}
SESSION_ID = re.compile(r"sess_[0-9a-f]{32}")
UNKNOWN_SID = "sess_" + "0" * 32


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> None:
    """``response`` is a JSON error ``{"error", "message"}`` with ``status``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str)
    assert isinstance(body["message"], str)
    assert body["message"]
    if error is not None:
        assert body["error"] == error


async def stream_turn(
    client: httpx.AsyncClient,
    sid: str,
    message: str,
    events: list[SSE],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """POST a message; report the response id once headers arrive, then read to the end."""
    async with client.stream(
        "POST", f"/v1/sessions/{sid}/messages", json={"message": message}
    ) as response:
        assert response.status_code == 200, await response.aread()
        task_status.started(response.headers["X-Response-Id"])
        events.extend(await read_sse(response))


def block_second_turn(harness: Harness) -> None:
    """Turn 1 completes ("hello world"); every later turn streams "par" and blocks."""
    harness.model.steps = [
        [TextChunk("hello "), TextChunk("world"), UsageChunk(3, 2)],
        [TextChunk("par"), "block", TextChunk("tial"), UsageChunk(1, 1)],
    ]


def block_every_turn(harness: Harness) -> None:
    """Every turn streams "par" and blocks on ``harness.model.gate``."""
    harness.model.steps = [[TextChunk("par"), "block", TextChunk("tial"), UsageChunk(1, 1)]]


# -- create ---------------------------------------------------------------------


async def test_sessions_create_returns_full_record(harness: Harness) -> None:
    """POST /v1/sessions -> 201 with exactly the record fields, status ready, not busy."""
    with trio.fail_after(10):
        response = await harness.client.post("/v1/sessions")
    assert response.status_code == 201
    assert response.headers["Content-Type"].startswith("application/json")
    record = response.json()
    assert set(record) == SESSION_FIELDS
    assert SESSION_ID.fullmatch(record["id"])
    assert isinstance(record["created_at"], float)
    assert isinstance(record["last_activity"], float)
    assert record["last_activity"] >= record["created_at"]
    assert record["busy"] is False
    assert record["persistent"] is False
    assert record["ttl"] == 14400
    assert record["status"] == "ready"
    assert record["metadata"] == {}
    assert record["model"] == "fake"
    assert record["active_response_id"] is None
    assert (harness.rt.data_dir / "workspaces" / record["id"]).is_dir()


async def test_sessions_create_uses_given_fields(harness: Harness) -> None:
    """persistent, ttl, metadata and model from the body are kept in the record."""
    with trio.fail_after(10):
        record = await create(
            harness.client,
            persistent=True,
            ttl=60.5,
            metadata={"user": "u1", "tags": ["a", 1], "nested": {"k": None}},
            model="fake",
        )
        fetched = (await harness.client.get(f"/v1/sessions/{record['id']}")).json()
    assert record["persistent"] is True
    assert record["ttl"] == 60.5
    assert record["metadata"] == {"user": "u1", "tags": ["a", 1], "nested": {"k": None}}
    assert fetched == record


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"", {}),
        (b"{}", {"Content-Type": "application/json"}),
        (b"  \n ", {"Content-Type": "application/json"}),
        (b'{"metadata": {"via": "curl"}}', {"Content-Type": "application/x-www-form-urlencoded"}),
        (b'{"metadata": {"via": "curl"}}', {}),
        (b'{"metadata": {"via": "curl"}}', {"Content-Type": "text/plain"}),
    ],
    ids=["no-body", "empty-object", "whitespace", "form-type", "no-type", "text-plain"],
)
async def test_sessions_create_body_is_json_whatever_the_content_type(
    harness: Harness, content: bytes, headers: dict[str, str]
) -> None:
    """The body is optional, and parsed as JSON whatever the Content-Type says."""
    with trio.fail_after(10):
        response = await harness.client.post("/v1/sessions", content=content, headers=headers)
    assert response.status_code == 201, response.text
    expected = {"via": "curl"} if b"curl" in content else {}
    assert response.json()["metadata"] == expected


@pytest.mark.parametrize(
    "content",
    [
        b'{"persistent": "yes"}',
        b'{"persistent": 1}',
        b'{"ttl": "1h"}',
        b'{"ttl": 0}',
        b'{"ttl": -5}',
        b'{"ttl": true}',
        b'{"ttl": NaN}',
        b'{"ttl": Infinity}',
        b'{"ttl": 1e400}',
        b'{"metadata": [1]}',
        b'{"metadata": "x"}',
        b'{"model": 3}',
        b'{"model": "not-the-model"}',
        b"[1]",
        b'"a string"',
        b"null",
        b"42",
    ],
)
async def test_sessions_create_wrong_types_are_400(harness: Harness, content: bytes) -> None:
    """A field of the wrong type or range -> 400 JSON error, and no session is created."""
    with trio.fail_after(10):
        response = await harness.client.post(
            "/v1/sessions", content=content, headers={"Content-Type": "application/json"}
        )
        listing = await harness.client.get("/v1/sessions")
    assert_error(response, 400, "invalid_request")
    assert listing.json() == []
    assert harness.rt.sessions() == []


@pytest.mark.parametrize(
    "content", [b"{", b'{"ttl": }', b"{'ttl': 5}", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000]
)
async def test_sessions_create_malformed_json_is_400(harness: Harness, content: bytes) -> None:
    """Malformed (or absurdly nested) JSON -> 400 JSON error, never a 500."""
    with trio.fail_after(10):
        response = await harness.client.post("/v1/sessions", content=content)
    assert_error(response, 400, "invalid_request")
    assert harness.rt.sessions() == []


async def test_sessions_create_keeps_non_ascii_metadata(harness: Harness) -> None:
    """Non-ASCII metadata (accents, emoji) round-trips as UTF-8 JSON."""
    metadata = {"name": "Zoë", "mood": "\U0001f600", "cjk": "会话"}
    with trio.fail_after(10):
        record = await create(harness.client, metadata=metadata)
        fetched = await harness.client.get(f"/v1/sessions/{record['id']}")
    assert record["metadata"] == metadata
    assert fetched.json()["metadata"] == metadata


async def test_sessions_create_lone_surrogate_is_400(harness: Harness) -> None:
    """A lone UTF-16 surrogate in a body string -> 400 and no session (the list stays 200)."""
    with trio.fail_after(10):
        response = await harness.client.post(
            "/v1/sessions", content=b'{"metadata": {"x": "\\ud800"}}'
        )
        listing = await harness.client.get("/v1/sessions")
    assert listing.status_code == 200
    assert listing.json() == []
    assert_error(response, 400, "invalid_request")


async def test_sessions_message_lone_surrogate_is_400(harness: Harness) -> None:
    """A lone surrogate in a message -> 400, no turn; the history stays readable."""
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        response = await harness.client.post(
            f"/v1/sessions/{sid}/messages", content=b'{"message": "hi \\udc80"}'
        )
        await response.aread()
        history = await harness.client.get(f"/v1/sessions/{sid}/messages")
    assert history.status_code == 200
    assert_error(response, 400, "invalid_request")
    assert harness.model.requests == []


# -- list, get --------------------------------------------------------------------


async def test_sessions_list_is_bare_array_of_own_sessions(harness: Harness) -> None:
    """GET /v1/sessions is a bare JSON array holding this account's sessions only."""
    with trio.fail_after(10):
        empty = await harness.client.get("/v1/sessions")
        mine = [(await create(harness.client))["id"] for _ in range(2)]
        async with harness.client_for(OTHER_KEY) as other:
            theirs = (await create(other))["id"]
            their_listing = (await other.get("/v1/sessions")).json()
        listing = await harness.client.get("/v1/sessions")
    assert empty.status_code == 200
    assert empty.json() == []
    assert listing.status_code == 200
    body = listing.json()
    assert isinstance(body, list)
    assert sorted(s["id"] for s in body) == sorted(mine)
    assert all(set(s) == SESSION_FIELDS for s in body)
    assert [s["id"] for s in their_listing] == [theirs]


async def test_sessions_get_one(harness: Harness) -> None:
    """GET /v1/sessions/{id} returns the same record as the create; unknown ids are 404."""
    with trio.fail_after(10):
        record = await create(harness.client, metadata={"a": 1})
        fetched = await harness.client.get(f"/v1/sessions/{record['id']}")
        unknown = await harness.client.get(f"/v1/sessions/{UNKNOWN_SID}")
        garbage = await harness.client.get("/v1/sessions/not-an-id")
    assert fetched.status_code == 200
    assert fetched.json() == record
    assert_error(unknown, 404, "not_found")
    assert_error(garbage, 404, "not_found")


# -- delete ---------------------------------------------------------------------


async def test_sessions_delete_then_404(harness: Harness) -> None:
    """DELETE -> 204 with an empty body and the workspace gone; then GET and DELETE -> 404."""
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        await harness.client.put(f"/v1/sessions/{sid}/files/a/b.txt", content=b"data")
        workspace = harness.rt.data_dir / "workspaces" / sid
        assert (workspace / "a" / "b.txt").exists()
        deleted = await harness.client.delete(f"/v1/sessions/{sid}")
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert not workspace.exists()
        get = await harness.client.get(f"/v1/sessions/{sid}")
        again = await harness.client.delete(f"/v1/sessions/{sid}")
        listing = await harness.client.get("/v1/sessions")
    assert_error(get, 404, "not_found")
    assert_error(again, 404, "not_found")
    assert listing.json() == []


async def test_sessions_delete_cancels_streaming_turn(harness: Harness) -> None:
    """DELETE during a turn ends its open stream with message.cancelled (session_deleted),
    wipes the workspace, and bills nothing."""
    block_every_turn(harness)
    events: list[SSE] = []
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        await harness.client.put(f"/v1/sessions/{sid}/files/work.txt", content=b"x")
        workspace = harness.rt.data_dir / "workspaces" / sid
        async with trio.open_nursery() as nursery:
            rid = await nursery.start(stream_turn, harness.client, sid, "go", events)
            await harness.model.blocked.wait()
            deleted = await harness.client.delete(f"/v1/sessions/{sid}")
            assert deleted.status_code == 204
            assert not workspace.exists()
        usage = (await harness.client.get("/v1/usage")).json()
    assert [e.id for e in events] == list(range(len(events)))
    assert events[0].event == "message.created"
    assert events[-1].event == "message.cancelled"
    assert events[-1].data["reason"] == "session_deleted"
    assert events[-1].data["status"] == "cancelled"
    assert events[-1].data["id"] == rid
    assert [e.event for e in events].count("message.cancelled") == 1
    assert not any(e.event == "message.completed" for e in events)
    assert usage["records"] == []


async def test_sessions_bulk_delete_idle_spares_busy(harness: Harness) -> None:
    """DELETE /v1/sessions?status=idle deletes the idle sessions, not the busy one."""
    block_every_turn(harness)
    events: list[SSE] = []
    with trio.fail_after(10):
        idle = [(await create(harness.client))["id"] for _ in range(2)]
        busy = (await create(harness.client))["id"]
        async with harness.client_for(OTHER_KEY) as other:
            theirs = (await create(other))["id"]
        async with trio.open_nursery() as nursery:
            await nursery.start(stream_turn, harness.client, busy, "go", events)
            await harness.model.blocked.wait()
            response = await harness.client.delete("/v1/sessions", params={"status": "idle"})
            assert response.status_code == 200
            assert response.json() == {"deleted": 2}
            listing = (await harness.client.get("/v1/sessions")).json()
            assert [s["id"] for s in listing] == [busy]
            assert listing[0]["busy"] is True
            for sid in idle:
                assert not (harness.rt.data_dir / "workspaces" / sid).exists()
            harness.model.gate.set()
    assert events[-1].event == "message.completed"
    assert [s.id for s in harness.rt.sessions(account_id=harness.other_account)] == [theirs]


async def test_sessions_bulk_delete_any_cancels_busy(harness: Harness) -> None:
    """?status=any deletes a busy session too: its stream ends cancelled, session_deleted."""
    block_every_turn(harness)
    events: list[SSE] = []
    with trio.fail_after(10):
        await create(harness.client)
        busy = (await create(harness.client))["id"]
        async with trio.open_nursery() as nursery:
            await nursery.start(stream_turn, harness.client, busy, "go", events)
            await harness.model.blocked.wait()
            response = await harness.client.delete("/v1/sessions", params={"status": "any"})
        listing = (await harness.client.get("/v1/sessions")).json()
    assert response.json() == {"deleted": 2}
    assert listing == []
    assert events[-1].event == "message.cancelled"
    assert events[-1].data["reason"] == "session_deleted"
    assert not (harness.rt.data_dir / "workspaces" / busy).exists()


async def test_sessions_bulk_delete_older_than(harness: Harness) -> None:
    """?older_than=1h30m spares fresh sessions; ?older_than=0s deletes them all."""
    with trio.fail_after(10):
        for _ in range(3):
            await create(harness.client)
        none = await harness.client.delete("/v1/sessions", params={"older_than": "1h30m"})
        combined = await harness.client.delete(
            "/v1/sessions", params={"status": "idle", "older_than": "2h"}
        )
        remaining = len((await harness.client.get("/v1/sessions")).json())
        everything = await harness.client.delete("/v1/sessions", params={"older_than": "0s"})
        after = (await harness.client.get("/v1/sessions")).json()
    assert none.status_code == 200
    assert none.json() == {"deleted": 0}
    assert combined.json() == {"deleted": 0}
    assert remaining == 3
    assert everything.json() == {"deleted": 3}
    assert after == []


@pytest.mark.parametrize(
    "params",
    [
        {"older_than": "abc"},
        {"older_than": "1x"},
        {"older_than": "1h30"},
        {"older_than": "h"},
        {"older_than": ""},
        {"older_than": "-1h"},
        {"status": "busy"},
        {"status": ""},
        {"status": "idle", "older_than": "soon"},
        {},
        {"unrelated": "1"},
    ],
)
async def test_sessions_bulk_delete_bad_filter_is_400(
    harness: Harness, params: dict[str, str]
) -> None:
    """A bad status or older_than, or no filter at all -> 400, and nothing is deleted."""
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        response = await harness.client.delete("/v1/sessions", params=params)
        still = await harness.client.get(f"/v1/sessions/{sid}")
    assert_error(response, 400, "invalid_request")
    assert still.status_code == 200


# -- the record while a turn runs, and history -------------------------------------


async def test_sessions_record_busy_while_turn_runs(harness: Harness) -> None:
    """busy/active_response_id are true/the rid during a turn (a 2nd message -> 409), then
    false/null."""
    block_every_turn(harness)
    events: list[SSE] = []
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        async with trio.open_nursery() as nursery:
            rid = await nursery.start(stream_turn, harness.client, sid, "go", events)
            await harness.model.blocked.wait()
            during = (await harness.client.get(f"/v1/sessions/{sid}")).json()
            listed = (await harness.client.get("/v1/sessions")).json()
            second = await harness.client.post(
                f"/v1/sessions/{sid}/messages", json={"message": "again"}
            )
            harness.model.gate.set()
        after = (await harness.client.get(f"/v1/sessions/{sid}")).json()
    assert during["busy"] is True
    assert during["active_response_id"] == rid
    assert listed[0]["busy"] is True
    assert listed[0]["active_response_id"] == rid
    assert_error(second, 409, "session_busy")
    assert rid in second.text
    assert events[-1].event == "message.completed"
    assert after["busy"] is False
    assert after["active_response_id"] is None
    assert after["status"] == "ready"
    assert after["last_activity"] >= during["last_activity"]


async def test_sessions_history_lists_turns_with_cancelled_marked(harness: Harness) -> None:
    """GET …/messages: one item per turn in order; a cancelled turn stays, status cancelled."""
    block_second_turn(harness)
    first: list[SSE] = []
    second: list[SSE] = []
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        empty = await harness.client.get(f"/v1/sessions/{sid}/messages")
        async with trio.open_nursery() as nursery:
            done = await nursery.start(stream_turn, harness.client, sid, "first", first)
        async with trio.open_nursery() as nursery:
            cancelled = await nursery.start(stream_turn, harness.client, sid, "second", second)
            await harness.model.blocked.wait()
            cancel = await harness.client.post(f"/v1/sessions/{sid}/responses/{cancelled}/cancel")
            assert cancel.status_code == 202
        response = await harness.client.get(f"/v1/sessions/{sid}/messages")
    assert empty.status_code == 200
    assert empty.json() == []
    assert response.status_code == 200
    history = response.json()
    assert isinstance(history, list)
    assert [item["id"] for item in history] == [done, cancelled]
    for item in history:
        assert set(item) >= HISTORY_FIELDS
        assert isinstance(item["created_at"], float)
        assert item["tool_calls"] == []
    completed, stopped = history
    assert completed["status"] == "completed"
    assert completed["input"] == "first"
    assert completed["output_text"] == "hello world"
    assert completed["usage"]["input_tokens"] == 3
    assert completed["usage"]["output_tokens"] == 2
    assert stopped["status"] == "cancelled"
    assert stopped["input"] == "second"
    assert stopped["output_text"] == "par"
    assert stopped["created_at"] >= completed["created_at"]
    assert second[-1].event == "message.cancelled"
    assert second[-1].data["reason"] == "client_cancel"


# -- auth -------------------------------------------------------------------------

AUTH_ROUTES = [
    ("GET", "/v1/sessions"),
    ("POST", "/v1/sessions"),
    ("DELETE", "/v1/sessions?status=idle"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/responses"),
    ("GET", f"/v1/sessions/{UNKNOWN_SID}"),
    ("GET", f"/v1/sessions/{UNKNOWN_SID}/files"),
]


BAD_AUTHORIZATION = [
    "",
    "Basic cGtfdGVzdF9hbGljZTo=",
    f"Token {KEY}",
    "Bearer",
    f"Bearer{KEY}",
    KEY,
    "Bearer pk_test_mallory",
    f"Bearer {OTHER_KEY}x",
]


async def test_sessions_auth_refused_is_401(harness: Harness) -> None:
    """No header, a wrong scheme or an unknown key -> 401 JSON on every /v1 route tried;
    /health needs no key."""
    responses: list[httpx.Response] = []
    with trio.fail_after(10):
        async with harness.client_for(None) as anonymous:
            for method, url in AUTH_ROUTES:
                responses.append(await anonymous.request(method, url))
                for value in BAD_AUTHORIZATION:
                    headers = {"Authorization": value}
                    responses.append(await anonymous.request(method, url, headers=headers))
            health = await anonymous.get("/health")
    assert len(responses) == len(AUTH_ROUTES) * (1 + len(BAD_AUTHORIZATION))
    for response in responses:
        request = response.request
        context = (request.method, request.url, request.headers.get("Authorization"))
        assert response.status_code == 401, context
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert harness.rt.sessions() == []
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


async def test_sessions_auth_scheme_is_case_insensitive(harness: Harness) -> None:
    """``bearer KEY`` authenticates like ``Bearer KEY`` (RFC 7235 schemes are case-insensitive)."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(
            base_url=harness.base_url, headers={"Authorization": f"bearer {KEY}"}
        ) as client:
            response = await client.post("/v1/sessions")
    assert response.status_code == 201


@pytest.mark.parametrize("path", ["//v1/sessions", "/v1//sessions", "///v1/usage"])
async def test_sessions_auth_not_bypassed_by_extra_slashes(harness: Harness, path: str) -> None:
    """Doubled slashes do not dodge the key check: no key is never a 200."""
    base = harness.base_url
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            response = await client.get(httpx.URL(base + path))
    assert response.status_code in (401, 404, 308), response.status_code
    if response.status_code != 308:
        assert response.json()["error"] in ("unauthorized", "not_found")


async def test_sessions_health_needs_no_key(harness: Harness) -> None:
    """/health answers 200 {"status": "ok"} without a key."""
    with trio.fail_after(10):
        async with harness.client_for(None) as anonymous:
            response = await anonymous.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# -- tenant isolation ---------------------------------------------------------------


async def test_sessions_other_account_gets_404_never_403(harness: Harness) -> None:
    """Another account's session is 404 on every route (GET, DELETE, messages, files)."""
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        await harness.client.put(f"/v1/sessions/{sid}/files/mine.txt", content=b"MINE")
        async with harness.client_for(OTHER_KEY) as other:
            responses = {
                "get": await other.get(f"/v1/sessions/{sid}"),
                "delete": await other.delete(f"/v1/sessions/{sid}"),
                "history": await other.get(f"/v1/sessions/{sid}/messages"),
                "message": await other.post(
                    f"/v1/sessions/{sid}/messages", json={"message": "hijack"}
                ),
                "files": await other.get(f"/v1/sessions/{sid}/files"),
                "read": await other.get(f"/v1/sessions/{sid}/files/mine.txt"),
                "put": await other.put(f"/v1/sessions/{sid}/files/x.txt", content=b"THEIRS"),
                "bulk": await other.delete("/v1/sessions", params={"status": "any"}),
            }
        record = await harness.client.get(f"/v1/sessions/{sid}")
    bulk = responses.pop("bulk")
    for name, response in responses.items():
        assert response.status_code == 404, (name, response.text)
        assert response.json()["error"] == "not_found", name
        assert b"MINE" not in response.content
    assert bulk.json() == {"deleted": 0}
    assert record.status_code == 200
    assert record.json()["busy"] is False
    assert harness.model.requests == []
    assert (harness.rt.data_dir / "workspaces" / sid / "mine.txt").read_bytes() == b"MINE"
    assert not (harness.rt.data_dir / "workspaces" / sid / "x.txt").exists()


async def test_sessions_other_account_cannot_reach_responses(harness: Harness) -> None:
    """Another account's response is 404 to GET, resume and cancel, and keeps running."""
    block_every_turn(harness)
    events: list[SSE] = []
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        async with trio.open_nursery() as nursery:
            rid = await nursery.start(stream_turn, harness.client, sid, "go", events)
            await harness.model.blocked.wait()
            async with harness.client_for(OTHER_KEY) as other:
                responses = [
                    await other.get(f"/v1/sessions/{sid}/responses/{rid}"),
                    await other.get(f"/v1/sessions/{sid}/responses/{rid}/events"),
                    await other.post(f"/v1/sessions/{sid}/responses/{rid}/cancel"),
                ]
            record = (await harness.client.get(f"/v1/sessions/{sid}")).json()
            harness.model.gate.set()
    for response in responses:
        assert_error(response, 404, "not_found")
    assert record["active_response_id"] == rid
    assert events[-1].event == "message.completed"


async def test_sessions_usage_shows_only_own_records(harness: Harness) -> None:
    """GET /v1/usage lists the caller's usage records only."""
    events: list[SSE] = []
    with trio.fail_after(10):
        sid = (await create(harness.client))["id"]
        async with trio.open_nursery() as nursery:
            rid = await nursery.start(stream_turn, harness.client, sid, "go", events)
        mine = await harness.client.get("/v1/usage")
        async with harness.client_for(OTHER_KEY) as other:
            theirs = await other.get("/v1/usage")
    assert events[-1].event == "message.completed"
    assert mine.status_code == 200
    assert theirs.status_code == 200
    records = mine.json()["records"]
    assert [r["response_id"] for r in records] == [rid]
    assert records[0]["session_id"] == sid
    assert (records[0]["input_tokens"], records[0]["output_tokens"]) == (3, 2)
    assert theirs.json()["records"] == []
    assert mine.json()["rate_limit"]["caller_id"] == harness.account
    assert theirs.json()["rate_limit"]["caller_id"] == harness.other_account


# -- routing errors and shutdown ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("GET", "/nope"),
        ("GET", "/v1/sessions/"),
        ("POST", "/v1/sessions/x/y/z"),
        ("GET", "/"),
    ],
)
async def test_sessions_unknown_route_is_404_json(harness: Harness, method: str, path: str) -> None:
    """An unknown route -> 404 with a JSON body naming the error."""
    with trio.fail_after(10):
        response = await harness.client.request(method, path)
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/sessions"),
        ("PATCH", f"/v1/sessions/{UNKNOWN_SID}"),
        ("POST", f"/v1/sessions/{UNKNOWN_SID}"),
        ("GET", f"/v1/sessions/{UNKNOWN_SID}/responses/msg_x/cancel"),
        ("POST", "/health"),
        ("POST", "/v1/usage"),
    ],
)
async def test_sessions_wrong_method_is_405_json(harness: Harness, method: str, path: str) -> None:
    """A known route with a wrong method -> 405 with a JSON body."""
    with trio.fail_after(10):
        response = await harness.client.request(method, path)
    assert_error(response, 405, "method_not_allowed")


async def test_sessions_wrong_method_names_allowed_methods(harness: Harness) -> None:
    """A 405 carries an Allow header listing the route's methods."""
    with trio.fail_after(10):
        response = await harness.client.put("/v1/sessions")
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers.get("Allow", "").split(",")}
    assert {"GET", "POST", "DELETE"} <= allowed


async def test_sessions_shutdown_answers_503(harness: Harness) -> None:
    """After rt.shutdown(), /v1 routes answer 503 JSON; existing sessions are gone."""
    with trio.fail_after(10):
        await create(harness.client)
        await harness.rt.shutdown()
        responses = [
            await harness.client.get("/v1/sessions"),
            await harness.client.post("/v1/sessions"),
            await harness.client.get("/v1/usage"),
        ]
        async with harness.client_for(None) as anonymous:
            anonymous_response = await anonymous.get("/v1/sessions")
    for response in (*responses, anonymous_response):
        assert_error(response, 503, "shutting_down")
    assert harness.rt.sessions() == []


async def test_sessions_input_that_used_to_500(harness: Harness) -> None:
    """A huge integer ttl and NaN in metadata are 400, never 500 (or invalid JSON out)."""
    with trio.fail_after(10):
        huge = await harness.client.post("/v1/sessions", content=b'{"ttl": 1' + b"0" * 400 + b"}")
        nan = await harness.client.post("/v1/sessions", content=b'{"metadata": {"x": NaN}}')
        inf = await harness.client.post("/v1/sessions", content=b'{"ttl": Infinity}')
    for response in (huge, nan, inf):
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_request"
    assert harness.rt.sessions() == []


async def test_sessions_body_outside_v1_is_refused(harness: Harness) -> None:
    """No route outside /v1 takes a body: one is refused (413) without being read."""
    with trio.fail_after(10):
        response = await harness.client.post("/health", content=b"x" * 10)
    assert response.status_code == 413
