"""Droplet-2's way: the orchestrator holds a Registry-issued RS256 token and sends it as the
bearer and as the envelope's `signature`; the library checks both by the Registry's key."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from orchestrator_client import Orchestrator, Task, Verifier, envelope

from .conftest import run_service

ISSUER, AUDIENCE = "registry.fullpotential.ai", "fullpotential.droplets"


def rsa_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def registry_token(private: str, droplet_id: int) -> str:
    now = int(time.time())
    claims = {
        "droplet_id": droplet_id,
        "sub": f"droplet-{droplet_id}",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, private, algorithm="RS256")


async def test_a_droplet_checking_the_registry_bearer_and_signature_runs_its_task(serve) -> None:
    private, public = rsa_pair()
    held = registry_token(private, 10)
    verifier = Verifier(public_key=public, issuer=ISSUER, audience=AUDIENCE, require_signature=True)
    with run_service({"REGISTRY_PUBLIC_KEY": public, "REGISTRY_TOKEN": held}) as service:
        capability = f"cap-{uuid.uuid4().hex[:8]}"
        droplet = await serve([capability], on=service, verifier=verifier, id_form="string")

        @droplet.task(capability)
        async def work(task: Task) -> dict[str, str]:
            return {"signed": "yes"}

        await droplet.start()
        async with Orchestrator(service.url, service.token(1, ["read", "write", "admin"])) as producer:
            created = await producer.create_task("signed", "Signed", required_capability=capability)
            assert await producer.wait_for_result(created["task_id"], timeout=20) == {"signed": "yes"}
        # Without the signature, or signed by another key, nothing is taken.
        task = {"id": 99, "attempt": 1, "task_type": "x", "title": "x", "required_capability": capability}
        body = envelope(10, {"command": "execute_task", "task": task}, target=droplet.droplet_id)
        other = registry_token(rsa_pair()[0], 10)
        async with httpx.AsyncClient() as http:
            for bearer, signature in ((held, None), (held, other), (other, held)):
                sent = {**body, **({"signature": signature} if signature else {})}
                answer = await http.post(
                    f"{droplet.endpoint}/message", json=sent, headers={"Authorization": f"Bearer {bearer}"}
                )
                assert answer.status_code == 401, answer.text
        await droplet.stop()


def test_a_verifier_refuses_a_key_that_checks_nothing() -> None:
    for bad in ({"secret": ""}, {"secret": "  "}, {"public_key": "not a pem"}, {}):
        with pytest.raises(ValueError):
            Verifier(**bad)
