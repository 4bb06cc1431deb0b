"""``agent-runtime keys / credits / limits``: account administration on a data dir.

The commands run as real subprocesses (the console script's entry point) on a
temporary data dir. The last tests start ``agent-runtime serve`` on that data
dir and prove that what the commands store is what the running server uses:
keys authenticate, and credit and limit changes made while it runs apply to
the next request.
"""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import httpx
import trio

from runtime import CreditMode
from runtime._sqlite import (
    KeyInfo,
    create_key as store_create_key,
    database_path,
    list_keys as store_list_keys,
    open_database,
)

from .server.conftest import parse_sse
from .server.served import MAIN, run_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

TIMEOUT: Final = 30
CREATED_RE: Final = re.compile(
    r"\AAPI key \(shown once, stored only as a hash\): (pk_local_[A-Za-z0-9_-]{20,})\n"
    r"key id (key_[0-9a-f]{16}), account (acct_[0-9a-f]+), (hard|soft) mode, "
    r"balance (\S+)\n\Z"
)
SERVED_KEY_RE: Final = re.compile(
    r"API key \(shown once, stored only as a hash\): (pk_local_[A-Za-z0-9_-]{20,})\n"
)
#: A well-formed key id that no store has.
UNKNOWN: Final = "key_0000000000000000"
#: Credits of the account ``serve`` creates for the key it prints.
SERVE_KEY_CREDITS: Final = 1000.0


@attrs.frozen
class Created:
    """What ``keys create`` printed."""

    key: str
    key_id: str
    account: str
    mode: str
    balance: float


@attrs.frozen
class Row:
    """One row of ``keys list``."""

    key_id: str
    prefix: str
    account: str
    mode: str
    balance: float


