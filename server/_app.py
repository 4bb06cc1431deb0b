"""``create_app(runtime)``: the HTTP API of DESIGN.md on quart-trio.

Routes only translate: HTTP in, runtime calls, JSON or SSE out. Turns,
buffers, billing and cancellation live in ``runtime``; errors come from it
with their status and are mapped in one handler.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from runtime import (
    AgentRuntimeError,
    InvalidRequest,
    NotFound,
    RateLimited,
    Replayed,
    ResponseSnapshot,
    Runtime,
    ShuttingDown,
    Turn,
    Unauthorized,
    fingerprint,
    usage_report,
)

from ._asgi import Guard
from ._codec import (
    entry_json,
    error_json,
    json_response,
    session_json,
    sse_frame,
    turn_json,
    usage_report_json,
)
from ._files import files_blueprint
from ._openai_wire import parse_request, response_object

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from runtime import TurnRecord

JSON_LIMIT: Final = 1024 * 1024
FILE_LIMIT: Final = 64 * 1024 * 1024
PING_INTERVAL: Final = 15.0
#: Most events in one SSE write. A reader far behind (a resume from the start
#: of a long turn) gets its backlog in writes of this many events, so a client
#: that stops reading pins one write (~35 KB; h11 frames a copy of it) in the
#: server's memory, not the rest of the turn at once (the turn's buffer holds
#: the events already; 20 readers stalled at the start of a 30,000-event turn
#: cost 190 MB when the whole backlog went in one write).
MAX_EVENTS_PER_WRITE: Final = 256
#: Under load SSE writes are coalesced: once the event loop wakes a timer
#: ``FLUSH_LAG`` late (smoothed), each stream writes at most once per tick of
#: ``FLUSH_INTERVAL``, so a 20-token/s stream sends ~2 deltas per write
#: instead of 1, at most ``FLUSH_INTERVAL`` later (issue 9 allows coalescing
#: under load; its delivery-lag target is 250 ms p99). Unloaded, every event
#: is written as soon as it exists.
FLUSH_INTERVAL: Final = 0.1
FLUSH_LAG: Final = 0.01
#: Retry-After (seconds) of a 503: the turn was not admitted, a retry is safe.
RETRY_AFTER_UNAVAILABLE: Final = 1
#: Most usage records one ``GET /v1/usage?limit=N`` returns.
MAX_USAGE_RECORDS: Final = 10_000
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smh])")
REPLAYED_NOTE: Final = (
    "this idempotency key's turn has ended and its events are no longer buffered; "
    "'response' is its final state (also at GET /v1/sessions/{sid}/responses/{rid} "
    "or /v1/responses/{rid}); use a new key for a new turn"
)


def create_app(
    runtime: Runtime,
    *,
    json_limit: int = JSON_LIMIT,
    file_limit: int = FILE_LIMIT,
    ping_interval: float = PING_INTERVAL,
) -> QuartTrio:
    """Build the app. The runtime must outlive it (open the runtime first).

    Args:
      runtime: what every route calls.
      json_limit: largest JSON request body, bytes (413 beyond).
      file_limit: largest file upload (``PUT …/files/…``), bytes.
      ping_interval: seconds between ``: ping`` comments on an idle stream.
    """
    app = QuartTrio(__name__, static_folder=None)  # no /static route
    # Never merge '//' into a 308 redirect: 'files//etc/passwd' must be refused
    # (403), not redirected to 'files/etc/passwd'.
    app.url_map.merge_slashes = False
    app.config["RESPONSE_TIMEOUT"] = None  # streams are unbounded; see STACK-NOTES 2
    app.config["MAX_CONTENT_LENGTH"] = None  # the Guard enforces the body limits
    # The pinger below sleeps forever: cancel it at once when serving stops.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    app.asgi_app = Guard(  # type: ignore[method-assign]
        app.asgi_app,
        json_limit=json_limit,
        file_limit=file_limit,
        authenticate=runtime.store.authenticate,
        closing=lambda: runtime.closing,
    )
    rt = runtime
    flush = FlushTicker()

    @app.before_serving
    async def start_pinger() -> None:
        async def pinger() -> None:
            # One ticker for every open stream: idle readers wake and send
            # ': ping' (at most ``ping_interval`` apart), instead of one
            # timeout scope per event per stream.
            while True:
                await trio.sleep(ping_interval)
                rt.nudge_readers()

        app.add_background_task(pinger)
        app.add_background_task(flush.run)

    @app.before_request
    async def authenticate() -> None:
        if not request.path.startswith("/v1/") and request.path != "/v1":
            return
        if rt.closing:
            raise ShuttingDown("the server is shutting down")
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key; send 'Authorization: Bearer KEY'")
        g.account_id = await rt.store.authenticate(key.strip())

    @app.errorhandler(AgentRuntimeError)
    async def runtime_error(exc: AgentRuntimeError) -> Response:
        response = json_response(error_json(exc), exc.status_hint)
        if exc.status_hint == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(math.ceil(exc.retry_after))
        elif exc.status_hint == 503:
            # Not admitted (store failing, server draining): safe to retry.
            response.headers["Retry-After"] = str(RETRY_AFTER_UNAVAILABLE)
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        name = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        response = json_response({"error": name, "message": exc.description or name}, status)
        for header, value in exc.get_headers():
            if header.lower() != "content-type":
                response.headers[header] = value  # e.g. Allow on a 405
        return response

    @app.errorhandler(Exception)
    async def bug(exc: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=exc)
        return json_response({"error": "internal_error", "message": "internal server error"}, 500)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    # -- sessions -----------------------------------------------------------

    @app.post("/v1/sessions")
    async def create_session() -> tuple[Response, int]:
        body = await json_body(optional=True)
        persistent = field(body, "persistent", bool, False)
        metadata = field(body, "metadata", dict, None)
        model = field(body, "model", str, None)
        kwargs: dict[str, Any] = {}
        if "ttl" in body:
            kwargs["ttl"] = field(body, "ttl", (int, float), None)
        session = await rt.create_session(
            persistent=persistent,
            metadata=metadata,
            model=model,
            account_id=g.account_id,
            **kwargs,
        )
        return json_response(session_json(session)), 201

    @app.get("/v1/sessions")
    async def list_sessions() -> Response:
        return json_response([session_json(s) for s in rt.sessions(account_id=g.account_id)])

    @app.get("/v1/sessions/<sid>")
    async def get_session(sid: str) -> Response:
        return json_response(session_json(rt.get_session(sid, account_id=g.account_id)))

    @app.delete("/v1/sessions/<sid>")
    async def delete_session(sid: str) -> tuple[str, int]:
        await rt.delete_session(sid, account_id=g.account_id)
        flush.release()
        return "", 204

    @app.delete("/v1/sessions")
    async def delete_sessions() -> Response:
        status = request.args.get("status", "any")
        if status not in ("idle", "any"):
            raise InvalidRequest(f"status must be 'idle' or 'any', not {status!r}")
        older_than = request.args.get("older_than")
        if older_than is None and "status" not in request.args:
            raise InvalidRequest(
                "bulk delete needs a filter: ?status=idle and/or ?older_than=1h30m"
            )
        deleted = await rt.delete_sessions(
            account_id=g.account_id,
            idle_only=status == "idle",
            older_than=parse_duration(older_than) if older_than is not None else 0.0,
        )
        return json_response({"deleted": deleted})

    # -- turns --------------------------------------------------------------

    @app.post("/v1/sessions/<sid>/messages")
    async def post_message(sid: str) -> Response:
        session = rt.get_session(sid, account_id=g.account_id)
        body = await json_body()
        message = field(body, "message", str, None)
        if message is None:
            raise InvalidRequest("'message' (a string) is required")
        return await start_stream(body, lambda: session.send(message))

    @app.post("/v1/responses")
    async def post_response() -> Response:
        body = await json_body()
        req = parse_request(body)
        if req.model is not None and req.model != rt.model.name:
            raise InvalidRequest(
                f"unknown model {req.model!r}; this server serves {rt.model.name!r}"
            )
        account_id = g.account_id

        async def start() -> Turn:
            return await rt.respond(
                req.messages,
                tools=req.tools,
                instructions=req.instructions,
                max_output_tokens=req.max_output_tokens,
                tool_choice=req.tool_choice,
                metadata=req.metadata,
                account_id=account_id,
            )

        if req.stream:
            return await start_stream(body, start)
        # Not streamed: wait for the end and answer the Response object. The
        # turn belongs to the runtime: a client that goes away does not stop
        # it, and it stays retrievable (and cancellable) by id meanwhile.
        result = await start_turn(body, start)
        if isinstance(result, Replayed):
            return await replayed(result)
        await result.wait_finished()
        response = json_response(response_object(result.response_snapshot()))
        response.headers["X-Response-Id"] = result.id
        return response

    @app.get("/v1/sessions/<sid>/messages")
    async def history(sid: str) -> Response:
        session = rt.get_session(sid, account_id=g.account_id)
        return json_response([entry_json(entry) for entry in session.history()])

    @app.get("/v1/sessions/<sid>/responses/<rid>")
    async def get_session_response(sid: str, rid: str) -> Response:
        record = await rt.turn_record(rid, account_id=g.account_id)
        if record.session_id != sid:
            raise NotFound(f"response {rid!r} is unknown in session {sid!r}")
        return json_response(turn_json(record, rt.find_turn(rid)))

    @app.get("/v1/responses/<rid>")
    async def get_response(rid: str) -> Response:
        record = await rt.turn_record(rid, account_id=g.account_id)
        if record.session_id is not None:
            raise NotFound(f"response {rid!r} is not a stateless response")
        return json_response(stateless_json(record))

    @app.get("/v1/sessions/<sid>/responses/<rid>/events")
    async def resume_session(sid: str, rid: str) -> Response:
        return await stream(session_turn(sid, rid), cursor())

    @app.get("/v1/responses/<rid>/events")
    async def resume_response(rid: str) -> Response:
        return await stream(stateless_turn(rid), cursor())

    @app.post("/v1/sessions/<sid>/responses/<rid>/cancel")
    async def cancel_session_turn(sid: str, rid: str) -> tuple[Response, int]:
        return await cancel(session_turn(sid, rid))

    @app.post("/v1/responses/<rid>/cancel")
    async def cancel_response(rid: str) -> tuple[Response, int]:
        return await cancel(stateless_turn(rid))

    @app.get("/v1/usage")
    async def usage() -> Response:
        raw = request.args.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_USAGE_RECORDS:
            raise InvalidRequest(f"limit must be 1-{MAX_USAGE_RECORDS}, not {raw!r}")
        report = await usage_report(rt.store, g.account_id, limit=int(raw))
        return json_response(usage_report_json(report))

    app.register_blueprint(files_blueprint(rt))

    # -- helpers (closures over rt) -------------------------------------------

    def session_turn(sid: str, rid: str) -> Turn:
        turn = rt.get_turn(rid, account_id=g.account_id)
        if turn.session_id != sid:
            raise NotFound(f"response {rid!r} is unknown in session {sid!r}")
        return turn

    def stateless_turn(rid: str) -> Turn:
        turn = rt.get_turn(rid, account_id=g.account_id)
        if not turn.is_stateless:
            raise NotFound(f"response {rid!r} is not a stateless response")
        return turn

    async def start_turn(body: dict[str, Any], start: Any) -> Turn | Replayed:
        """Start the turn, through the request's Idempotency-Key if it has one."""
        key = request.headers.get("Idempotency-Key")
        if key is None:
            turn: Turn = await start()
            return turn
        # The fingerprint is (session, body): the path names the session.
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return await rt.idempotency.run(
            g.account_id, key, fingerprint(request.path, canonical), start, rt.find_turn
        )

    def stateless_json(record: TurnRecord) -> dict[str, Any]:
        turn = rt.find_turn(record.id)
        if turn is not None:
            return response_object(turn.response_snapshot())
        if record.response is None:
            # Only its start was stored (its end write failed, or it ran when
            # the process died and no start-up has recovered it yet).
            return response_object(
                ResponseSnapshot(
                    id=record.id,
                    status=record.status,
                    model=record.model,
                    created_at=record.created_at,
                    error=record.error,
                    cancel_reason=record.cancel_reason,
                )
            )
        return response_object(record.response)

    async def replayed(result: Replayed) -> Response:
        """A retry whose turn has left memory: its final state, from the store."""
        body: dict[str, Any] = {
            "response_id": result.response_id,
            "status": "replayed",
            "note": REPLAYED_NOTE,
        }
        try:
            record = await rt.turn_record(result.response_id, account_id=g.account_id)
        except NotFound:
            pass  # purged: only the binding is left
        else:
            body["response"] = (
                turn_json(record) if record.session_id is not None else stateless_json(record)
            )
        return json_response(body)

    async def start_stream(body: dict[str, Any], start: Any) -> Response:
        result = await start_turn(body, start)
        if isinstance(result, Replayed):
            return await replayed(result)
        return await stream(result, None)

    async def stream(turn: Turn, after: int | None) -> Response:
        if after is not None and after >= len(turn.buffer):
            # No client can have seen an id that does not exist yet.
            raise InvalidRequest(
                f"Last-Event-ID {after} is past the last event ({len(turn.buffer) - 1})"
            )
        response = Response(
            sse_body(turn, after, flush),
            200,
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Response-Id": turn.id,
                "X-Accel-Buffering": "no",
            },
        )
        response.timeout = None
        await trio.lowlevel.checkpoint()
        return response

    async def cancel(turn: Turn) -> tuple[Response, int]:
        outcome = await turn.cancel()
        flush.release()
        status = 202 if outcome.value == "cancelling" else 200
        return json_response({"response_id": turn.id, "status": outcome.value}), status

    return app


