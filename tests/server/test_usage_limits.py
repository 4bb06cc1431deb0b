"""Rate limits, credit modes and ``GET /v1/usage`` over HTTP.

Every test runs a real server on a loopback socket (``open_harness``), so the
real clock is used and each test is guarded by ``trio.fail_after``. Limits and
balances are set on the harness's ``MemoryStore`` directly; the fake model
(3 input + 2 output tokens a turn, 7 credits at the harness's prices) is
scripted per request, and cancels land while it waits on its ``"block"``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from runtime import CreditMode, TextChunk, UsageChunk, WindowLimit

from .conftest import KEY, OTHER_KEY, Harness, parse_sse
from .test_turns_api import assert_error

if TYPE_CHECKING:
    import httpx

    from runtime import ModelChunk

TIMEOUT: Final = 10
START_BALANCE: Final = 1000.0
#: The fake model's default turn: 3 input and 2 output tokens, 7 credits.
TURN_TOKENS: Final = 5
TURN_COST: Final = 3 * 1 + 2 * 2
DEFAULT_STEP: Final[list[ModelChunk | str]] = [
    TextChunk("hello "),
    TextChunk("world"),
    UsageChunk(3, 2),
]
#: A step that waits on the gate (never opened here): the turn is cancelled.
BLOCK_STEP: Final[list[ModelChunk | str]] = [
    TextChunk("partial"),
    "block",
    TextChunk("never"),
    UsageChunk(50, 50),
]
WINDOW_KEYS: Final = {
    "name",
    "duration_seconds",
    "turns",
    "max_turns",
    "tokens",
    "max_tokens",
    "enabled",
}
RECORD_KEYS: Final = {
    "response_id",
    "session_id",
    "model",
    "input_tokens",
    "output_tokens",
    "credits",
    "created_at",
}
DURATIONS: Final = {"hour": 3600, "day": 86400}
BROKE_KEY: Final = "pk_test_broke"
BROKE_ACCOUNT: Final = "acct_broke"


# -- helpers ------------------------------------------------------------------


def script(harness: Harness, *steps: list[ModelChunk | str]) -> None:
    """Step ``k`` of the fake model is ``steps[min(k, len - 1)]``."""
    harness.model.steps = list(steps)


def limit(harness: Harness, *limits: WindowLimit, account: str | None = None) -> None:
    harness.store.set_account(account or harness.account, limits=limits)


async def new_session(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    assert isinstance(sid, str)
    return sid


def messages_url(sid: str) -> str:
    return f"/v1/sessions/{sid}/messages"


async def complete_message(client: httpx.AsyncClient, sid: str, text: str = "hi") -> str:
    """POST a message, read its stream to the end (message.completed); return its id."""
    async with client.stream("POST", messages_url(sid), json={"message": text}) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        events = parse_sse((await r.aread()).decode())
    assert events[-1].event == "message.completed", events[-1]
    rid = r.headers["X-Response-Id"]
    assert isinstance(rid, str)
    return rid


async def cancelled_message(harness: Harness, client: httpx.AsyncClient, sid: str) -> str:
    """POST a message the model blocks on, cancel it, read to message.cancelled."""
    harness.model.blocked = trio.Event()
    async with client.stream("POST", messages_url(sid), json={"message": "stop me"}) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        rid = r.headers["X-Response-Id"]
        await harness.model.blocked.wait()
        cancel = await client.post(f"/v1/sessions/{sid}/responses/{rid}/cancel")
        assert cancel.status_code == 202, cancel.text
        events = parse_sse((await r.aread()).decode())
    assert events[-1].event == "message.cancelled", events[-1]
    assert isinstance(rid, str)
    return rid


async def complete_response(client: httpx.AsyncClient, *, stream: bool = True) -> str:
    """POST /v1/responses (streamed and read to the end, or not); return its id."""
    body = {"input": "hi", "stream": stream}
    if not stream:
        response = await client.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "completed"
        rid = response.headers["X-Response-Id"]
        assert isinstance(rid, str)
        return rid
    async with client.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        events = parse_sse((await r.aread()).decode())
    assert events[-1].event == "response.completed", events[-1]
    rid = r.headers["X-Response-Id"]
    assert isinstance(rid, str)
    return rid


def assert_rate_limited(response: httpx.Response, window: str = "hour") -> int:
    """429 rate_limited with an integer ``Retry-After`` in [1, the window's length]."""
    assert_error(response, 429, "rate_limited")
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= DURATIONS[window]
    return int(retry_after)


async def usage(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/usage")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def window(report: dict[str, Any], bucket: str, name: str) -> dict[str, Any]:
    windows = report["rate_limit"]["buckets"][bucket]["windows"]
    [found] = [w for w in windows if w["name"] == name]
    assert isinstance(found, dict)
    return found


async def assert_idle(harness: Harness, sid: str, turns: int) -> None:
    """The session is not busy and its history has ``turns`` entries."""
    state = await harness.client.get(f"/v1/sessions/{sid}")
    assert state.status_code == 200
    assert state.json()["busy"] is False
    assert state.json()["active_response_id"] is None
    history = await harness.client.get(messages_url(sid))
    assert history.status_code == 200
    assert len(history.json()) == turns


async def balance(harness: Harness, account: str | None = None) -> float:
    return (await harness.store.get_account(account or harness.account)).balance


def broke_client(harness: Harness, credits: float = 0.0) -> httpx.AsyncClient:
    """A client of a new hard-mode account with ``credits``."""
    harness.store.create_account(BROKE_ACCOUNT, credits=credits)
    harness.store.add_api_key(BROKE_ACCOUNT, BROKE_KEY)
    return harness.client_for(BROKE_KEY)


# -- rate limits: session_turn ---------------------------------------------------


@pytest.mark.parametrize("name", ["hour", "day"])
async def test_third_message_over_a_two_turn_window_is_429(harness: Harness, name: str) -> None:
    """max_turns=2: two messages stream to the end, the third is 429 with Retry-After,
    starts nothing and bills nothing."""
    limit(harness, WindowLimit(bucket="session_turn", window=name, max_turns=2))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        await complete_message(harness.client, sid)
        refused = await harness.client.post(messages_url(sid), json={"message": "third"})
        assert_rate_limited(refused, name)
        await assert_idle(harness, sid, turns=2)
        report = await usage(harness.client)
    assert "X-Response-Id" not in refused.headers
    assert len(harness.model.requests) == 2
    assert await balance(harness) == START_BALANCE - 2 * TURN_COST
    assert len(report["records"]) == 2
    assert window(report, "session_turn", name)["turns"] == 2


async def test_rate_limit_is_per_account_and_survives_new_sessions(harness: Harness) -> None:
    """Alice's full window refuses her in a new session too; Bob is not affected."""
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=1))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        other_sid = await new_session(harness.client)
        assert_rate_limited(
            await harness.client.post(messages_url(other_sid), json={"message": "x"})
        )
        async with harness.client_for(OTHER_KEY) as bob:
            bob_sid = await new_session(bob)
            await complete_message(bob, bob_sid)
            await complete_message(bob, bob_sid)
        await assert_idle(harness, other_sid, turns=0)


