"""Droplet 12 (chat orchestrator) on the library: its orchestrator side only.

The original (github.com/jamessunheart/fpai-sessions, droplets/hteam/droplet-12) writes the
protocol by hand: about 330 non-blank lines (token, registration with retries, heartbeat
loop, /message, python-jose bearer verification, the envelope models) that acknowledge an
execute_task and never run or report it. This file does all of it, and runs the task,
reports it with its attempt, runs a redelivery once, stops on cancel_task, and answers 429
when full, in about 40. Its own code below is ours, not a copy.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from orchestrator_client import Droplet, Task, Verifier, fastapi_router

droplet = Droplet(
    os.environ.get("ORCHESTRATOR_URL", "https://drop10.fullpotential.ai"),
    12,
    capabilities=["natural_language_understanding", "conversation_memory", "multi_source_messaging"],
    endpoint=os.environ.get("DROPLET_URL", "https://drop12.fullpotential.ai"),
    token=os.environ.get("ORCHESTRATOR_JWT"),
    registry_url=os.environ.get("REGISTRY_URL"),  # or fetch a token with the Registry key
    registry_key=os.environ.get("DROPLET_SECRET"),
    verifier=Verifier(secret=os.environ["JWT_SECRET_KEY"]),  # python-jose HS256, as droplet-12
    name="Chat Orchestrator",
    steward="Zainab",
    id_form="string",  # droplet-12 writes "droplet-12" / "droplet-10"
    max_concurrent_tasks=8,
)


@droplet.task("natural_language_understanding")
async def understand(task: Task) -> dict:
    message = str(task.payload.get("message", ""))
    return {"intent": "question" if message.rstrip().endswith("?") else "statement", "message": message}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with droplet:  # register (retrying), heartbeat; stop cleanly
        yield


app = FastAPI(title="Chat Orchestrator Droplet 12", lifespan=lifespan)
app.include_router(fastapi_router(droplet))