@attrs.define(eq=False)
class FlushTicker:
    """Tells SSE writers whether the server is loaded, and ticks for them.

    One task (:meth:`run`) sleeps ``interval`` at a time and measures how late
    it wakes; the smoothed lateness over ``lag`` means the loop is busy. Then
    :meth:`wait_flush` waits for the next tick (all waiting writers share one
    ``trio.Event``: no timer or cancel scope per stream), else returns at once.
    """

    interval: float = FLUSH_INTERVAL
    lag: float = FLUSH_LAG
    #: Smoothed lateness of the tick, seconds.
    late: float = 0.0
    _tick: trio.Event = attrs.field(factory=trio.Event, init=False)

    @property
    def loaded(self) -> bool:
        return self.late > self.lag

    async def run(self) -> None:
        while True:
            start = trio.current_time()
            await trio.sleep(self.interval)
            late = max(0.0, trio.current_time() - start - self.interval)
            self.late = 0.7 * self.late + 0.3 * late
            self.release()

    def release(self) -> None:
        """Wake every waiting writer now (a cancel's terminal event is due)."""
        tick, self._tick = self._tick, trio.Event()
        tick.set()

    async def wait_flush(self) -> None:
        """Under load, wait for the next tick; otherwise only a checkpoint."""
        if self.loaded:
            await self._tick.wait()
        else:
            await trio.lowlevel.checkpoint()


