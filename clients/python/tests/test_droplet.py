"""A library droplet against the real orchestrator: run, redelivery, cancel, fencing,
backpressure, re-registration, and the checks on /message."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI

from orchestrator_client import Droplet, Orchestrator, Task, TaskFailed, Verifier, envelope, fastapi_router

from .conftest import SECRET, Proxy, eventually, free_port


def fastapi_app(droplet: Droplet) -> FastAPI:
    app = FastAPI()
    app.include_router(fastapi_router(droplet))
    return app


def orchestrator_token(secret: str = SECRET, sub: str = "droplet-10", droplet_id: int = 10) -> str:
    now = int(time.time())
    claims = {"droplet_id": droplet_id, "sub": sub, "iat": now, "exp": now + 300}
    return jwt.encode(claims, secret, algorithm="HS256")


def cap() -> str:
    return f"cap-{uuid.uuid4().hex[:8]}"


async def test_a_task_created_by_a_producer_is_run_and_its_result_read_back(
    serve, producer: Orchestrator
) -> None:
    capability = cap()
    droplet = await serve([capability], app=fastapi_app)

    @droplet.task(capability)
    async def verify(task: Task) -> dict:
        return {"checked": task.payload["code_url"], "attempt": task.attempt}

    await droplet.start()
    trace = str(uuid.uuid4())
    created = await producer.create_task(
        "verify",
        "Verify",
        {"code_url": "https://example.com/x"},
        required_capability=capability,
        trace_id=trace,
    )
    again = await producer.create_task(
        "verify",
        "Verify",
        {"code_url": "https://example.com/x"},
        required_capability=capability,
        trace_id=trace,
    )
    assert again["task_id"] == created["task_id"]  # a retried create is the same task
    result = await producer.wait_for_result(created["task_id"], timeout=20)
    assert result == {"checked": "https://example.com/x", "attempt": 1}
    task = await producer.get_task(created["task_id"])
    moves = [(h["to_status"], h["changed_by"]) for h in task["state_history"]]
    assert ("in_progress", f"droplet-{droplet.droplet_id}") in moves
    assert ("completed", f"droplet-{droplet.droplet_id}") in moves
    waiting = await producer.create_task("verify", "Nobody", required_capability=f"nobody-{capability}")
    explained = await producer.explain(waiting["task_id"])
    assert explained["reason"] == "no_capable_droplet", explained


async def test_a_redelivery_runs_once(serve, producer: Orchestrator) -> None:
    capability = cap()
    droplet = await serve([capability])
    release = asyncio.Event()
    calls: list[int] = []

    @droplet.task(capability)
    async def work(task: Task) -> dict:
        calls.append(task.id)
        await release.wait()
        return {"ok": True}

    await droplet.start()
    created = await producer.create_task("work", "Work", required_capability=capability)
    task_id = created["task_id"]
    await eventually(lambda: calls, what="the handler to start")
    task = await producer.get_task(task_id)
    redelivery = envelope(
        10, {"command": "execute_task", "task": task}, trace_id=task["trace_id"], target=droplet.droplet_id
    )
    headers = {"Authorization": f"Bearer {orchestrator_token()}"}
    async with httpx.AsyncClient() as http:
        while_running = await http.post(f"{droplet.endpoint}/message", json=redelivery, headers=headers)
        assert while_running.status_code == 200, while_running.text
        assert while_running.json()["payload"]["status"] == "running"
        release.set()
        assert (await producer.wait_for_result(task_id, timeout=20)) == {"ok": True}
        after_done = await http.post(f"{droplet.endpoint}/message", json=redelivery, headers=headers)
        assert after_done.json()["payload"]["status"] == "completed"
    await asyncio.sleep(0.3)
    assert calls == [task_id]
    history = (await producer.get_task(task_id))["state_history"]
    assert [h["to_status"] for h in history].count("in_progress") == 1


async def test_a_cancel_stops_the_handler(serve, producer: Orchestrator) -> None:
    capability = cap()
    droplet = await serve([capability])
    started, stopped = asyncio.Event(), asyncio.Event()

    @droplet.task(capability)
    async def forever(task: Task) -> dict:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {}

    await droplet.start()
    # A running task cannot be cancelled by its creator (in_progress -> cancelled is not a
    # move); it is taken from its droplet when its deadline passes, with a cancel_task.
    deadline = datetime.now(timezone.utc) + timedelta(seconds=3)
    created = await producer.create_task(
        "long", "Long", required_capability=capability, deadline=deadline.isoformat()
    )
    await asyncio.wait_for(started.wait(), 20)
    assert droplet.outcome(created["task_id"]) == "running"
    await asyncio.wait_for(stopped.wait(), 20)
    assert droplet.outcome(created["task_id"]) == "cancelled"
    task = await producer.get_task(created["task_id"])
    assert task["status"] == "failed" and task["error_message"] == "deadline exceeded"


async def test_a_stale_attempts_update_is_dropped(serve, producer: Orchestrator, service, caplog) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator_client")
    capability = cap()
    cable = Proxy(free_port(), 0)
    droplet = await serve([capability], proxy=cable)
    release = asyncio.Event()
    attempts: list[int | None] = []

    @droplet.task(capability)
    async def work(task: Task) -> dict:
        attempts.append(task.attempt)
        if task.attempt == 1:
            await release.wait()
        return {"attempt": task.attempt}

    await droplet.start()
    created = await producer.create_task("fenced", "Fenced", required_capability=capability, max_retries=2)
    task_id = created["task_id"]
    await eventually(lambda: droplet_status(producer, task_id, "in_progress"), what="attempt 1 in progress")
    # The network to the droplet goes down; meanwhile attempt 1 is taken from it (reported
    # failed on its behalf, as a lost droplet's work is) and retried: attempt 2 is assigned
    # to the same droplet, whose delivery and cancel_task cannot arrive yet.
    cable.cut()
    token = service.token(droplet.droplet_id, ["read", "write"])
    async with httpx.AsyncClient() as http:
        body = envelope(droplet.droplet_id, {"status": "failed", "attempt": 1, "error_message": "taken away"})
        moved = await http.patch(
            f"{service.url}/tasks/{task_id}", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert moved.status_code == 200, moved.text
    await eventually(lambda: task_on_attempt(producer, task_id, 2), what="attempt 2 assigned")
    release.set()  # attempt 1 finishes late: its update is a 409, dropped quietly
    await eventually(lambda: droplet.outcome(task_id) == "stale", what="attempt 1 dropped as stale")
    assert f"Task {task_id} is on attempt 2; this update is for attempt 1" in caplog.text
    assert (await producer.get_task(task_id))["status"] == "assigned"  # changed nothing
    cable.up = True  # attempt 2 is delivered and runs
    assert (await producer.wait_for_result(task_id, timeout=30)) == {"attempt": 2}
    assert attempts == [1, 2]
    task = await producer.get_task(task_id)
    assert [h["to_status"] for h in task["state_history"]].count("completed") == 1


async def task_on_attempt(producer: Orchestrator, task_id: int, attempt: int) -> bool:
    task = await producer.get_task(task_id)
    return task["attempt"] == attempt and task["status"] == "assigned"


async def droplet_status(producer: Orchestrator, task_id: int, status: str) -> bool:
    return (await producer.get_task(task_id))["status"] == status


async def test_a_full_droplet_answers_429_and_the_task_is_deferred_not_failed(
    serve, producer: Orchestrator
) -> None:
    capability = cap()
    droplet = await serve([capability])
    release = asyncio.Event()

    @droplet.task(capability)
    async def work(task: Task) -> dict:
        if task.title == "first":
            await release.wait()
        return {"title": task.title}

    await droplet.start()
    droplet.max_concurrent_tasks = 1  # lowered at run time: the orchestrator still sends
    first = await producer.create_task("work", "first", required_capability=capability)
    await eventually(lambda: droplet.running == 1, what="the first task to run")
    second = await producer.create_task("work", "second", required_capability=capability)
    await eventually(lambda: droplet.busy_answers >= 1, what="a 429")
    await asyncio.sleep(1.5)
    waiting = await producer.get_task(second["task_id"])
    assert waiting["status"] == "assigned" and waiting["retry_count"] == 0
    release.set()
    assert (await producer.wait_for_result(first["task_id"], timeout=20)) == {"title": "first"}
    assert (await producer.wait_for_result(second["task_id"], timeout=30)) == {"title": "second"}
    done = await producer.get_task(second["task_id"])
    assert done["retry_count"] == 0 and done["attempt"] == 1
    assert "failed" not in [h["to_status"] for h in done["state_history"]]


async def test_an_unknown_droplet_registers_again_when_its_heartbeat_is_refused(
    serve, producer: Orchestrator
) -> None:
    droplet = await serve([cap()])
    await droplet.heartbeat()  # never registered: 404, then a registration
    assert droplet.heartbeat_interval == 2.0  # as the registration answer said
    listed = await producer._get(f"/droplets/{droplet.droplet_id}")
    assert "active" in str(listed)


async def test_a_started_droplet_heartbeats_at_the_interval_it_was_given(
    serve, producer: Orchestrator
) -> None:
    droplet = await serve([cap()])
    await droplet.start()

    async def last_heartbeat() -> Any:
        return (await producer._get(f"/droplets/{droplet.droplet_id}"))["droplet"]["last_heartbeat"]

    first = await last_heartbeat()
    await asyncio.sleep(2.6)  # HEARTBEAT_INTERVAL is 2 in the test service
    assert await last_heartbeat() != first


async def test_registration_keeps_trying_while_the_orchestrator_is_away(
    service, producer: Orchestrator
) -> None:
    away = Proxy(free_port(), int(service.url.rsplit(":", 1)[1]))
    away.up = False  # every connection is closed at once: the orchestrator is away
    await away.start()
    droplet_id = 9999
    droplet = Droplet(
        f"http://127.0.0.1:{away.port}",
        droplet_id,
        [cap()],
        "http://127.0.0.1:1",
        service.token(droplet_id, ["read", "write"]),
        verifier=Verifier(secret=SECRET),
    )
    try:
        starting = asyncio.create_task(droplet.start())
        await asyncio.sleep(5)  # longer than one request's own retries
        assert not starting.done()  # still trying, not given up
        away.up = True
        await asyncio.wait_for(starting, 20)
        assert "active" in str(await producer._get(f"/droplets/{droplet_id}"))
    finally:
        await droplet.stop()
        await away.stop()


async def test_the_message_endpoint_refuses_what_is_not_the_orchestrators(serve) -> None:
    capability = cap()
    droplet = await serve([capability])
    calls: list[int] = []

    @droplet.task(capability)
    async def work(task: Task) -> dict:
        calls.append(task.id)
        return {}

    task = {
        "id": 1,
        "attempt": 1,
        "task_type": "x",
        "title": "x",
        "payload": {},
        "required_capability": capability,
    }
    body = envelope(10, {"command": "execute_task", "task": task}, target=droplet.droplet_id)
    url = f"{droplet.endpoint}/message"
    async with httpx.AsyncClient() as http:
        for headers in (
            {},
            {"Authorization": f"Bearer {orchestrator_token(secret='another-secret-0123456789abcdef-0')}"},
            {"Authorization": f"Bearer {orchestrator_token(sub='droplet-55', droplet_id=55)}"},
            {"Authorization": "Bearer not-a-jwt"},
        ):
            answer = await http.post(url, json=body, headers=headers)
            assert answer.status_code == 401, answer.text
            assert "detail" in answer.json()
        good = {"Authorization": f"Bearer {orchestrator_token()}"}
        assert (await http.post(url, content=b"{not json", headers=good)).status_code == 400
        bad_task = envelope(10, {"command": "execute_task", "task": {"id": "seven"}})
        assert (await http.post(url, json=bad_task, headers=good)).status_code == 422
        other = envelope(10, {"command": "execute_task", "task": {**task, "required_capability": "nobody"}})
        assert (await http.post(url, json=other, headers=good)).status_code == 422
        assert (await http.get(url)).status_code == 405
        # A well-signed execute_task for a task not assigned here (a replayed token, a forged
        # body): accepted on the wire, but the orchestrator refuses its in_progress, so the
        # handler never runs.
        forged = envelope(10, {"command": "execute_task", "task": {**task, "id": 2_000_000_000}})
        assert (await http.post(url, json=forged, headers=good)).status_code == 200
        await eventually(lambda: droplet.outcome(2_000_000_000) == "stale", what="the forged task dropped")
    assert calls == []


async def test_a_failing_handler_or_a_result_that_is_not_json_fails_the_task(
    serve, producer: Orchestrator
) -> None:
    capability = cap()
    droplet = await serve([capability])

    @droplet.task(capability)
    async def work(task: Task) -> Any:
        if task.title == "raises":
            raise ValueError("bad input: no code_url")
        return {"not json": {1, 2}}

    await droplet.start()
    for title, error in (("raises", "bad input: no code_url"), ("set", "the result is not JSON")):
        created = await producer.create_task("work", title, required_capability=capability, max_retries=0)
        with pytest.raises(TaskFailed) as failed:
            await producer.wait_for_result(created["task_id"], timeout=20)
        assert failed.value.task["error_message"].startswith(error)
        assert droplet.outcome(created["task_id"]) == "failed"
    assert droplet.running == 0


async def test_a_forged_delivery_cannot_stand_in_for_the_real_one(serve, producer: Orchestrator) -> None:
    capability = cap()
    droplet = await serve([capability])
    calls: list[int | None] = []

    @droplet.task(capability)
    async def work(task: Task) -> dict[str, Any]:
        calls.append(task.attempt)
        return {"ran": task.payload.get("real", False)}

    created = await producer.create_task("work", "Real", {"real": True}, required_capability=capability)
    task = await producer.get_task(created["task_id"])  # pending: no droplet has it yet
    forged = envelope(10, {"command": "execute_task", "task": {**task, "attempt": 1, "payload": {}}})
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{droplet.endpoint}/message",
            json=forged,
            headers={"Authorization": f"Bearer {orchestrator_token()}"},
        )
    assert answer.status_code == 200
    await eventually(lambda: droplet.outcome(task["id"]) == "stale", what="the forged delivery dropped")
    await droplet.start()  # now the real attempt 1 is assigned here and delivered
    assert await producer.wait_for_result(task["id"], timeout=20) == {"ran": True}
    assert calls == [1]