async def test_cancelled_turn_counts_as_a_turn(harness: Harness) -> None:
    """max_turns=2: a cancelled turn and a completed one fill the window; only the
    completed one is billed."""
    script(harness, BLOCK_STEP, DEFAULT_STEP)
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=2))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        cancelled = await cancelled_message(harness, harness.client, sid)
        completed = await complete_message(harness.client, sid)
        assert_rate_limited(await harness.client.post(messages_url(sid), json={"message": "3"}))
        await assert_idle(harness, sid, turns=2)
        report = await usage(harness.client)
    assert [r["response_id"] for r in report["records"]] == [completed]
    assert cancelled != completed
    assert await balance(harness) == START_BALANCE - TURN_COST
    hour = window(report, "session_turn", "hour")
    assert (hour["turns"], hour["tokens"]) == (2, TURN_TOKENS)
    assert len(harness.model.requests) == 2


async def test_session_turn_limit_leaves_the_response_bucket_alone(harness: Harness) -> None:
    """A full session_turn window does not refuse POST /v1/responses (streamed or not)."""
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=1))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        assert_rate_limited(await harness.client.post(messages_url(sid), json={"message": "x"}))
        await complete_response(harness.client)
        await complete_response(harness.client)
        await complete_response(harness.client, stream=False)
        report = await usage(harness.client)
    assert window(report, "session_turn", "hour")["turns"] == 1
    assert window(report, "response", "hour")["turns"] == 3
    assert len(report["records"]) == 4


