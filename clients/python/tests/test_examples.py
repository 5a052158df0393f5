"""The examples, run as written against the real orchestrator (with their ASGI lifespans)."""

from __future__ import annotations

import asyncio
import runpy
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from orchestrator_client import Orchestrator

from .conftest import SECRET, free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


async def serve_example(name: str, port: int) -> tuple[dict[str, Any], uvicorn.Server, asyncio.Task[Any]]:
    module = runpy.run_path(str(EXAMPLES / name))
    server = uvicorn.Server(
        uvicorn.Config(module["app"], host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    return module, server, task


@pytest.mark.parametrize(
    ("example", "droplet_id", "capability", "payload", "result"),
    [
        (
            "echo_droplet.py",
            42,
            "verify",
            {"code_url": "https://example.com/d14"},
            {"verified": True, "code_url": "https://example.com/d14"},
        ),
        (
            "droplet12.py",
            12,
            "natural_language_understanding",
            {"message": "is it up?"},
            {"intent": "question", "message": "is it up?"},
        ),
    ],
)
async def test_an_example_droplet_runs_a_producers_task(
    service,
    producer: Orchestrator,
    monkeypatch: pytest.MonkeyPatch,
    example: str,
    droplet_id: int,
    capability: str,
    payload: dict,
    result: dict,
) -> None:
    port = free_port()
    token = service.token(droplet_id, ["read", "write"])
    for key, value in {
        "ORCH": service.url,
        "ORCHESTRATOR_URL": service.url,
        "DROPLET_ID": str(droplet_id),
        "PORT": str(port),
        "DROPLET_URL": f"http://127.0.0.1:{port}",
        "DROPLET_TOKEN": token,
        "ORCHESTRATOR_JWT": token,
        "JWT_SECRET_KEY": SECRET,
    }.items():
        monkeypatch.setenv(key, value)
    module, server, serving = await serve_example(example, port)
    try:
        created = await producer.create_task(capability, "Example", payload, required_capability=capability)
        assert await producer.wait_for_result(created["task_id"], timeout=20) == result
        droplet = await producer._get(f"/droplets/{droplet_id}")
        assert "active" in str(droplet)
    finally:
        server.should_exit = True
        await serving
    assert module["droplet"]._heartbeats is None  # the lifespan stopped it
