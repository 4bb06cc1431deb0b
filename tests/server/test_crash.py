"""Crash recovery: ``agent-runtime serve`` SIGKILLed mid-turn and mid-finalize,
then restarted on the same data dir.

The server runs as a real subprocess on the SQLite store; the only test hook
is a pause inside one turn's finalize step (``Runtime._for_testing_finalizing``),
installed by the ``-c`` code before the console script's ``main`` runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

import httpx
import psutil
import trio

from .conftest import parse_sse
from .served import KEY, MAIN, Served, run_server

if TYPE_CHECKING:
    from pathlib import Path

PAUSE: Final = "PAUSE-IN-FINALIZE"
#: Before ``main``: every runtime the server opens pauses forever in the
#: finalize step of a turn whose input contains PAUSE, after printing its id.
PAUSED_MAIN: Final = f"""
import sys, trio
import server._serve as serving

original = serving.serve

async def pause(turn):
    if {PAUSE!r} in turn.input:
        print("finalizing", turn.id, flush=True)
        await trio.sleep_forever()

async def serve(rt, **kwargs):
    rt._for_testing_finalizing = pause
    await original(rt, **kwargs)

serving.serve = serve
{MAIN}
"""
HEADERS: Final = {"Authorization": f"Bearer {KEY}"}


async def read_until(served: Served, needle: bytes) -> bytes:
    """Read the server's stdout until ``needle`` has appeared; return the line."""
    assert served.process.stdout is not None
    buffer = b""
    while needle not in buffer:
        chunk = await served.process.stdout.receive_some()
        assert chunk, f"server exited: {buffer!r}"
        buffer += chunk
    return next(line for line in buffer.splitlines() if needle in line)