@pytest.mark.parametrize("stream", [True, False])
async def test_response_limit_refuses_responses_not_messages(
    harness: Harness, stream: bool
) -> None:
    """A full response window: POST /v1/responses is 429 (before any SSE), messages go on."""
    limit(harness, WindowLimit(bucket="response", window="day", max_turns=1))
    with trio.fail_after(TIMEOUT):
        await complete_response(harness.client, stream=stream)
        refused = await harness.client.post("/v1/responses", json={"input": "hi", "stream": stream})
        assert_rate_limited(refused, "day")
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        await complete_message(harness.client, sid)
        report = await usage(harness.client)
    assert window(report, "response", "day")["turns"] == 1
    assert window(report, "session_turn", "day")["turns"] == 2
    assert len(harness.model.requests) == 3


async def test_max_tokens_refuses_once_completed_tokens_reach_it(harness: Harness) -> None:
    """max_tokens=10: 5 (completed) + 0 (cancelled) + 5 (completed) reaches it; the
    next message is 429 and nothing more is started or billed."""
    script(harness, DEFAULT_STEP, BLOCK_STEP, DEFAULT_STEP)
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_tokens=2 * TURN_TOKENS))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        middle = await usage(harness.client)
        await cancelled_message(harness, harness.client, sid)
        after_cancel = await usage(harness.client)
        # Under the limit: the cancelled turn added no tokens.
        await complete_message(harness.client, sid)
        assert_rate_limited(await harness.client.post(messages_url(sid), json={"message": "4"}))
        await assert_idle(harness, sid, turns=3)
        report = await usage(harness.client)
    assert window(middle, "session_turn", "hour")["tokens"] == TURN_TOKENS
    assert window(after_cancel, "session_turn", "hour")["tokens"] == TURN_TOKENS
    assert window(after_cancel, "session_turn", "hour")["turns"] == 2
    hour = window(report, "session_turn", "hour")
    assert (hour["turns"], hour["tokens"]) == (3, 2 * TURN_TOKENS)
    assert (hour["max_turns"], hour["max_tokens"], hour["enabled"]) == (None, 10, True)
    assert len(harness.model.requests) == 3
    assert await balance(harness) == START_BALANCE - 2 * TURN_COST


async def test_refused_message_releases_its_idempotency_key(harness: Harness) -> None:
    """A 429 with an Idempotency-Key binds nothing: once the limit is lifted, the same
    key starts a (single) new turn."""
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=1))
    headers = {"Idempotency-Key": "retry-me"}
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        refused = await harness.client.post(
            messages_url(sid), json={"message": "again"}, headers=headers
        )
        assert_rate_limited(refused)
        limit(harness)
        async with harness.client.stream(
            "POST", messages_url(sid), json={"message": "again"}, headers=headers
        ) as r:
            assert r.status_code == 200
            events = parse_sse((await r.aread()).decode())
        async with harness.client.stream(
            "POST", messages_url(sid), json={"message": "again"}, headers=headers
        ) as again:
            replay = parse_sse((await again.aread()).decode())
        await assert_idle(harness, sid, turns=2)
    assert events[-1].event == "message.completed"
    assert again.headers["X-Response-Id"] == r.headers["X-Response-Id"]
    assert [e.id for e in replay] == [e.id for e in events]
    assert len(harness.model.requests) == 2


async def test_refused_message_leaves_the_session_idle_clock(harness: Harness) -> None:
    """A 429 starts no turn, so the session's last_activity stays that of its last turn."""
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=1))
    with trio.fail_after(TIMEOUT):
        sid = await new_session(harness.client)
        await complete_message(harness.client, sid)
        before = (await harness.client.get(f"/v1/sessions/{sid}")).json()
        await trio.sleep(0.01)  # a bump of last_activity would show
        assert_rate_limited(await harness.client.post(messages_url(sid), json={"message": "x"}))
        after = (await harness.client.get(f"/v1/sessions/{sid}")).json()
    assert after["busy"] is False
    assert after["last_activity"] == before["last_activity"]