async def sse_body(
    turn: Turn, after: int | None, flush: FlushTicker | None = None
) -> AsyncIterator[bytes]:
    """The turn's events after ``after`` as SSE, coalesced, with idle pings.

    This generator is a reader of the turn's buffer: if the client goes away
    it is cancelled, and the turn is not affected. Each ``yield`` is one socket
    write, which waits while the client does not read (backpressure): what is
    pending for a slow client is at most one write of
    :data:`MAX_EVENTS_PER_WRITE` events. Under load (``flush``), a write is
    followed by a wait for the flush tick, so the events of the next write
    gather meanwhile.
    """
    cursor = -1 if after is None else after
    checkpointed = False
    while True:
        # Right after the flush wait (a checkpoint) what is ready is read as
        # it is: a trip through the scheduler less per write.
        batch = turn.buffer.read_ready(cursor, limit=MAX_EVENTS_PER_WRITE) if checkpointed else ()
        if not batch:
            batch = await turn.read_batch(cursor, limit=MAX_EVENTS_PER_WRITE)
        checkpointed = False
        if not batch:
            if turn.buffer.closed:
                return
            yield b": ping\n\n"  # nudged by the pinger: keep the connection alive
            continue
        yield b"".join([sse_frame(event) for event in batch])
        cursor = batch[-1].sequence_number
        if batch[-1].is_terminal:
            return
        caught_up = len(batch) < MAX_EVENTS_PER_WRITE
        if caught_up and flush is not None and not turn.buffer.sealed:
            # Under load, let events gather; never once a cancel was accepted
            # (the terminal event goes out at once; the routes that cancel
            # release the writers already waiting).
            await flush.wait_flush()
            checkpointed = True