async def kill(served: Served) -> None:
    """SIGKILL the server and check that nothing of it is left."""
    pid = served.process.pid
    served.process.kill()
    await served.process.wait()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def complete(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
    """POST a turn, read its stream to the end; return its response id."""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = parse_sse((await response.aread()).decode())
    assert events[-1].event in ("message.completed", "response.completed"), events[-1]
    return response.headers["X-Response-Id"]


async def usage(client: httpx.AsyncClient) -> dict[str, Any]:
    got = await client.get("/v1/usage")
    assert got.status_code == 200
    body: dict[str, Any] = got.json()
    return body


async def test_crash_recovery_after_sigkill_mid_turn_and_mid_finalize(tmp_path: Path) -> None:
    """After SIGKILL and restart: persistent sessions, history, files and every completed
    usage record are there exactly once; the interrupted turns are cancelled(interrupted)
    and unbilled, their idempotency keys still bound; the non-persistent session and its
    workspace are gone; the persistent sessions take new turns."""
    fast = ("--demo-tokens-per-second", "2000")
    with trio.fail_after(60):
        async with (
            run_server(tmp_path, *fast, code=PAUSED_MAIN) as served,
            httpx.AsyncClient(base_url=served.url, headers=HEADERS) as client,
        ):
            # Completed work of every kind: billed once each.
            persistent = (await client.post("/v1/sessions", json={"persistent": True})).json()
            paused = (await client.post("/v1/sessions", json={"persistent": True})).json()
            ephemeral = (await client.post("/v1/sessions", json={})).json()
            put = await client.put(
                f"/v1/sessions/{persistent['id']}/files/notes/a.txt", content=b"kept"
            )
            assert put.status_code == 201
            done = [
                await complete(
                    client, f"/v1/sessions/{persistent['id']}/messages", {"message": "hi"}
                ),
                await complete(
                    client, f"/v1/sessions/{ephemeral['id']}/messages", {"message": "hi"}
                ),
            ]
            client.headers["Idempotency-Key"] = "stateless-done"
            done.append(await complete(client, "/v1/responses", {"input": "hello", "stream": True}))
            del client.headers["Idempotency-Key"]
            before = await usage(client)
            assert len(before["records"]) == 3

            # Mid-finalize: this turn is paused inside its ledger step.
            async with client.stream(
                "POST",
                f"/v1/sessions/{paused['id']}/messages",
                json={"message": f"{PAUSE} hi"},
                headers={"Idempotency-Key": "mid-finalize"},
            ) as response:
                finalizing_rid = response.headers["X-Response-Id"]
                line = await read_until(served, b"finalizing")
                assert line.split()[1].decode() == finalizing_rid

            # Mid-turn: a long essay, a few events in.
            async with client.stream(
                "POST",
                f"/v1/sessions/{persistent['id']}/messages",
                json={"message": "Write a 100000-word essay on recovery"},
                headers={"Idempotency-Key": "mid-turn"},
            ) as response:
                running_rid = response.headers["X-Response-Id"]
            # The client went away (the turn goes on); wait until it is well under way.
            while True:
                got = await client.get(f"/v1/sessions/{persistent['id']}/responses/{running_rid}")
                if got.json()["last_sequence_number"] >= 20:
                    break
                await trio.sleep(0.01)
            await kill(served)
            data_dir = served.data_dir

        assert (data_dir / "workspaces" / ephemeral["id"]).is_dir()  # left behind by the crash
        async with (
            run_server(tmp_path, *fast) as served,
            httpx.AsyncClient(base_url=served.url, headers=HEADERS) as client,
        ):
            # Sessions: the persistent ones are back, the other is gone with its workspace.
            listed = {s["id"] for s in (await client.get("/v1/sessions")).json()}
            assert listed == {persistent["id"], paused["id"]}
            assert (await client.get(f"/v1/sessions/{ephemeral['id']}")).status_code == 404
            assert not (data_dir / "workspaces" / ephemeral["id"]).exists()
            session = (await client.get(f"/v1/sessions/{persistent['id']}")).json()
            assert session["persistent"] is True
            assert session["busy"] is False
            assert session["created_at"] == persistent["created_at"]

            # Files and history survived; the interrupted turns are marked and unbilled.
            got = await client.get(f"/v1/sessions/{persistent['id']}/files/notes/a.txt")
            assert (got.status_code, got.content) == (200, b"kept")
            history = (await client.get(f"/v1/sessions/{persistent['id']}/messages")).json()
            assert [(h["id"], h["status"]) for h in history] == [
                (done[0], "completed"),
                (running_rid, "cancelled"),
            ]
            assert history[0]["output_text"]
            assert history[0]["usage"]["output_tokens"] > 0
            assert history[1]["cancel_reason"] == "interrupted"
            assert history[1]["usage"] is None
            [entry] = (await client.get(f"/v1/sessions/{paused['id']}/messages")).json()
            assert (entry["id"], entry["status"], entry["cancel_reason"]) == (
                finalizing_rid,
                "cancelled",
                "interrupted",
            )
            turn = await client.get(f"/v1/sessions/{paused['id']}/responses/{finalizing_rid}")
            assert turn.json()["status"] == "cancelled"

            # The ledger: exactly the three completed turns, nothing for the interrupted.
            after = await usage(client)
            assert sorted(r["response_id"] for r in after["records"]) == sorted(done)
            assert after["credits"]["balance"] == before["credits"]["balance"]

            # Idempotency keys are still bound: retries re-attach to the final state.
            for sid, key, rid, message in (
                (paused["id"], "mid-finalize", finalizing_rid, f"{PAUSE} hi"),
                (
                    persistent["id"],
                    "mid-turn",
                    running_rid,
                    "Write a 100000-word essay on recovery",
                ),
            ):
                retry = await client.post(
                    f"/v1/sessions/{sid}/messages",
                    json={"message": message},
                    headers={"Idempotency-Key": key},
                )
                assert retry.status_code == 200
                body = retry.json()
                assert (body["response_id"], body["status"]) == (rid, "replayed")
                assert body["response"]["status"] == "cancelled"
                assert body["response"]["cancel_reason"] == "interrupted"
            retry = await client.post(
                "/v1/responses",
                json={"input": "hello", "stream": True},
                headers={"Idempotency-Key": "stateless-done"},
            )
            body = retry.json()
            assert (body["response_id"], body["status"]) == (done[2], "replayed")
            assert body["response"]["status"] == "completed"
            assert body["response"]["output"][0]["content"][0]["text"]

            # The persistent session takes a new turn, with its history as context.
            rid = await complete(
                client, f"/v1/sessions/{persistent['id']}/messages", {"message": "hi again"}
            )
            history = (await client.get(f"/v1/sessions/{persistent['id']}/messages")).json()
            assert [h["id"] for h in history] == [done[0], running_rid, rid]
            assert len((await usage(client))["records"]) == 4
            await kill(served)

        # A second restart finds the same, and nothing running.
        async with (
            run_server(tmp_path, *fast) as served,
            httpx.AsyncClient(base_url=served.url, headers=HEADERS) as client,
        ):
            history = (await client.get(f"/v1/sessions/{persistent['id']}/messages")).json()
            assert [h["status"] for h in history] == ["completed", "cancelled", "completed"]
            assert len((await usage(client))["records"]) == 4
    assert sorted(os.listdir(data_dir / "workspaces")) == sorted([persistent["id"], paused["id"]])
