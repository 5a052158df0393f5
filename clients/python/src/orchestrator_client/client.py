"""A client for producers and dashboards: create tasks, wait for them, explain them, and
follow the live feed of task events across reconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from ._wire import DropletId, OrchestratorError, envelope, payload_of, send

log = logging.getLogger("orchestrator_client.client")

TERMINAL = ("completed", "failed", "cancelled")


def ended(task: Mapping[str, Any]) -> bool:
    """Whether the task will not move again."""
    status = task.get("status")
    if status == "failed":
        retries, most = task.get("retry_count"), task.get("max_retries")
        out_of_retries = isinstance(retries, int) and isinstance(most, int) and retries >= most
        return out_of_retries or task.get("error_message") == "deadline exceeded"
    return status in TERMINAL


class TaskFailed(Exception):
    """The task ended failed or cancelled; ``task`` is its last state."""

    def __init__(self, task: Mapping[str, Any]) -> None:
        super().__init__(f"task {task.get('id')} {task.get('status')}: {task.get('error_message')}")
        self.task = dict(task)


class Orchestrator:
    """The orchestrator's API for a producer or a dashboard holding ``token``."""

    def __init__(self, url: str, token: str, *, source: DropletId = 1, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.source = source
        self.http = httpx.AsyncClient(timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Orchestrator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get(self, path: str, **params: Any) -> dict[str, Any]:
        return payload_of(await send(self.http, "GET", self.url + path, params=params or None))

    async def create_task(
        self,
        task_type: str,
        title: str,
        payload: Mapping[str, Any] | None = None,
        *,
        required_capability: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        deadline: str | None = None,
        description: str | None = None,
        trace_id: str | None = None,
    ) -> dict[str, Any]:
        """Creates a task; answers ``{"task_id", "trace_id", "status", ...}``. The trace id
        (a new one unless given) is sent with every retry, so a retry after a lost answer
        gets the same task, never a second one."""
        data: dict[str, Any] = {"task_type": task_type, "title": title, "payload": dict(payload or {})}
        for key, value in (
            ("required_capability", required_capability),
            ("priority", priority),
            ("max_retries", max_retries),
            ("deadline", deadline),
            ("description", description),
        ):
            if value is not None:
                data[key] = value
        body = envelope(self.source, data, trace_id=trace_id or str(uuid.uuid4()))
        return payload_of(await send(self.http, "POST", self.url + "/tasks", json=body))

    async def get_task(self, task_id: int) -> dict[str, Any]:
        """The task with its ``state_history``."""
        task = (await self._get(f"/tasks/{task_id}")).get("task")
        if not isinstance(task, dict):
            raise OrchestratorError(200, "the answer has no task")
        return task

    async def explain(self, task_id: int) -> dict[str, Any]:
        """Why the task waits (``reason``, ``candidates``) and its attempts' decisions."""
        return await self._get(f"/tasks/{task_id}/explain")

    async def cancel(self, task_id: int) -> dict[str, Any]:
        return payload_of(await send(self.http, "DELETE", self.url + f"/tasks/{task_id}"))

    async def wait(self, task_id: int, timeout: float = 60.0, poll: float = 0.25) -> dict[str, Any]:
        """The task once it has ended: completed, cancelled, or failed for good (a failed
        task with retries left comes back to pending, so it is waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            task = await self.get_task(task_id)
            if ended(task):
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} is still {task.get('status')} after {timeout} s")
            await asyncio.sleep(poll)

    async def wait_for_result(self, task_id: int, timeout: float = 60.0) -> Any:
        """The result of a completed task; TaskFailed when it failed or was cancelled."""
        task = await self.wait(task_id, timeout)
        if task.get("status") != "completed":
            raise TaskFailed(task)
        return task.get("result")

    def follow_tasks(self, *, after: int | None = None, **filters: str) -> TaskFeed:
        """The ``/ws/tasks`` feed (``task_type``, ``status``, ``droplet_id`` filters)."""
        return TaskFeed(self.url, lambda: self.token, after=after, filters=filters)


class TaskFeed:
    """Task events as they commit, one payload per event (``event``, ``event_id``,
    ``task``). A dropped socket is reconnected with ``?after=<the last event_id>``, so no
    event is lost or repeated; past the retention, a ``resync_required`` event comes first.

    ``async for event in feed: ...``; ``await feed.close()`` ends it.
    """

    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        *,
        path: str = "/ws/tasks",
        after: int | None = None,
        filters: Mapping[str, str] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self._ws_base = url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + path
        self._token = token
        self._filters = {k: str(v) for k, v in (filters or {}).items()}
        #: The last event id received; reconnections resume after it.
        self.last_event_id = after
        #: How many times the feed connected (the first time included).
        self.connections = 0
        self._max_backoff = max_backoff
        self._closed = False
        self._ws: Any = None

    def _address(self) -> str:
        query = {"token": self._token(), **self._filters}
        if self.last_event_id is not None:
            query["after"] = str(self.last_event_id)
        return f"{self._ws_base}?{urlencode(query)}"

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        backoff = 0.1
        while not self._closed:
            try:
                async with connect(self._address(), open_timeout=10, max_size=16 * 1024 * 1024) as ws:
                    self._ws = ws
                    self.connections += 1
                    backoff = 0.1
                    async for frame in ws:
                        event = _event(frame)
                        if event is None:
                            continue
                        event_id = event.get("event_id")
                        if isinstance(event_id, int):
                            if self.last_event_id is not None and event_id <= self.last_event_id:
                                continue  # never hand the same event out twice
                            self.last_event_id = event_id
                        yield event
            except InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403, 422):
                    raise OrchestratorError(status, "the feed refused the connection") from e
                log.info("feed refused with HTTP %s; retrying", status)
            except (OSError, WebSocketException, asyncio.TimeoutError) as e:
                log.info("feed dropped (%s); resuming after event %s", type(e).__name__, self.last_event_id)
            finally:
                self._ws = None
            if self._closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)


def _event(frame: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("message_type") != "event":
        return None
    payload = message.get("payload")
    return payload if isinstance(payload, dict) else None
