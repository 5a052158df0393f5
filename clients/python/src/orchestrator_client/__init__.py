"""A library for the orchestrator's droplets, producers and dashboards."""

from ._wire import OrchestratorError, envelope
from .asgi import asgi_app, fastapi_router, run
from .auth import Unauthorized, Verifier
from .client import Orchestrator, TaskFailed, TaskFeed
from .droplet import Droplet, Task

__all__ = [
    "Droplet",
    "Orchestrator",
    "OrchestratorError",
    "Task",
    "TaskFailed",
    "TaskFeed",
    "Unauthorized",
    "Verifier",
    "asgi_app",
    "envelope",
    "fastapi_router",
    "run",
]
