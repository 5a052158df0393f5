"""A whole droplet: `verify` tasks, answered with what they were sent.

ORCH=http://127.0.0.1:8000 DROPLET_ID=42 PORT=8002 DROPLET_TOKEN=... JWT_SECRET_KEY=... \
    python examples/echo_droplet.py
"""

import os

from orchestrator_client import Droplet, Task, asgi_app, run

droplet = Droplet(
    os.environ.get("ORCH", "http://127.0.0.1:8000"),
    int(os.environ.get("DROPLET_ID", "42")),
    capabilities=[],
    endpoint=f"http://127.0.0.1:{os.environ.get('PORT', '8002')}",
    token=os.environ["DROPLET_TOKEN"],  # checks what it is sent with JWT_SECRET_KEY
    max_concurrent_tasks=4,
)


@droplet.task("verify")
async def verify(task: Task) -> dict:
    return {"verified": True, "code_url": task.payload.get("code_url")}


app = asgi_app(droplet)  # or include fastapi_router(droplet) in your FastAPI app

if __name__ == "__main__":
    run(droplet, "127.0.0.1", int(os.environ.get("PORT", "8002")))