def argv(*args: str) -> list[str]:
    return [sys.executable, "-c", MAIN, *args]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``agent-runtime ARGS`` to its end."""
    return subprocess.run(argv(*args), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def cli_all(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent ``agent-runtime`` commands at once (they are slow
    to start); return their results in order."""
    processes = [
        subprocess.Popen(argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in commands
    ]
    results = []
    try:
        for args, process in zip(commands, processes, strict=True):
            out, err = process.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(argv(*args), process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def limit_args(key_id: str, bucket: str, window: str, *rest: str) -> tuple[str, ...]:
    """``limits set KEY_ID --bucket BUCKET --window WINDOW REST...``."""
    return ("limits", "set", key_id, "--bucket", bucket, "--window", window, *rest)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must succeed."""
    assert result.returncode == 0, (result.args[3:], result.stdout, result.stderr)
    return result.stdout


def parse_created(stdout: str) -> Created:
    match = CREATED_RE.match(stdout)
    assert match is not None, stdout
    key, key_id, account, mode, balance = match.groups()
    return Created(key, key_id, account, mode, float(balance))


def create_key(data_dir: Path, *extra: str) -> Created:
    return parse_created(ok(cli("keys", "create", "--data-dir", str(data_dir), *extra)))


def parse_list(stdout: str) -> dict[str, Row]:
    """``keys list``'s table, by key id (box characters dropped)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c for c in line.split() if c.strip("│┃|")]
        if cells and re.fullmatch(r"key_[0-9a-f]{16}", cells[0]):
            key_id, prefix, account, mode, balance, *_created = cells
            rows[key_id] = Row(key_id, prefix, account, mode, float(balance))
    return rows


def list_keys(data_dir: Path) -> tuple[dict[str, Row], str]:
    stdout = ok(cli("keys", "list", "--data-dir", str(data_dir)))
    return parse_list(stdout), stdout


def store_bytes(data_dir: Path) -> bytes:
    """Every byte of the store's files (database, WAL, shared memory)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("agent-runtime.db*")))


def failed(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 1, nothing on stdout, ``message`` on stderr."""
    assert result.returncode == 1, (result.args[3:], result.stdout, result.stderr)
    assert result.stdout == ""
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- the commands ------------------------------------------------------------------
#
# Each command is a new interpreter (about a second of imports), so these tests
# set up and inspect the store in-process and run as few commands as they can.


def seed(data_dir: Path, *, credits: float) -> KeyInfo:
    """A store in ``data_dir`` with one key (made in-process) for a hard account."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = open_database(database_path(data_dir))
    try:
        conn.execute("BEGIN IMMEDIATE")
        _, info = store_create_key(conn, credits=credits)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return info


def stored(data_dir: Path) -> tuple[list[KeyInfo], list[tuple[Any, ...]]]:
    """The store's keys (with balance and mode) and its rate-limit rows."""
    conn = open_database(database_path(data_dir))
    try:
        limits = conn.execute(
            "SELECT account_id, bucket, window, max_turns, max_tokens FROM rate_limits"
        ).fetchall()
        return store_list_keys(conn), limits
    finally:
        conn.close()


def test_keys_create_prints_the_key_once_and_list_never_shows_it(tmp_path: Path) -> None:
    """keys create (making a new data dir) prints the key once and its id; keys list
    shows id, prefix, account, mode and balance but never the key; only a hash is kept."""
    data_dir = tmp_path / "new" / "data"
    created = create_key(data_dir, "--credits", "25", "--mode", "soft")
    rows, stdout = list_keys(data_dir)
    assert (created.mode, created.balance) == ("soft", 25.0)
    assert rows == {
        created.key_id: Row(created.key_id, created.key[:12] + "…", created.account, "soft", 25.0)
    }
    assert created.key not in stdout
    assert created.key[12:] not in stdout
    assert created.key.encode() not in store_bytes(data_dir)
    [info], _ = stored(data_dir)
    assert (info.id, info.account_id, info.prefix) == (
        created.key_id,
        created.account,
        created.key[:12],
    )


def test_credits_and_limits_change_the_account_of_a_key(tmp_path: Path) -> None:
    """credits add (negative here), credits mode and limits set change the account of
    KEY_ID only, and print it; run at once, none of them loses another's change."""
    data_dir = tmp_path / "data"
    mine = seed(data_dir, credits=10.0)
    other = seed(data_dir, credits=7.0)
    d = ("--data-dir", str(data_dir))
    added, mode, limits = cli_all(
        ("credits", "add", mine.id, "-2.5", *d),
        ("credits", "mode", mine.id, "soft", "--min-balance", "1.5", *d),
        limit_args(mine.id, "session_turn", "hour", "--max-turns", "1", *d),
    )
    assert re.search(rf"account {mine.account_id}: (hard|soft) mode, balance 7.5 ", ok(added))
    assert re.search(
        rf"account {mine.account_id}: soft mode, .* refuses new turns at 1.5 or less", ok(mode)
    )
    assert "limit session_turn/hour: turns 1, tokens unlimited" in ok(limits)
    keys, rate_limits = stored(data_dir)
    by_id = {info.id: info for info in keys}
    assert (by_id[mine.id].balance, by_id[mine.id].mode) == (7.5, CreditMode.SOFT)
    assert (by_id[other.id].balance, by_id[other.id].mode) == (7.0, CreditMode.HARD)
    assert rate_limits == [(mine.account_id, "session_turn", "hour", 1, None)]


def test_unknown_key_id_and_bad_limits_exit_1(tmp_path: Path) -> None:
    """An unknown key id, or --max-turns 0, exits 1 with a message on stderr and
    changes nothing."""
    data_dir = tmp_path / "data"
    info = seed(data_dir, credits=3.0)
    d = ("--data-dir", str(data_dir))
    add, zero = cli_all(
        ("credits", "add", UNKNOWN, "5", *d),
        limit_args(info.id, "session_turn", "hour", "--max-turns", "0", *d),
    )
    failed(add, f"unknown key id {UNKNOWN!r}")
    failed(zero, "max_turns must be a positive integer")
    assert stored(data_dir) == ([info], [])


def test_admin_commands_without_a_store_exit_1(tmp_path: Path) -> None:
    """keys list and limits set on a data dir with no store (missing, or empty) exit 1
    naming the missing store, and create none."""
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    results = cli_all(
        ("keys", "list", "--data-dir", str(missing)),
        limit_args(UNKNOWN, "response", "hour", "--max-turns", "3", "--data-dir", str(empty)),
    )
    for result, data_dir in zip(results, (missing, empty), strict=True):
        failed(result, f"no store at {database_path(data_dir)}")
    assert list(empty.iterdir()) == []
    assert not missing.exists()


def test_credits_add_refuses_an_infinite_amount(tmp_path: Path) -> None:
    """credits add KEY_ID inf exits 1 with a message and leaves the balance as it was."""
    data_dir = tmp_path / "data"
    info = seed(data_dir, credits=3.0)
    result = cli("credits", "add", info.id, "inf", "--data-dir", str(data_dir))
    assert stored(data_dir) == ([info], [])
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("agent-runtime: "), result.stderr


# -- against a running server ------------------------------------------------------


async def acli(*args: str) -> str:
    """Run ``agent-runtime ARGS`` from a trio task; its stdout (it must succeed)."""
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            argv(*args), capture_stdout=True, capture_stderr=True, check=False
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, (args, out, err)
    return out


@asynccontextmanager
async def serve_without_key(data_dir: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """``agent-runtime serve`` on ``data_dir`` (``TMP/data``) with no ``--api-key``
    and no key printed; yields its URL and a list that holds everything it
    printed once the block has ended."""
    assert data_dir.name == "data"
    async with run_server(
        data_dir.parent, "--demo-tokens-per-second", "0", api_key=None, expect_key=False
    ) as served:
        yield served.url, served.output


def client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


async def usage(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/v1/usage")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def message(http: httpx.AsyncClient, sid: str) -> httpx.Response:
    """POST a message; read a 200 stream to its end (message.completed)."""
    async with http.stream("POST", f"/v1/sessions/{sid}/messages", json={"message": "hi"}) as r:
        body = (await r.aread()).decode()
    if r.status_code == 200:
        assert parse_sse(body)[-1].event == "message.completed", body
    return r


async def test_stored_key_authenticates_and_admin_changes_apply_while_serving(
    tmp_path: Path,
) -> None:
    """A key from keys create authenticates against serve (which prints no new key);
    credits add, limits set and keys create run while it serves are seen by the next
    request."""
    data_dir = tmp_path / "data"
    created = create_key(data_dir, "--credits", "50")
    d = ("--data-dir", str(data_dir))
    with trio.fail_after(60):
        async with serve_without_key(data_dir) as (url, output), client(url, created.key) as http:
            report = await usage(http)
            assert report["rate_limit"]["caller_id"] == created.account
            assert report["credits"] == {"enabled": True, "mode": "hard", "balance": 50.0}

            await acli("credits", "add", created.key_id, "25", *d)
            assert (await usage(http))["credits"]["balance"] == 75.0

            sid = (await http.post("/v1/sessions", json={})).json()["id"]
            first = await message(http, sid)
            assert first.status_code == 200
            await acli(*limit_args(created.key_id, "session_turn", "hour", "--max-turns", "1", *d))
            second = await message(http, sid)
            assert second.status_code == 429, second.text
            assert second.json()["error"] == "rate_limited"
            assert 1 <= int(second.headers["Retry-After"]) <= 3600
            report = await usage(http)
            [record] = report["records"]
            assert record["response_id"] == first.headers["X-Response-Id"]
            assert report["credits"]["balance"] == 75.0 - record["credits"]
            [hour, _day] = report["rate_limit"]["buckets"]["session_turn"]["windows"]
            assert (hour["turns"], hour["max_turns"], hour["enabled"]) == (1, 1, True)

            late = parse_created(await acli("keys", "create", "--credits", "5", *d))
            async with client(url, late.key) as late_http:
                late_report = await usage(late_http)
            assert late_report["rate_limit"]["caller_id"] == late.account
            assert late_report["credits"]["balance"] == 5.0
            async with client(url, "pk_local_not_a_key") as stranger:
                assert (await stranger.get("/v1/usage")).status_code == 401
    assert "serving on" in output[-1]
    assert "API key" not in output[-1]
    assert created.key not in output[-1]


async def test_serve_prints_a_key_once_and_a_restart_keeps_it(tmp_path: Path) -> None:
    """serve with no key on an empty data dir prints one once (only its hash stored);
    a restart prints none and the first key still works."""
    with trio.fail_after(60):
        async with run_server(tmp_path, "--demo-tokens-per-second", "0", api_key=None) as served:
            [key] = SERVED_KEY_RE.findall(served.output[0])
            async with client(served.url, key) as http:
                report = await usage(http)
                sid = (await http.post("/v1/sessions", json={"persistent": True})).json()["id"]
                assert (await message(http, sid)).status_code == 200
        data_dir = served.data_dir
        assert key.encode() not in store_bytes(data_dir)
        assert report["credits"] == {"enabled": True, "mode": "hard", "balance": SERVE_KEY_CREDITS}

        async with serve_without_key(data_dir) as (url, output), client(url, key) as http:
            again = await usage(http)
            history = (await http.get(f"/v1/sessions/{sid}/messages")).json()
    assert "serving on" in output[-1]
    assert "API key" not in output[-1]
    assert key not in output[-1]
    assert again["rate_limit"]["caller_id"] == report["rate_limit"]["caller_id"]
    [record] = again["records"]
    assert again["credits"]["balance"] == SERVE_KEY_CREDITS - record["credits"]
    assert [entry["status"] for entry in history] == ["completed"]
