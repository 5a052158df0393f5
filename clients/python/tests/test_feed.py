"""A dashboard following /ws/tasks through a connection that drops."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from orchestrator_client import Orchestrator

from .conftest import Proxy, eventually, free_port


async def collect(feed: Any, into: list[dict]) -> None:
    async for event in feed:
        into.append(event)


async def test_a_dashboard_resumes_after_a_dropped_socket_without_losing_or_repeating(
    service, producer: Orchestrator
) -> None:
    kind = f"feed-{uuid.uuid4().hex[:8]}"
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"  # no droplet: each task makes one event
    proxy = Proxy(free_port(), int(service.url.rsplit(":", 1)[1]))
    await proxy.start()
    dashboard = Orchestrator(f"http://127.0.0.1:{proxy.port}", producer.token)
    reference, resumed = producer.follow_tasks(task_type=kind), dashboard.follow_tasks(task_type=kind)
    seen_ref: list[dict] = []
    seen: list[dict] = []
    readers = [asyncio.create_task(collect(reference, seen_ref)), asyncio.create_task(collect(resumed, seen))]
    try:
        await eventually(lambda: reference.connections and resumed.connections, what="both feeds")
        await asyncio.sleep(0.3)
        for i in range(3):
            await producer.create_task(kind, f"before {i}", required_capability=nobody)
        await eventually(lambda: len(seen) == 3, what="three events before the drop")
        proxy.cut()  # the socket drops; reconnections fail while the proxy is down
        for i in range(4):
            await producer.create_task(kind, f"during {i}", required_capability=nobody)
        await eventually(lambda: len(seen_ref) == 7, what="the reference feed")
        await asyncio.sleep(0.5)
        assert len(seen) == 3
        proxy.up = True
        for i in range(2):
            await producer.create_task(kind, f"after {i}", required_capability=nobody)
        await eventually(lambda: len(seen) == 9, what="the resumed feed to catch up")
        await asyncio.sleep(0.3)
        ids = [e["event_id"] for e in seen]
        assert ids == [e["event_id"] for e in seen_ref]  # nothing lost, nothing repeated
        assert ids == sorted(set(ids))
        assert [e["task"]["title"] for e in seen][3:7] == [f"during {i}" for i in range(4)]
        assert resumed.connections >= 2
    finally:
        await reference.close()
        await resumed.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await dashboard.aclose()
        await proxy.stop()
