"""The runtime's error hierarchy.

Every error the runtime raises on purpose derives from :class:`AgentRuntimeError`
and carries what an HTTP layer needs to answer: a short ``error_type`` (the
``"error"`` field of a JSON error body) and a ``status_hint`` (the HTTP status).
The server maps them in one table and never invents its own meanings (compare
h11's ``ProtocolError.error_status_hint``).
"""

from __future__ import annotations

from typing import ClassVar


class AgentRuntimeError(Exception):
    """Base class of every error the runtime raises deliberately.

    Not raised itself. Catch it to handle "the runtime said no" as opposed to a
    bug (which surfaces as any other exception).
    """

    error_type: ClassVar[str] = "runtime_error"
    status_hint: ClassVar[int] = 500


class InvalidRequest(AgentRuntimeError, ValueError):
    """Raised when an argument is malformed (wrong type, out of range, empty).

    The caller can fix the request and retry. Differs from :class:`NotFound`,
    which is about an object that does not (or no longer) exist.
    """

    error_type = "invalid_request"
    status_hint = 400


class NotFound(AgentRuntimeError, LookupError):
    """Raised when a session or response id is unknown, deleted or evicted.

    A response id stays known until ``grace_seconds`` after its terminal event;
    after that it is gone for good. The HTTP layer also answers this for objects
    owned by another account, so their existence never leaks.
    """

    error_type = "not_found"
    status_hint = 404


class SessionBusy(AgentRuntimeError):
    """Raised by ``Session.send`` while another turn of the session runs.

    Attributes:
      response_id: the id of the turn that is running, so the caller can cancel
        it or resume its stream.
    """

    error_type = "session_busy"
    status_hint = 409

    def __init__(self, session_id: str, response_id: str) -> None:
        super().__init__(
            f"session {session_id} is busy with {response_id}; cancel it "
            f"or wait for its terminal event before sending another message"
        )
        self.session_id = session_id
        self.response_id = response_id


class SessionClosed(AgentRuntimeError):
    """Raised by ``Session.send`` on a session that is being torn down.

    The session was deleted, expired, or the runtime is shutting down; the
    session will not accept turns again. Differs from :class:`NotFound` only in
    timing: the teardown has started but not finished.
    """

    error_type = "not_found"
    status_hint = 404


class OutOfCredits(AgentRuntimeError):
    """Raised when a turn would start on an account whose balance is exhausted.

    Only accounts in hard credit mode refuse; soft accounts go negative.
    """

    error_type = "out_of_credits"
    status_hint = 402


class PathOutsideWorkspace(AgentRuntimeError):
    """Raised when a path names something outside the session's workspace.

    ``..`` components, absolute paths other than the sandbox prefix, NUL bytes
    and symbolic links are refused, never followed.
    """

    error_type = "path_outside_workspace"
    status_hint = 403


class IdempotencyConflict(AgentRuntimeError):
    """Raised when an idempotency key is reused with another session or body.

    A key names one request for 24 hours; a new request needs a new key.
    """

    error_type = "idempotency_conflict"
    status_hint = 422


class StorageFull(AgentRuntimeError):
    """Raised when the workspace's disk is full (or a quota or file-size limit
    is reached) while writing a file; nothing is left half-written (507)."""

    error_type = "insufficient_storage"
    status_hint = 507


class Unauthorized(AgentRuntimeError):
    """Raised when an API key is missing or unknown."""

    error_type = "unauthorized"
    status_hint = 401


class UpstreamError(AgentRuntimeError):
    """Raised by a model when its upstream server fails: unreachable, an error
    status, a malformed or truncated stream, or silence past the read timeout.

    The turn ends ``message.error`` / ``response.failed``, unbilled. The text
    names the cause and never the API key.
    """

    error_type = "upstream_error"
    status_hint = 502


class ShuttingDown(AgentRuntimeError):
    """Raised when a new session or turn is requested while the runtime closes."""

    error_type = "shutting_down"
    status_hint = 503


class InvalidTransition(AgentRuntimeError, RuntimeError):
    """Raised by the turn state machine on a transition its table does not have.

    This is a bug in the runtime, never a user error.
    """

    error_type = "internal_error"
    status_hint = 500


class RateLimited(AgentRuntimeError):
    """A rate-limit window of the account is full: no new turn until it drains.

    ``retry_after`` is how many seconds until the window has room again (the
    HTTP layer sends it as ``Retry-After``).
    """

    error_type = "rate_limited"
    status_hint = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(AgentRuntimeError):
    """The store could not do what was asked (disk full, locked, I/O error).

    Raised when a turn cannot be admitted; a turn whose finalizing write fails
    ends ``message.error`` / ``response.failed`` naming ``store_error``,
    unbilled. Differs from a bug (500): the server itself is fine, retry later.
    """

    error_type = "store_error"
    status_hint = 503