async def test_concurrent_starts_cannot_both_pass_a_one_turn_window(harness: Harness) -> None:
    """max_turns=1, two sessions posting at once: exactly one 200 and one 429."""
    script(harness, ["block", *DEFAULT_STEP])
    limit(harness, WindowLimit(bucket="session_turn", window="hour", max_turns=1))
    statuses: list[int] = []
    both = trio.Event()

    async def post(sid: str) -> None:
        async with harness.client.stream("POST", messages_url(sid), json={"message": "m"}) as r:
            statuses.append(r.status_code)
            if len(statuses) == 2:
                both.set()
            body = (await r.aread()).decode()
        if r.status_code == 200:
            assert parse_sse(body)[-1].event == "message.completed"

    with trio.fail_after(TIMEOUT):
        sids = [await new_session(harness.client) for _ in range(2)]
        async with trio.open_nursery() as nursery:
            for sid in sids:
                nursery.start_soon(post, sid)
            await both.wait()
            harness.model.gate.set()
        report = await usage(harness.client)
    assert sorted(statuses) == [200, 429]
    assert window(report, "session_turn", "hour")["turns"] == 1
    assert len(report["records"]) == 1


# -- credits ------------------------------------------------------------------


async def test_hard_mode_zero_balance_is_402_everywhere(harness: Harness) -> None:
    """Hard mode at balance 0: messages and /v1/responses (streamed or not) are 402
    out_of_credits; nothing starts, nothing is billed, sessions can still be made."""
    with trio.fail_after(TIMEOUT):
        async with broke_client(harness) as client:
            sid = await new_session(client)
            assert_error(
                await client.post(messages_url(sid), json={"message": "hi"}), 402, "out_of_credits"
            )
            for stream in (True, False):
                refused = await client.post("/v1/responses", json={"input": "hi", "stream": stream})
                assert_error(refused, 402, "out_of_credits")
                assert "Retry-After" not in refused.headers
            state = (await client.get(f"/v1/sessions/{sid}")).json()
            history = (await client.get(messages_url(sid))).json()
            report = await usage(client)
    assert state["busy"] is False
    assert history == []
    assert harness.model.requests == []
    assert report["credits"] == {"enabled": True, "mode": "hard", "balance": 0.0}
    assert report["records"] == []
    for bucket in ("session_turn", "response"):
        assert window(report, bucket, "hour")["turns"] == 0


async def test_hard_mode_refuses_at_min_balance_and_lets_a_last_turn_overdraw(
    harness: Harness,
) -> None:
    """Hard mode starts a turn while balance > min_balance (the turn may overdraw) and
    refuses with 402 at or below it; adding credits lets turns start again."""
    with trio.fail_after(TIMEOUT):
        async with broke_client(harness, credits=5.0) as client:
            sid = await new_session(client)
            await complete_message(client, sid)  # 5 > 0: starts, leaves -2
            assert await balance(harness, BROKE_ACCOUNT) == 5.0 - TURN_COST
            assert_error(
                await client.post(messages_url(sid), json={"message": "x"}), 402, "out_of_credits"
            )
            harness.store.add_credits(BROKE_ACCOUNT, 12.0)  # 10
            harness.store.set_account(BROKE_ACCOUNT, min_balance=10.0)
            assert_error(
                await client.post(messages_url(sid), json={"message": "x"}), 402, "out_of_credits"
            )
            harness.store.set_account(BROKE_ACCOUNT, min_balance=9.5)
            await complete_message(client, sid)
            report = await usage(client)
            history = (await client.get(messages_url(sid))).json()
    assert [entry["status"] for entry in history] == ["completed", "completed"]
    assert report["credits"]["balance"] == 10.0 - TURN_COST
    assert len(report["records"]) == 2


async def test_soft_mode_is_never_refused_and_goes_negative(harness: Harness) -> None:
    """Soft mode at balance 0: messages and responses all run and are billed; the
    balance goes negative and GET /v1/usage says soft."""
    with trio.fail_after(TIMEOUT):
        async with broke_client(harness) as client:
            harness.store.set_account(BROKE_ACCOUNT, mode=CreditMode.SOFT)
            sid = await new_session(client)
            await complete_message(client, sid)
            await complete_message(client, sid)
            await complete_response(client)
            await complete_response(client, stream=False)
            report = await usage(client)
    assert report["credits"] == {"enabled": True, "mode": "soft", "balance": -4.0 * TURN_COST}
    assert await balance(harness, BROKE_ACCOUNT) == -4.0 * TURN_COST
    assert len(report["records"]) == 4
    assert all(r["credits"] == TURN_COST for r in report["records"])


# -- GET /v1/usage ---------------------------------------------------------------


