"""The wire format shared by the droplet and the client: UDC envelopes, errors, retries."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx

DropletId = int | str

#: The orchestrator's own droplet id.
ORCHESTRATOR_ID = 10


class OrchestratorError(Exception):
    """The orchestrator answered with an error (its `detail` is kept)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def envelope(
    source: DropletId,
    payload: dict[str, Any],
    message_type: str = "command",
    trace_id: str | None = None,
    target: DropletId = ORCHESTRATOR_ID,
) -> dict[str, Any]:
    """A UDC envelope around `payload`."""
    return {
        "udc_version": "1.0",
        "trace_id": trace_id or str(uuid.uuid4()),
        "source": source,
        "target": target,
        "message_type": message_type,
        "payload": payload,
        "timestamp": now_iso(),
    }


def detail_of(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return body["detail"]
    return body


def payload_of(response: httpx.Response) -> dict[str, Any]:
    """The payload of a response envelope (or the bare body), raising on an error status."""
    if response.status_code >= 400:
        raise OrchestratorError(response.status_code, detail_of(response))
    try:
        body = response.json()
    except ValueError as e:
        raise OrchestratorError(response.status_code, "the answer is not JSON") from e
    if isinstance(body, dict) and isinstance(body.get("payload"), dict):
        return dict(body["payload"])
    if isinstance(body, dict):
        return body
    raise OrchestratorError(response.status_code, "the answer is not a JSON object")


def retry_after(response: httpx.Response, default: float) -> float:
    """The wait a 429 or 503 asks for, within [0.05, 60] seconds."""
    try:
        return min(max(float(response.headers.get("retry-after", default)), 0.05), 60.0)
    except ValueError:
        return default


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    attempts: int = 5,
    **kwargs: Any,
) -> httpx.Response:
    """One request, repeated while the orchestrator is away, overloaded (5xx, 429) or
    unreachable, at most `attempts` times with backoff. Any other answer is returned."""
    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            response = await http.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == attempts:
                raise
        else:
            if response.status_code != 429 and response.status_code < 500:
                return response
            if attempt == attempts:
                return response
            if response.status_code == 429:
                await asyncio.sleep(retry_after(response, delay))
                continue
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")