def cursor() -> int | None:
    """The resume cursor: ``Last-Event-ID`` header or ``?last_event_id=``."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"Last-Event-ID must be an integer, not {raw!r}") from None
    if value < -1:
        raise InvalidRequest(f"Last-Event-ID must be >= -1, not {value}")
    return value


async def json_body(*, optional: bool = False) -> dict[str, Any]:
    """The request body parsed as a JSON object, whatever the Content-Type."""
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        if optional:
            return {}
        raise InvalidRequest("the request body must be a JSON object")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        # JSON allows lone surrogates ("\ud800"); UTF-8 does not. Refuse them
        # here rather than store what can never be sent back.
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest("the request body has a string that is not valid Unicode") from None
    return body


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: refuse them rather than echo them back."""
    raise ValueError(f"{name} is not valid JSON")


def field(body: dict[str, Any], name: str, kind: Any, default: Any) -> Any:
    """``body[name]`` checked against ``kind`` (400 if wrong), or ``default``."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidRequest(f"{name!r} must be {names}, not {value!r}")
    return value


def parse_duration(text: str) -> float:
    """``1h30m`` -> 5400.0; ``s``, ``m``, ``h`` suffixes, combinable."""
    pos, total = 0, 0.0
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise InvalidRequest(f"older_than must look like 90s, 15m or 1h30m, not {text!r}")
    return total
