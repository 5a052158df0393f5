"""The real service binary over a fresh database, and droplets served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from orchestrator_client import Droplet, Orchestrator, Verifier, asgi_app

SECRET = "python-client-test-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parents[3]
SERVER = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432").rstrip("/")
_ids = itertools.count(100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", f"{SERVER}/postgres", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True,
        capture_output=True,
    )


class Service:
    def __init__(self, url: str) -> None:
        self.url = url

    def token(self, droplet_id: int, permissions: list[str]) -> str:
        body = {"droplet_id": droplet_id, "steward": "tests", "permissions": permissions}
        answer = httpx.post(f"{self.url}/token", json=body)
        answer.raise_for_status()
        return str(answer.json()["access_token"])


@contextlib.contextmanager
def run_service(extra_env: dict[str, str] | None = None) -> Iterator[Service]:
    """`orchestrator serve` on a free port over `orch_test_py_<random>`, dropped after."""
    binary = os.environ.get("ORCHESTRATOR_BIN", str(REPO / "target/debug/orchestrator"))
    database = f"orch_test_py_{uuid.uuid4().hex}"
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "development",
        "JWT_SECRET_KEY": SECRET,
        "DATABASE_URL": f"{SERVER}/{database}",
        "DATABASE_POOL_SIZE": "4",
        "DATABASE_MAX_OVERFLOW": "0",
        "LOG_LEVEL": "WARNING",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "TASK_ROUTER_INTERVAL": "1",
        "RETRY_BACKOFF_SECONDS": "1",
        "HEARTBEAT_INTERVAL": "2",
        **(extra_env or {}),
    }
    process = subprocess.Popen([binary, "serve"], env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the orchestrator exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the orchestrator did not start in 60 s")
            time.sleep(0.2)
        yield Service(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    with run_service() as running:
        yield running


@pytest.fixture
async def producer(service: Service) -> AsyncIterator[Orchestrator]:
    async with Orchestrator(service.url, service.token(1, ["read", "write", "admin"])) as client:
        yield client


class Proxy:
    """A TCP proxy to the orchestrator whose connections the test can cut."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.up = True
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


class Served:
    """A library droplet behind a real uvicorn on a free port."""

    def __init__(self, droplet: Droplet, server: uvicorn.Server, task: asyncio.Task[Any]) -> None:
        self.droplet, self._server, self._task = droplet, server, task

    async def stop(self) -> None:
        await self.droplet.stop()
        self._server.should_exit = True
        await self._task


@pytest.fixture
async def serve(service: Service) -> AsyncIterator[Any]:
    """`await serve(capabilities, **droplet_kwargs)`: a started droplet with a fresh id."""
    running: list[Served] = []
    proxies: list[Proxy] = []

    async def start(
        capabilities: list[str],
        app: Any = None,
        proxy: Proxy | None = None,
        on: Service | None = None,
        **kwargs: Any,
    ) -> Droplet:
        """With `proxy` (not started), the droplet's endpoint is the proxy to its server."""
        droplet_id = next(_ids)
        port = free_port()
        if proxy is not None:
            proxy.target = port
            await proxy.start()
            proxies.append(proxy)
        droplet = Droplet(
            (on or service).url,
            droplet_id,
            capabilities,
            f"http://127.0.0.1:{proxy.port if proxy else port}",
            (on or service).token(droplet_id, ["read", "write"]),
            **{"verifier": Verifier(secret=SECRET), **kwargs},
        )
        config = uvicorn.Config(
            app(droplet) if app else asgi_app(droplet),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        running.append(Served(droplet, server, task))
        return droplet

    yield start
    for served in running:
        await served.stop()
    for proxy in proxies:
        await proxy.stop()


async def eventually(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    """Polls `check()` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
