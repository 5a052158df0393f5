"""A droplet: registration, heartbeats, and the tasks the orchestrator sends it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._wire import DropletId, OrchestratorError, envelope, payload_of, send
from .auth import Unauthorized, Verifier

log = logging.getLogger("orchestrator_client.droplet")

#: What `handle_message` answers: HTTP status, JSON body, extra headers.
Answer = tuple[int, dict[str, Any], dict[str, str]]


@dataclass(frozen=True)
class Task:
    """A task as `execute_task` delivers it."""

    id: int
    attempt: int | None
    task_type: str
    title: str
    payload: dict[str, Any]
    trace_id: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_message(cls, task: Mapping[str, Any]) -> Task:
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ValueError("task.id must be an integer")
        attempt = task.get("attempt")
        payload = task.get("payload")
        return cls(
            id=task_id,
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            task_type=str(task.get("task_type") or ""),
            title=str(task.get("title") or ""),
            payload=dict(payload) if isinstance(payload, dict) else {},
            trace_id=task.get("trace_id") if isinstance(task.get("trace_id"), str) else None,
            raw=dict(task),
        )


Handler = Callable[[Task], Awaitable[Any]]


class Stale(Exception):
    """Another attempt owns the task, or it is no longer ours: stop quietly."""


@dataclass
class _Run:
    attempt: int | None
    job: asyncio.Task[None] | None = None
    outcome: str = "running"  # then completed, failed, cancelled or stale


class Droplet:
    """A droplet of the mesh.

    ``token`` is this droplet's bearer for the orchestrator (or give ``registry_url`` and
    ``registry_key`` to fetch one from the Registry); ``verifier`` checks the messages the
    orchestrator sends (default: HS256 with ``ORCHESTRATOR_JWT_SECRET`` or
    ``JWT_SECRET_KEY`` from the environment).
    """

    def __init__(
        self,
        orchestrator_url: str,
        droplet_id: int,
        capabilities: Sequence[str],
        endpoint: str,
        token: str | None = None,
        *,
        registry_url: str | None = None,
        registry_key: str | None = None,
        verifier: Verifier | None = None,
        name: str | None = None,
        steward: str | None = None,
        version: str = "1.0.0",
        capability_schemas: Mapping[str, Any] | None = None,
        max_concurrent_tasks: int | None = None,
        id_form: str = "int",
        retry_after_seconds: int = 1,
        remember_tasks: int = 10_000,
    ) -> None:
        if token is None and not (registry_url and registry_key):
            raise ValueError("give a token, or registry_url and registry_key")
        if verifier is None:
            secret = os.environ.get("ORCHESTRATOR_JWT_SECRET") or os.environ.get("JWT_SECRET_KEY")
            if not secret:
                raise ValueError("give a verifier (or set JWT_SECRET_KEY)")
            verifier = Verifier(secret=secret)
        self.url = orchestrator_url.rstrip("/")
        self.droplet_id = droplet_id
        self.capabilities = list(capabilities)
        self.endpoint = endpoint
        self.name = name or f"droplet-{droplet_id}"
        self.steward = steward
        self.version = version
        self.capability_schemas = dict(capability_schemas) if capability_schemas else None
        #: Tasks run at once; a delivery past it is answered 429. May be changed at run time.
        self.max_concurrent_tasks = max_concurrent_tasks
        self.verifier = verifier
        self.heartbeat_interval = 60.0
        #: Deliveries answered 429 because the droplet was full.
        self.busy_answers = 0
        self._token = token
        self._registry = (registry_url.rstrip("/"), registry_key) if registry_url and registry_key else None
        self._source: DropletId = f"droplet-{droplet_id}" if id_form == "string" else droplet_id
        self._retry_after = str(retry_after_seconds)
        self._remember = remember_tasks
        self._handlers: dict[str, Handler] = {}
        self._runs: OrderedDict[int, _Run] = OrderedDict()
        self._dropped: OrderedDict[int, None] = OrderedDict()  # the last stale task ids
        self._http: httpx.AsyncClient | None = None
        self._heartbeats: asyncio.Task[None] | None = None

    # -- handlers ---------------------------------------------------------------------
    def task(self, capability: str = "*") -> Callable[[Handler], Handler]:
        """Registers the handler of a capability (``"*"``: any task without a handler)."""

        def register(handler: Handler) -> Handler:
            self._handlers[capability] = handler
            if capability != "*" and capability not in self.capabilities:
                self.capabilities.append(capability)
            return handler

        return register

    @property
    def running(self) -> int:
        return sum(1 for r in self._runs.values() if r.outcome == "running")

    def outcome(self, task_id: int) -> str | None:
        """What became of a task this droplet was sent: running, completed, failed,
        cancelled or stale (another attempt owns it); None if never sent."""
        run = self._runs.get(task_id)
        if run is not None:
            return run.outcome
        return "stale" if task_id in self._dropped else None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Registers (retrying while the orchestrator is away) and starts heartbeating."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        await self.register(wait=True)
        self._heartbeats = asyncio.create_task(self._heartbeat_loop())

    async def stop(self) -> None:
        """Stops heartbeating and cancels the running tasks (the orchestrator requeues them)."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
            self._heartbeats = None
        jobs = [r.job for r in self._runs.values() if r.job is not None and not r.job.done()]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> Droplet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- talking to the orchestrator -----------------------------------------------------
    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0)
        return self._http

    async def _bearer(self, renew: bool = False) -> str:
        if self._registry is not None and (self._token is None or renew):
            base, key = self._registry
            response = await send(
                self.http,
                "POST",
                f"{base}/auth/token",
                params={"droplet_id": self.droplet_id},
                headers={"X-Registry-Key": key},
            )
            body = payload_of(response)
            token = body.get("token") or body.get("access_token")
            if not isinstance(token, str):
                raise OrchestratorError(response.status_code, "the Registry sent no token")
            self._token = token
        assert self._token is not None
        return self._token

    async def _call(
        self, method: str, path: str, payload: dict[str, Any], kind: str = "command", attempts: int = 5
    ) -> httpx.Response:
        body = envelope(self._source, payload, kind)
        response = await send(
            self.http,
            method,
            self.url + path,
            attempts=attempts,
            json=body,
            headers={"Authorization": f"Bearer {await self._bearer()}"},
        )
        if response.status_code == 401 and self._registry is not None:
            headers = {"Authorization": f"Bearer {await self._bearer(renew=True)}"}
            response = await send(self.http, method, self.url + path, json=body, headers=headers)
        return response

    async def register(self, wait: bool = False) -> dict[str, Any]:
        """Registers; with ``wait`` keeps trying (backoff up to 10 s) while the
        orchestrator cannot be reached or answers 5xx. A 4xx is raised."""
        payload: dict[str, Any] = {
            "droplet_id": self.droplet_id,
            "name": self.name,
            "endpoint": self.endpoint,
            "capabilities": self.capabilities,
            "version": self.version,
            "status": "active",
        }
        if self.steward:
            payload["steward"] = self.steward
        if self.capability_schemas:
            payload["capability_schemas"] = self.capability_schemas
        if self.max_concurrent_tasks is not None:
            payload["max_concurrent_tasks"] = self.max_concurrent_tasks
        delay = 0.5
        while True:
            try:
                answer = payload_of(await self._call("POST", "/droplets/register", payload))
                break
            except (httpx.TransportError, OrchestratorError) as e:
                retryable = isinstance(e, httpx.TransportError) or e.status >= 500 or e.status == 429
                if not (wait and retryable):
                    raise
                log.warning("registration failed (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        interval = answer.get("heartbeat_interval_seconds")
        if isinstance(interval, (int, float)) and interval > 0:
            self.heartbeat_interval = float(interval)
        log.info("registered droplet %s (heartbeat every %s s)", self.droplet_id, self.heartbeat_interval)
        return answer

    async def heartbeat(self) -> None:
        """One heartbeat; a droplet the orchestrator does not know registers again."""
        status = {"status": "active", "metrics": {"running_tasks": self.running}}
        response = await self._call(
            "POST", f"/droplets/{self.droplet_id}/heartbeat", status, "heartbeat", attempts=2
        )
        if response.status_code == 404:
            log.info("the orchestrator does not know droplet %s; registering again", self.droplet_id)
            await self.register(wait=True)
            return
        payload_of(response)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except (httpx.TransportError, OrchestratorError) as e:
                log.warning("heartbeat failed: %s", e)

    async def report(self, task: Task, status: str, **fields: Any) -> None:
        """PATCHes the task's status for this attempt; Stale when the orchestrator says the
        task is no longer this attempt's (409) or no longer ours (403, 404)."""
        payload: dict[str, Any] = {"status": status, **fields}
        if task.attempt is not None:
            payload["attempt"] = task.attempt
        response = await self._call("PATCH", f"/tasks/{task.id}", payload)
        if response.status_code in (403, 404, 409):
            raise Stale(str(payload_of_safe(response)))
        payload_of(response)

    # -- messages from the orchestrator ----------------------------------------------------
    async def handle_message(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """Answers one POST to /message (``headers`` with lower-case keys)."""
        try:
            message = json.loads(body)
        except ValueError:
            return 400, {"detail": "the body is not JSON"}, {}
        if not isinstance(message, dict):
            return 400, {"detail": "the body is not a JSON object"}, {}
        try:
            self.verifier.verify(headers, message)
        except Unauthorized as e:
            return 401, {"detail": str(e)}, {"WWW-Authenticate": "Bearer"}
        payload = message.get("payload")
        if not isinstance(payload, dict):
            return 422, {"detail": "payload must be an object"}, {}
        command = payload.get("command")
        if message.get("message_type") != "command" or command is None:
            return 200, self._answer(message, {"received": True}), {}
        if command == "execute_task":
            return self._execute(message, payload.get("task"))
        if command == "cancel_task":
            return self._cancel(message, payload)
        return (
            422,
            {
                "detail": f"unknown command {str(command)[:50]!r}; "
                "this droplet takes execute_task and cancel_task"
            },
            {},
        )

    def _answer(self, message: Mapping[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return envelope(
            self._source,
            payload,
            "response",
            str(message.get("trace_id") or "") or None,
            message.get("source") or 10,
        )

    def _execute(self, message: Mapping[str, Any], raw: Any) -> Answer:
        if not isinstance(raw, dict):
            return 422, {"detail": "execute_task needs a task object"}, {}
        try:
            task = Task.from_message(raw)
        except ValueError as e:
            return 422, {"detail": str(e)}, {}
        capability = raw.get("required_capability")
        handler = (
            self._handlers.get(str(capability))
            or self._handlers.get(task.task_type)
            or self._handlers.get("*")
        )
        if handler is None:
            return 422, {"detail": f"no handler for capability {str(capability)[:100]!r}"}, {}
        run = self._runs.get(task.id)
        if run is not None and (run.attempt or 0) >= (task.attempt or 0):
            # A redelivery: the answer to the first one was lost. Run once.
            return (
                200,
                self._answer(message, {"received": True, "task_id": task.id, "status": run.outcome}),
                {},
            )
        if run is not None and run.job is not None and not run.job.done():
            log.info("task %s attempt %s supersedes attempt %s", task.id, task.attempt, run.attempt)
            run.outcome = "stale"
            run.job.cancel()
        limit = self.max_concurrent_tasks
        if limit is not None and self.running >= limit:
            self.busy_answers += 1
            return (
                429,
                {"detail": f"droplet {self.droplet_id} is running {self.running} tasks (limit {limit})"},
                {"Retry-After": self._retry_after},
            )
        new = _Run(task.attempt)
        self._runs[task.id] = new
        self._runs.move_to_end(task.id)
        while len(self._runs) > self._remember:
            oldest = next(iter(self._runs))
            if self._runs[oldest].outcome == "running":
                break
            del self._runs[oldest]
        new.job = asyncio.create_task(self._run(task, handler, new), name=f"task-{task.id}")
        return 200, self._answer(message, {"received": True, "task_id": task.id, "status": "accepted"}), {}

    def _cancel(self, message: Mapping[str, Any], payload: Mapping[str, Any]) -> Answer:
        task_id = payload.get("task_id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            return 422, {"detail": "cancel_task needs an integer task_id"}, {}
        attempt = payload.get("attempt")
        run = self._runs.get(task_id)
        cancelled = False
        if (
            run is not None
            and run.outcome == "running"
            and (not isinstance(attempt, int) or run.attempt is None or attempt >= run.attempt)
        ):
            run.outcome = "cancelled"
            if run.job is not None:
                run.job.cancel()
            cancelled = True
            log.info("task %s cancelled by the orchestrator", task_id)
        return 200, self._answer(message, {"received": True, "task_id": task_id, "cancelled": cancelled}), {}

    async def _run(self, task: Task, handler: Handler, run: _Run) -> None:
        try:
            await self.report(task, "in_progress")
            try:
                result = await handler(task)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the handler's failure is the task's
                log.info("task %s failed: %s", task.id, type(e).__name__)
                await self.report(task, "failed", error_message=(str(e) or type(e).__name__)[:2000])
                run.outcome = "failed"
                return
            if not isinstance(result, dict):
                result = {"result": result}
            try:
                json.dumps(result)
            except (TypeError, ValueError) as e:
                log.info("task %s: its result is not JSON (%s)", task.id, e)
                await self.report(task, "failed", error_message=f"the result is not JSON: {e}"[:2000])
                run.outcome = "failed"
                return
            await self.report(task, "completed", result=result)
            run.outcome = "completed"
        except asyncio.CancelledError:
            if run.outcome == "running":
                run.outcome = "cancelled"
        except Stale as e:
            log.info("task %s attempt %s is no longer ours; dropped (%s)", task.id, task.attempt, e)
            run.outcome = "stale"
            # Forgotten, so that a forged delivery (a replayed token, an invented attempt)
            # cannot stand in for a real one later: every run starts with an accepted
            # in_progress, so a repeated stale delivery runs nothing either.
            if self._runs.get(task.id) is run:
                del self._runs[task.id]
            self._dropped[task.id] = None
            while len(self._dropped) > 1000:
                self._dropped.popitem(last=False)
        except (httpx.TransportError, OrchestratorError) as e:
            log.warning("task %s: could not report to the orchestrator: %s", task.id, e)
            run.outcome = "failed"
        except Exception:  # never leave a run counted as running
            log.exception("task %s: unexpected error in the droplet library", task.id)
            run.outcome = "failed"


def payload_of_safe(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text[:200])
    except (ValueError, AttributeError):
        return response.text[:200]
