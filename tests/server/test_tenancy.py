"""Auth and tenancy (issue 9, point 8), on every route of the app.

* One 401: every ``/v1`` route and method answers the same bytes (status,
  headers but ``Date``, body) for a missing, malformed, unknown or smuggled
  key, whether the ASGI guard or the app's ``before_request`` refuses it.
* Tenancy: account B gets, for each of account A's objects (session, session
  turn, stateless response, files, idempotency keys), the very bytes it gets
  for an id that never existed, on every route; B's lists, bulk delete and
  cancel never see or touch A's objects.
* No secrets: a served process (``agent-runtime serve`` as a subprocess)
  exercised with successful and failing requests of every kind, a forced
  internal error and a forced turn failure, never writes an API key, a key
  hash or a host path (data dir, workspace) in a response or a log line.

The routes come from the app's ``url_map`` at test time: a route missing from
:data:`WAYS` (how to exercise it) fails the tests, so a new route is covered
or noticed. Requests are sent byte for byte over a raw socket (httpx would
refuse or normalize the hostile headers) with ``Connection: close``, and the
answers are compared as bytes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import re
import shutil
import signal
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Final, Literal, TypeVar
from urllib.parse import urlsplit

import attrs
import httpx
import pytest
import trio
from hypercorn.trio import serve

from runtime import (
    MemoryStore,
    ModelChunk,
    ModelRequest,
    Runtime,
    TextChunk,
    ToolCallDelta,
    ToolCallStart,
    UsageChunk,
)
from runtime._sqlite import create_key as store_create_key, database_path, open_database
from runtime._store import hash_key
from server import create_app
from server._asgi import Guard
from server._serve import hypercorn_config

from ..fakes import FakeModel
from .conftest import KEY, OTHER_KEY, SSE, open_harness, parse_sse, read_sse
from .served import MAIN, Served, run_server

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterator,
        Awaitable,
        Callable,
        Iterable,
        Mapping,
    )
    from pathlib import Path

    from quart_trio import QuartTrio
    from werkzeug.routing import Rule

#: Every request (and every whole test) is bounded in real time.
REQUEST_TIMEOUT: Final = 15.0
K = TypeVar("K")
#: Requests in flight at once.
PARALLEL: Final = 8


# -- how to exercise each route ---------------------------------------------------


@attrs.frozen
class Way:
    """How to exercise one endpoint of the app.

    ``scope``: ``public`` routes take no key; ``account`` routes name no object
    (they act on the caller's account); ``object`` routes name objects by id
    and must answer another account's ids as if they did not exist.
    ``rid``: which of A's turns an ``object`` route's ``<rid>`` names.
    """

    scope: Literal["public", "account", "object"]
    body: bytes = b""
    query: str = ""
    rid: Literal["session", "stateless"] | None = None


MESSAGE: Final = json.dumps({"message": "hello"}).encode()
RESPONSE: Final = json.dumps({"input": "hello", "stream": True}).encode()

#: Every endpoint of the app, by name. A test fails if the app has another.
WAYS: Final[Mapping[str, Way]] = {
    "health": Way("public"),
    "create_session": Way("account", body=b"{}"),
    "list_sessions": Way("account"),
    "delete_sessions": Way("account", query="?status=any"),
    "post_response": Way("account", body=RESPONSE),
    "usage": Way("account"),
    "get_session": Way("object"),
    "delete_session": Way("object"),
    "post_message": Way("object", body=MESSAGE),
    "history": Way("object"),
    "get_session_response": Way("object", rid="session"),
    "resume_session": Way("object", rid="session"),
    "cancel_session_turn": Way("object", rid="session"),
    "get_response": Way("object", rid="stateless"),
    "resume_response": Way("object", rid="stateless"),
    "cancel_response": Way("object", rid="stateless"),
    "files.list_root": Way("object"),
    "files.download": Way("object"),
    "files.upload": Way("object", body=b"B was here"),
    "files.delete": Way("object"),
}
_ARG_RE: Final = re.compile(r"<(?:\w+:)?(\w+)>")


@attrs.frozen
class Endpoint:
    rule: str
    name: str
    method: str
    way: Way

    def target(self, values: Mapping[str, str]) -> str:
        """The request target with the rule's arguments filled from ``values``."""
        return _ARG_RE.sub(lambda m: values[m.group(1)], self.rule) + self.way.query


def endpoints(app: QuartTrio) -> list[Endpoint]:
    """Every (rule, method) of ``app``, HEAD and OPTIONS included."""
    rules: list[Rule] = list(app.url_map.iter_rules())
    names = {rule.endpoint for rule in rules}
    assert names <= set(WAYS), f"routes with no way to exercise them: {names - set(WAYS)}"
    assert set(WAYS) <= names, f"WAYS names routes the app does not have: {set(WAYS) - names}"
    return [
        Endpoint(rule.rule, rule.endpoint, method, WAYS[rule.endpoint])
        for rule in rules
        for method in sorted(rule.methods or ())
    ]


# -- raw HTTP ---------------------------------------------------------------------


async def send_raw(
    base_url: str,
    method: str,
    target: str,
    header_lines: Iterable[bytes],
    body: bytes = b"",
    *,
    content_length: int | None = None,
) -> bytes:
    """Send one request byte for byte (``Connection: close``); return every byte
    of the answer. ``content_length`` declares another length than ``body``'s."""
    url = urlsplit(base_url)
    assert url.hostname is not None
    assert url.port is not None
    head = [
        f"{method} {target} HTTP/1.1".encode(),
        f"Host: {url.hostname}:{url.port}".encode(),
        b"Connection: close",
        *header_lines,
    ]
    if body or content_length is not None or method in ("POST", "PUT"):
        head.append(
            b"Content-Length: %d" % (len(body) if content_length is None else content_length)
        )
    with trio.fail_after(REQUEST_TIMEOUT):
        stream = await trio.open_tcp_stream(url.hostname, url.port)
        async with stream:
            await stream.send_all(b"\r\n".join(head) + b"\r\n\r\n" + body)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@attrs.frozen
class Answer:
    """A raw answer without its ``Date`` header (the only byte allowed to differ)."""

    status: int
    head: bytes
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Answer:
        head, sep, body = raw.partition(b"\r\n\r\n")
        assert sep, raw
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
        return cls(int(lines[0].split()[1]), b"\r\n".join(lines), body)

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    def replace(self, old: str, new: str) -> Answer:
        return Answer(
            self.status,
            self.head.replace(old.encode(), new.encode()),
            self.body.replace(old.encode(), new.encode()),
        )


async def request(
    base_url: str,
    method: str,
    target: str,
    header_lines: Iterable[bytes] = (),
    body: bytes = b"",
    *,
    content_length: int | None = None,
) -> Answer:
    raw = await send_raw(
        base_url, method, target, header_lines, body, content_length=content_length
    )
    return Answer.parse(raw)


def bearer(key: str) -> bytes:
    return b"Authorization: Bearer " + key.encode()


async def gather(jobs: Mapping[K, Callable[[], Awaitable[Answer]]]) -> dict[K, Answer]:
    """Run the requests of ``jobs`` (at most :data:`PARALLEL` at once)."""
    results: dict[K, Answer] = {}
    limiter = trio.CapacityLimiter(PARALLEL)

    async def one(name: K, job: Callable[[], Awaitable[Answer]]) -> None:
        async with limiter:
            results[name] = await job()

    async with trio.open_nursery() as nursery:
        for name, job in jobs.items():
            nursery.start_soon(one, name, job)
    return results


# -- one 401 ----------------------------------------------------------------------

#: Ids of the right shape that no store has.
NO_SESSION: Final = "sess_" + "0" * 32
NO_RESPONSE: Final = "msg_" + "0" * 32
FAKE_VALUES: Final = {"sid": NO_SESSION, "rid": NO_RESPONSE, "path": "notes.txt", "filename": "x"}


def refused(key: str) -> dict[str, tuple[list[bytes], int | None]]:
    """Requests that must get the one 401 (``key`` is a valid key): header
    lines, and a Content-Length to declare (None: the body's)."""
    b64 = base64.b64encode(f"{key}:".encode())
    return {
        "no Authorization": ([], None),
        "empty Authorization": ([b"Authorization:"], None),
        "Bearer alone": ([b"Authorization: Bearer"], None),
        "Bearer, empty key": ([b"Authorization: Bearer "], None),
        "Bearer, blank key": ([b"Authorization: Bearer \t  "], None),
        "Basic xxx": ([b"Authorization: Basic xxx"], None),
        "Basic with the valid key": ([b"Authorization: Basic " + b64], None),
        "the valid key, no scheme": ([b"Authorization: " + key.encode()], None),
        "Token scheme, valid key": ([b"Authorization: Token " + key.encode()], None),
        "garbage with spaces": ([bearer("not a key at all, really")], None),
        "unicode garbage": ([b"Authorization: Bearer " + "ключ-🔑-clé\u2028".encode()], None),
        "latin-1 bytes": ([b"Authorization: Bearer \xff\xfe\xe9t\xe9"], None),
        "8 KiB key": ([bearer("k" * 8192)], None),
        "OpenAI-style key": ([bearer("sk-proj-" + "A1b2" * 12)], None),
        "JWT": ([bearer("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl")], None),
        "unknown pk_ key": ([bearer("pk_test_mallory")], None),
        "lowercase bearer, unknown key": ([b"authorization: bearer pk_test_mallory"], None),
        "valid key minus a char": ([bearer(key[:-1])], None),
        "valid key plus a char": ([bearer(key + "x")], None),
        "valid key, then junk": ([bearer(key + " junk")], None),
        "valid key, comma list": ([bearer(key + ", Bearer pk_test_mallory")], None),
        "valid key, tab for space": ([b"Authorization: Bearer\t" + key.encode()], None),
        "valid key, NBSP-padded": ([b"Authorization: Bearer \xa0" + key.encode()], None),
        "valid key in X-API-Key": ([b"X-API-Key: " + key.encode()], None),
        "two Authorization, junk first": (
            [bearer("pk_test_mallory"), bearer(key)],
            None,
        ),
        "two Authorization, key first": (
            [bearer(key), bearer("pk_test_mallory")],
            None,
        ),
        "no key, 100 MB body declared": ([], 100_000_000),
    }


#: The cases sent to every route (all of them go to one route per method).
EVERY_ROUTE: Final = (
    "no Authorization",
    "Basic xxx",
    "8 KiB key",
    "unknown pk_ key",
    "two Authorization, key first",
)

#: What h11 refuses before any app sees it (400). (A folded line it unfolds,
#: as RFC 9112 5.2 allows: 'Bearer\r\n KEY' is 'Bearer KEY'.)
MALFORMED: Final = {
    "CR in the value": b"Authorization: Bearer x\rX-Injected: 1",
    "NUL in the value": b"Authorization: Bearer pk_test\x00_alice",
}


@asynccontextmanager
async def serving(app: QuartTrio) -> AsyncIterator[str]:
    """``app`` on hypercorn at a free loopback port; its base URL."""
    async with trio.open_nursery() as nursery:
        config = hypercorn_config("127.0.0.1", 0)
        binds = await nursery.start(
            partial(serve, app, config, shutdown_trigger=trio.sleep_forever)
        )
        yield binds[0]
        nursery.cancel_scope.cancel()


async def test_every_v1_route_answers_one_identical_401(tmp_path: Path) -> None:
    """Every /v1 route and method, for every refused key, answers the same
    bytes; so does the app's own ``before_request`` when it is the one that
    refuses (the guard's check removed). A valid key passes everywhere, with
    the scheme in any case; /health and unknown paths need no key."""
    store = MemoryStore()
    store.ensure_account_for_key(KEY)
    async with Runtime.open(data_dir=tmp_path, model=FakeModel(), store=store) as rt:
        app = create_app(rt)
        by_app = create_app(rt)  # the guard lets everything through; the app refuses
        assert isinstance(by_app.asgi_app, Guard)
        by_app.asgi_app.authenticate = None
        routes = [e for e in endpoints(app) if e.rule.startswith("/v1")]
        assert len(routes) >= 40, routes
        cases = refused(KEY)
        async with serving(app) as url, serving(by_app) as app_url:
            canonical = await request(url, "GET", "/v1/sessions")
            jobs: dict[tuple[str, str, str, str], Callable[[], Awaitable[Answer]]] = {}
            # Every case on one route per method; the usual ones on every route.
            firsts = [
                e
                for e in {e.method: e for e in reversed(routes)}.values()
                if e.method not in ("HEAD", "OPTIONS")
            ]
            for e in routes:
                target = e.target(FAKE_VALUES)
                every = e in firsts
                for case, (lines, length) in cases.items():
                    if every or case in EVERY_ROUTE:
                        jobs[("guard", e.name, e.method, case)] = partial(
                            request, url, e.method, target, lines, e.way.body, content_length=length
                        )
                # The app's before_request refuses what the guard would.
                for case in ("no Authorization", "Basic xxx", "unknown pk_ key", "8 KiB key"):
                    if every or case == "no Authorization":
                        lines, _ = cases[case]
                        jobs[("app", e.name, e.method, case)] = partial(
                            request, app_url, e.method, target, lines, e.way.body
                        )
                for case, line in {
                    "Bearer": bearer(KEY),
                    "bearer": b"Authorization: bearer " + KEY.encode(),
                    "BEARER": b"Authorization: BEARER " + KEY.encode(),
                }.items():
                    if every or case == "Bearer":
                        jobs[("valid", e.name, e.method, case)] = partial(
                            request, url, e.method, target, [line], e.way.body
                        )
            for case, line in MALFORMED.items():
                jobs[("malformed", "list_sessions", "GET", case)] = partial(
                    request, url, "GET", "/v1/sessions", [line]
                )
            for case, target in {
                "/health": "/health",
                "an unknown path": "/nowhere",
                "encoded /v1": "/%76%31/sessions",
                "static": "/static/../../etc/passwd",
            }.items():
                jobs[("open", "", "GET", case)] = partial(
                    request, url, "GET", target, [bearer("pk_test_mallory")]
                )
            answers = await gather(jobs)

    assert canonical.status == 401
    assert canonical.header(b"www-authenticate") == b"Bearer"
    assert json.loads(canonical.body)["error"] == "unauthorized"
    wrong = {}
    for (layer, name, method, case), answer in answers.items():
        if layer in ("guard", "app"):
            expected = attrs.evolve(canonical, body=b"") if method == "HEAD" else canonical
            if answer != expected:
                wrong[(layer, name, method, case)] = answer
    assert not wrong, f"{len(wrong)} of the 401s differ, e.g. {next(iter(wrong.items()))}"
    passed = {k: a.status for k, a in answers.items() if k[0] == "valid"}
    assert 401 not in passed.values(), [k for k, s in passed.items() if s == 401]
    assert not [s for s in passed.values() if s >= 500], passed
    malformed = {k[3]: a.status for k, a in answers.items() if k[0] == "malformed"}
    assert malformed == dict.fromkeys(MALFORMED, 400)
    opened = {k[3]: a.status for k, a in answers.items() if k[0] == "open"}
    assert opened == {"/health": 200, "an unknown path": 404, "encoded /v1": 401, "static": 404}


# -- tenancy ----------------------------------------------------------------------


def other_id(object_id: str) -> str:
    """An id of the same shape that names nothing: its last digit changed."""
    return object_id[:-1] + ("1" if object_id[-1] == "0" else "0")


async def sse_types(client: httpx.AsyncClient, path: str) -> list[str]:
    """The event types of the stream at ``path``, read to its end."""
    async with client.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        return [event.event for event in await read_sse(response)]


async def test_another_accounts_objects_answer_as_if_they_never_existed(tmp_path: Path) -> None:
    """A has a session with a file and a running turn, a stateless response,
    and idempotency keys. On every object route and method, B's request for
    A's ids is answered with the bytes of a request for ids that never
    existed (ids swapped back), while A's turns run and after they end. B's
    list, usage, bulk delete, cancel and idempotency keys never see or touch
    A's objects: A's turns complete and A's file is intact."""
    model = FakeModel(steps=[[TextChunk("hello "), "block", TextChunk("world"), UsageChunk(3, 2)]])
    async with open_harness(tmp_path, model) as h:
        a, url = h.client, h.base_url
        routes = [e for e in endpoints(create_app(h.rt)) if e.way.scope == "object"]
        sid = (await a.post("/v1/sessions", json={"persistent": True})).json()["id"]
        assert (
            await a.put(f"/v1/sessions/{sid}/files/notes.txt", content=b"A's")
        ).status_code == 201
        idem = {"Idempotency-Key": "idem-A-session"}
        idem_stateless = {"Idempotency-Key": "idem-A-stateless"}
        async with a.stream(
            "POST", f"/v1/sessions/{sid}/messages", content=MESSAGE, headers=idem
        ) as response:
            rid = response.headers["X-Response-Id"]
        async with a.stream(
            "POST", "/v1/responses", content=RESPONSE, headers=idem_stateless
        ) as response:
            srid = response.headers["X-Response-Id"]
        async with h.client_for(OTHER_KEY) as b:
            bsid = (await b.post("/v1/sessions")).json()["id"]
            mine = [sid, rid, srid]

            async def compare(phase: str) -> dict[tuple[str, ...], tuple[Answer, Answer]]:
                """B's answers for A's ids and for ids that never existed."""
                jobs: dict[tuple[str, ...], Callable[[], Awaitable[Answer]]] = {}
                lines = [bearer(OTHER_KEY), b"Idempotency-Key: idem-A-session"]
                for e in routes:
                    rids = {"session": [rid], "stateless": [srid, rid], None: [""]}[e.way.rid]
                    for sid_, rid_ in [(sid, r) for r in rids] + (
                        [(bsid, rid)] if e.way.rid == "session" else []
                    ):
                        values = {"sid": sid_, "rid": rid_, "path": "notes.txt"}
                        fake = {k: other_id(v) if v in mine else v for k, v in values.items()}
                        for ids, which in ((values, "A's"), (fake, "none")):
                            jobs[(phase, e.name, e.method, sid_, rid_, which)] = partial(
                                request, url, e.method, e.target(ids), lines, e.way.body
                            )
                answers = await gather(jobs)
                return {
                    k[:-1]: (answers[(*k[:-1], "A's")], answers[(*k[:-1], "none")])
                    for k in answers
                    if k[-1] == "none"
                }

            running = await compare("running")
            # B's account-wide routes: nothing of A's.
            listed = (await b.get("/v1/sessions")).json()
            assert [s["id"] for s in listed] == [bsid]
            usage = (await b.get("/v1/usage")).text
            assert not [x for x in mine if x in usage], usage
            # B's idempotency keys are B's: the same key and body start B's own turns.
            async with b.stream(
                "POST", "/v1/responses", content=RESPONSE, headers=idem_stateless
            ) as r:
                assert r.status_code == 200
                b_srid = r.headers["X-Response-Id"]
            async with b.stream(
                "POST", f"/v1/sessions/{bsid}/messages", content=MESSAGE, headers=idem
            ) as r:
                assert r.status_code == 200
                b_rid = r.headers["X-Response-Id"]
            assert {b_srid, b_rid}.isdisjoint(mine)
            # A's turns were never cancelled: they complete once the model goes on.
            model.gate.set()
            with trio.fail_after(REQUEST_TIMEOUT):
                session_events = await sse_types(a, f"/v1/sessions/{sid}/responses/{rid}/events")
                stateless_events = await sse_types(a, f"/v1/responses/{srid}/events")
            assert session_events[-1] == "message.completed", session_events
            assert stateless_events[-1] == "response.completed", stateless_events
            ended = await compare("ended")
            # B's bulk delete deletes B's session only.
            deleted = await b.request("DELETE", "/v1/sessions", params={"status": "any"})
            assert deleted.json() == {"deleted": 1}
        assert (await a.get(f"/v1/sessions/{sid}")).json()["status"] == "ready"
        assert (await a.get(f"/v1/sessions/{sid}/files/notes.txt")).content == b"A's"
        history = (await a.get(f"/v1/sessions/{sid}/messages")).json()
        assert [(m["id"], m["status"]) for m in history] == [(rid, "completed")]
        assert (await a.get(f"/v1/responses/{srid}")).json()["status"] == "completed"
        billed = [r["response_id"] for r in (await a.get("/v1/usage")).json()["records"]]
        assert sorted(billed) == sorted([rid, srid])

    leaks = {}
    for key, (theirs, none) in {**running, **ended}.items():
        swapped = theirs
        for object_id in mine:
            swapped = swapped.replace(object_id, other_id(object_id))
        if swapped != none or none.status != (200 if key[2] == "OPTIONS" else 404):
            leaks[key] = (theirs, none)
    assert not leaks, f"{len(leaks)} answers leak, e.g. {next(iter(leaks.items()))}"
    assert len(running) == len(ended) >= 40


# -- no secrets in answers or logs ----------------------------------------------------

#: Installed before ``main`` in the served process: a bug in a route (``GET
#: /v1/usage?limit=7`` raises an OSError naming a file of the data dir, as a
#: full disk would), and a bug in the model (a message saying ``explode``).
FORCED_ERRORS: Final = """
import errno, os, sys
import server._app
from runtime._demo import DemoModel

_DB = os.path.join(os.path.abspath(sys.argv[sys.argv.index("--data-dir") + 1]), "agent-runtime.db")
_usage_report = server._app.usage_report

async def usage_report(store, account_id, *, limit):
    if limit == 7:
        raise OSError(errno.ENOSPC, "No space left on device", _DB)
    return await _usage_report(store, account_id, limit=limit)

server._app.usage_report = usage_report
_stream = DemoModel.stream

async def stream(self, request):
    if "explode" in request.messages[-1].content:
        raise RuntimeError("forced model failure")
    async for chunk in _stream(self, request):
        yield chunk

DemoModel.stream = stream
"""
#: The forced route bug's exception, logged with the data dir redacted.
FORCED_500_LINE: Final = re.compile(
    r"^OSError: \[Errno 28\] No space left on device: '\$DATA_DIR/agent-runtime.db'$", re.M
)


def key_forms(key: str) -> list[str]:
    """A key and the forms of its SHA-256 (``hash_key``) a leak could take."""
    digest = hashlib.sha256(key.encode()).digest()
    return [
        key,
        digest.hex(),
        digest.hex().upper(),
        base64.b64encode(digest).decode(),
        base64.urlsafe_b64encode(digest).decode().rstrip("="),
    ]


@attrs.define
class Recorder:
    """Every answer a test got: status line, headers and body, as bytes."""

    seen: list[bytes] = attrs.field(factory=list)

    def add(self, response: httpx.Response) -> httpx.Response:
        head = b"".join(name + b": " + value + b"\n" for name, value in response.headers.raw)
        self.seen.append(b"%d\n" % response.status_code + head + b"\n" + response.content)
        return response

    def add_raw(self, raw: bytes) -> bytes:
        self.seen.append(raw)
        return raw


TURN_TIMEOUT: Final = 30.0
#: Shell commands are tried only in the sandbox: without it a tool sees the
#: host's file system, and ``pwd`` prints the workspace's host path.
SANDBOXED: Final = shutil.which("bwrap") is not None
GENERATED: Final = re.compile(r"API key \(shown once, stored only as a hash\): (\S+)\n")


async def exercise(
    url: str, key: str, other_key: str, rec: Recorder, *, sandboxed: bool
) -> dict[str, list[SSE]]:
    """Successful and failing requests of every kind with ``key`` (and some
    with ``other_key``, an account with no credits); return the events of
    the turns, by name. ``sandboxed``: also run shell commands (the
    sandbox shows the workspace at /opt/sandbox/workspace)."""
    headers = {"Authorization": f"Bearer {key}"}
    turns: dict[str, list[SSE]] = {}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=TURN_TIMEOUT) as a,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {other_key}"}, timeout=TURN_TIMEOUT
        ) as b,
    ):

        async def call(
            client: httpx.AsyncClient, method: str, path: str, status: int, **kwargs: object
        ) -> httpx.Response:
            response = rec.add(await client.request(method, path, **kwargs))  # type: ignore[arg-type]
            assert response.status_code == status, (method, path, response.text)
            return response

        async def turn(name: str, path: str, body: object, **kwargs: object) -> str:
            response = await call(a, "POST", path, 200, json=body, **kwargs)
            turns[name] = parse_sse(response.text)
            return response.headers["X-Response-Id"]

        await call(a, "GET", "/health", 200)
        sid = (await call(a, "POST", "/v1/sessions", 201, json={"persistent": True})).json()["id"]
        files = f"/v1/sessions/{sid}/files"
        await call(a, "PUT", f"{files}/notes.txt", 201, content=b"0123456789")
        await call(a, "PUT", f"{files}/dir/inner.txt", 201, content=b"x")
        await call(a, "GET", f"{files}/notes.txt", 206, headers={"Range": "bytes=2-4"})
        await call(a, "GET", f"{files}/notes.txt", 416, headers={"Range": "bytes=50-60"})
        await call(a, "GET", files, 200)
        await call(a, "GET", f"{files}/dir", 200)
        await call(a, "GET", f"{files}/missing.txt", 404)
        await call(a, "GET", f"{files}/notes.txt/below", 404)
        await call(a, "DELETE", f"{files}/dir", 400)
        await call(a, "DELETE", f"{files}/dir/inner.txt", 204)
        for target in ("../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "a%00b"):
            raw = await send_raw(url, "GET", f"{files}/{target}", [bearer(key)])
            assert Answer.parse(rec.add_raw(raw)).status in (403, 404), raw
        message = f"/v1/sessions/{sid}/messages"
        tools = "\n".join(
            [
                "write notes.txt: hello",
                'call read_file: {"path": "missing.txt"}',
                'call read_file: {"path": "/etc/passwd"}',
                'call read_file: {"path": "../../agent-runtime.db"}',
                'call list_files: {"path": "/opt/sandbox/workspace/dir"}',
                'call write_file: {"path": "notes.txt/x", "content": ""}',
                'call list_files: {"path": 7}',
            ]
        )
        rid = await turn("tools", message, {"message": tools}, headers={"Idempotency-Key": "k1"})
        await turn("tools, retried", message, {"message": tools}, headers={"Idempotency-Key": "k1"})
        await call(
            a, "POST", message, 422, json={"message": "other"}, headers={"Idempotency-Key": "k1"}
        )
        await turn("explode", message, {"message": "explode"})
        if sandboxed:
            shell = 'run: pwd; echo "$HOME $WORKSPACE"; cd .. && pwd; cat /nowhere/x; ls notes.txt'
            await turn("shell", message, {"message": shell})
        await call(a, "GET", message, 200)
        await call(a, "GET", f"/v1/sessions/{sid}/responses/{rid}", 200)
        await call(
            a,
            "GET",
            f"/v1/sessions/{sid}/responses/{rid}/events",
            200,
            headers={"Last-Event-ID": "3"},
        )
        await call(
            a,
            "GET",
            f"/v1/sessions/{sid}/responses/{rid}/events",
            400,
            headers={"Last-Event-ID": "x"},
        )
        await call(a, "POST", f"/v1/sessions/{sid}/responses/{rid}/cancel", 200)
        # A long turn: 409 for another message meanwhile, then cancelled.
        async with a.stream("POST", message, json={"message": "a 100000-word essay"}) as long:
            long_rid = long.headers["X-Response-Id"]
            await call(a, "POST", message, 409, json={"message": "again"})
            await call(a, "POST", f"/v1/sessions/{sid}/responses/{long_rid}/cancel", 202)
            await long.aread()
            rec.add(long)
        srid = (
            await call(
                a, "POST", "/v1/responses", 200, json={"input": "hi", "max_output_tokens": 3}
            )
        ).json()["id"]
        await call(a, "GET", f"/v1/responses/{srid}", 200)
        await call(a, "GET", f"/v1/responses/{srid}/events", 200)
        await call(a, "POST", f"/v1/responses/{srid}/cancel", 200)
        await turn("stateless explode", "/v1/responses", {"input": "explode", "stream": True})
        await call(a, "POST", "/v1/responses", 400, json={"input": ""})
        await call(a, "POST", "/v1/sessions", 400, content=b"{")
        raw = await send_raw(url, "POST", "/v1/sessions", [bearer(key)], content_length=1 << 30)
        assert Answer.parse(rec.add_raw(raw)).status == 413, raw
        await call(a, "PATCH", "/v1/sessions", 405)
        await call(a, "GET", "/v1/nowhere", 404)
        await call(a, "GET", "/v1/usage", 200)
        await call(a, "GET", "/v1/usage?limit=0", 400)
        await call(a, "GET", "/v1/usage?limit=7", 500)  # the forced bug
        # The other account: not A's objects, no credits, its own usage.
        await call(b, "GET", f"/v1/sessions/{sid}", 404)
        await call(b, "GET", f"{files}/notes.txt", 404)
        await call(b, "POST", f"/v1/sessions/{sid}/responses/{rid}/cancel", 404)
        bsid = (await call(b, "POST", "/v1/sessions", 201)).json()["id"]
        await call(b, "POST", f"/v1/sessions/{bsid}/messages", 402, json={"message": "hi"})
        await call(b, "GET", "/v1/usage", 200)
        for lines, _ in refused(key).values():
            rec.add_raw(await send_raw(url, "GET", "/v1/sessions", lines))
        await call(a, "DELETE", f"/v1/sessions/{sid}", 204)
    return turns


async def test_no_key_hash_or_host_path_in_any_answer_or_log_line(tmp_path: Path) -> None:
    """``serve`` with a generated key, then with ``--api-key`` and a key from
    ``keys create``: every answer (headers and bodies, tool results and turn
    errors included) and every line the server printed (its HTTP error log
    too) is free of keys, key hashes and host paths; the generated key is
    printed once, on its own line."""
    data_dir = tmp_path / "data"
    rec = Recorder()
    first_log: list[str] = []

    async def with_a_generated_key() -> None:
        # Its own data dir (with no key): run beside the other server.
        async with run_server(tmp_path / "first", api_key=None) as first:
            match = GENERATED.search(first.output[0])
            assert match is not None, first.output
            async with httpx.AsyncClient(base_url=first.url, timeout=TURN_TIMEOUT) as client:
                for key, status in ((match.group(1), 200), ("pk_nobody", 401)):
                    auth = {"Authorization": f"Bearer {key}"}
                    response = rec.add(await client.get("/v1/sessions", headers=auth))
                    assert response.status_code == status
            await stop(first)
        first_log.append(first.output[-1])

    key1 = "pk_tenancy_" + "q7" * 16
    async with trio.open_nursery() as nursery:
        nursery.start_soon(with_a_generated_key)
        # What 'keys create' does (a new interpreter costs a second): a key
        # whose account has no credits.
        other_key = await trio.to_thread.run_sync(create_key, data_dir)
        async with run_server(
            tmp_path,
            "--demo-tokens-per-second",
            "1000",
            *(["--sandbox", "bwrap"] if SANDBOXED else []),
            api_key=key1,
            expect_key=False,
            code=FORCED_ERRORS + MAIN,
        ) as second:
            turns = await exercise(second.url, key1, other_key, rec, sandboxed=SANDBOXED)
            await stop(second)
    match = GENERATED.search(first_log[0])
    assert match is not None, first_log
    key0 = match.group(1)
    # The generated key: printed once, alone on its line, by design (DESIGN.md).
    assert first_log[0].count(key0) == 1
    logs = first_log[0].replace(match.group(0), "") + second.output[-1]
    secrets = [form for key in (key0, key1, other_key) for form in key_forms(key)]
    host_paths = {str(tmp_path), str(data_dir.resolve()), "/workspaces/"}
    # The forced 500's OSError names the database file: the log has it as $DATA_DIR.
    assert len(FORCED_500_LINE.findall(logs)) == 1, logs
    answers = b"\n".join(rec.seen).decode("utf-8", errors="replace")
    found = {
        where: [s for s in [*secrets, *host_paths] if s in text]
        for where, text in (("answers", answers), ("log", logs))
    }
    assert found == {"answers": [], "log": []}, found
    assert "Traceback" not in answers
    # Tracebacks in the log: the forced bugs', nothing else.
    assert logs.count("Traceback (most recent call last)") == 3, logs
    assert logs.count("[ERROR] server._app: unhandled error") == 1, logs
    assert len(re.findall(r"turn (?:msg|resp)_[0-9a-f]{32} failed\n", logs)) == 2, logs
    # What the turns were (so the answers above held what they should).
    ends = {name: events[-1].event for name, events in turns.items()}
    assert ends == {
        "tools": "message.completed",
        "tools, retried": "message.completed",
        "explode": "message.error",
        "stateless explode": "response.failed",
        **({"shell": "message.completed"} if SANDBOXED else {}),
    }
    if SANDBOXED:
        [result] = [e.data for e in turns["shell"] if e.event == "tool_result"]
        assert result["content"].startswith(
            "/opt/sandbox/workspace\n/opt/sandbox/workspace /opt/sandbox/workspace\n/opt/sandbox\n"
        ), result


def create_key(data_dir: Path) -> str:
    """A key made as ``agent-runtime keys create --credits 0`` makes it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = open_database(database_path(data_dir))
    try:
        conn.execute("BEGIN IMMEDIATE")
        key, _ = store_create_key(conn, credits=0.0)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return key


async def stop(served: Served) -> None:
    """SIGTERM (the drain prints too), then wait for the exit."""
    served.process.send_signal(signal.SIGTERM)
    with trio.fail_after(TURN_TIMEOUT):
        await served.process.wait()


# -- known leaks (files this test's author does not own) ------------------------------


@attrs.define
class FullDisk:
    """A model whose every step fails as a full disk would: an OSError naming
    a file of the data dir."""

    path: str
    name: str = "fake"

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelChunk, None]:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.ENOSPC, "No space left on device", self.path)
        yield TextChunk("")  # pragma: no cover (makes this an async generator)


async def test_a_failed_turn_names_no_host_path(tmp_path: Path) -> None:
    """A turn that fails on an unexpected exception says so without its text:
    an OSError's file name is a host path (the 500 handler hides it too)."""
    secret = str(tmp_path / "agent-runtime.db")
    async with open_harness(tmp_path, FullDisk(secret)) as h:  # type: ignore[arg-type]
        sid = (await h.client.post("/v1/sessions")).json()["id"]
        posted = await h.client.post(f"/v1/sessions/{sid}/messages", json={"message": "hi"})
        stateless = await h.client.post("/v1/responses", json={"input": "hi"})
        history = await h.client.get(f"/v1/sessions/{sid}/messages")
    assert parse_sse(posted.text)[-1].event == "message.error"
    assert stateless.json()["status"] == "failed"
    for answer in (posted, stateless, history):
        assert str(tmp_path) not in answer.text


async def test_an_account_id_is_not_its_keys_hash(tmp_path: Path) -> None:
    """The account id a client sees (``caller_id`` of /v1/usage, 'keys list')
    holds no part of its key's hash, which would let anyone who sees it test
    guesses of a short ``--api-key`` offline."""
    async with open_harness(tmp_path, FakeModel()) as h:
        caller = (await h.client.get("/v1/usage")).json()["rate_limit"]["caller_id"]
    digest = hash_key(KEY).hex()
    assert not any(digest[i : i + 8] in caller for i in range(len(digest) - 8)), caller


@pytest.mark.skipif(not SANDBOXED, reason="bubblewrap is not installed")
async def test_a_sandboxed_shell_cannot_read_host_paths_from_proc(tmp_path: Path) -> None:
    """In the sandbox, the processes a tool can see show no host path (bwrap
    reads its options from a memfd). /proc/self/mountinfo still names the
    workspace's host directory: that is inherent to a bind mount."""
    command = json.dumps({"command": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"})
    model = FakeModel(
        steps=[
            [
                ToolCallStart("call_0", "run_shell"),
                ToolCallDelta("call_0", command),
                UsageChunk(1, 1),
            ],
            [TextChunk("done"), UsageChunk(1, 1)],
        ]
    )
    async with open_harness(tmp_path, model) as h:
        sid = (await h.client.post("/v1/sessions")).json()["id"]
        posted = await h.client.post(f"/v1/sessions/{sid}/messages", json={"message": "go"})
    [result] = [e.data["content"] for e in parse_sse(posted.text) if e.event == "tool_result"]
    assert "/bin/sh -c cat /proc/" in result  # the shell's own command line is there
    assert str(tmp_path) not in result, result