async def test_usage_report_shape_and_numbers(harness: Harness) -> None:
    """GET /v1/usage has exactly DESIGN.md's shape; windows count a cancelled turn as a
    turn with no tokens and show the configured limits; records are newest first."""
    script(harness, DEFAULT_STEP, BLOCK_STEP, DEFAULT_STEP)
    limit(
        harness,
        WindowLimit(bucket="session_turn", window="hour", max_turns=5),
        WindowLimit(bucket="response", window="day", max_turns=7, max_tokens=1000),
    )
    with trio.fail_after(TIMEOUT):
        before = time.time()
        sid = await new_session(harness.client)
        message = await complete_message(harness.client, sid)
        await cancelled_message(harness, harness.client, sid)
        response = await complete_response(harness.client)
        after = time.time()
        report = await usage(harness.client)
        async with harness.client_for(OTHER_KEY) as bob:
            bob_report = await usage(bob)
        async with harness.client_for(None) as anonymous:
            unauthorized = await anonymous.get("/v1/usage")

    assert set(report) == {"rate_limit", "credits", "records"}
    assert set(report["rate_limit"]) == {"caller_id", "buckets"}
    assert report["rate_limit"]["caller_id"] == harness.account
    buckets = report["rate_limit"]["buckets"]
    assert set(buckets) == {"session_turn", "response"}
    for bucket in buckets.values():
        assert set(bucket) == {"windows"}
        assert [w["name"] for w in bucket["windows"]] == ["hour", "day"]
        for w in bucket["windows"]:
            assert set(w) == WINDOW_KEYS
            assert w["duration_seconds"] == DURATIONS[w["name"]]
    assert window(report, "session_turn", "hour") == {
        "name": "hour",
        "duration_seconds": 3600,
        "turns": 2,
        "max_turns": 5,
        "tokens": TURN_TOKENS,
        "max_tokens": None,
        "enabled": True,
    }
    assert window(report, "session_turn", "day") == {
        "name": "day",
        "duration_seconds": 86400,
        "turns": 2,
        "max_turns": None,
        "tokens": TURN_TOKENS,
        "max_tokens": None,
        "enabled": False,
    }
    assert window(report, "response", "hour")["enabled"] is False
    assert (
        window(report, "response", "hour")["turns"],
        window(report, "response", "hour")["tokens"],
    ) == (
        1,
        TURN_TOKENS,
    )
    assert window(report, "response", "day") == {
        "name": "day",
        "duration_seconds": 86400,
        "turns": 1,
        "max_turns": 7,
        "tokens": TURN_TOKENS,
        "max_tokens": 1000,
        "enabled": True,
    }
    assert report["credits"] == {
        "enabled": True,
        "mode": "hard",
        "balance": START_BALANCE - 2 * TURN_COST,
    }
    records = report["records"]
    # Each record has DESIGN.md's fields ("estimated" is an addition of ours).
    assert all(set(r) - {"estimated"} == RECORD_KEYS for r in records)
    assert [r["response_id"] for r in records] == [response, message]
    assert [r["session_id"] for r in records] == [None, sid]
    for r in records:
        assert (r["model"], r["input_tokens"], r["output_tokens"]) == ("fake", 3, 2)
        assert r["credits"] == TURN_COST
        assert before <= r["created_at"] <= after
    assert records[0]["created_at"] >= records[1]["created_at"]

    assert bob_report["rate_limit"]["caller_id"] == harness.other_account
    assert bob_report["records"] == []
    assert all(
        w["turns"] == 0 and not w["enabled"]
        for w in bob_report["rate_limit"]["buckets"]["session_turn"]["windows"]
    )
    assert_error(unauthorized, 401, "unauthorized")
    assert KEY not in str(report)


async def test_usage_limit_parameter(harness: Harness) -> None:
    """GET /v1/usage?limit=N returns the N newest records; a bad limit is 400."""
    with trio.fail_after(TIMEOUT):
        sid = (await harness.client.post("/v1/sessions", json={})).json()["id"]
        for _ in range(3):
            async with harness.client.stream(
                "POST", f"/v1/sessions/{sid}/messages", json={"message": "hi"}
            ) as response:
                await response.aread()
        everything = (await harness.client.get("/v1/usage", params={"limit": 10})).json()
        newest = (await harness.client.get("/v1/usage", params={"limit": 2})).json()
        bad = [
            await harness.client.get("/v1/usage", params={"limit": limit})
            for limit in ("0", "-1", "x", "10001")
        ]
    assert len(everything["records"]) == 3
    assert newest["records"] == everything["records"][:2]
    assert [r.status_code for r in bad] == [400] * 4
    assert {r.json()["error"] for r in bad} == {"invalid_request"}
