"""Checking that a message comes from the orchestrator, as the mesh's droplets do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from ._wire import ORCHESTRATOR_ID


class Unauthorized(Exception):
    """The caller is not the orchestrator (the reason is safe to show: it holds no token)."""


@dataclass(frozen=True)
class Verifier:
    """How to check the orchestrator's bearer token.

    `secret` (HS256, the shared `JWT_SECRET_KEY`) or `public_key` (RS256 PEM: the
    orchestrator's `ORCHESTRATOR_PRIVATE_KEY` counterpart or the Registry's key), with the
    `issuer` and `audience` the tokens carry when set. `require_signature` also demands the
    envelope's `signature` (the Registry-issued token, as droplet-2 does).
    """

    secret: str | None = None
    public_key: str | None = None
    issuer: str | None = None
    audience: str | None = None
    require_signature: bool = False
    orchestrator_id: int = ORCHESTRATOR_ID
    leeway_seconds: int = 30

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.public_key is None):
            raise ValueError("give exactly one of secret (HS256) or public_key (RS256)")
        if self.secret is not None and not self.secret.strip():
            raise ValueError("an empty secret would accept tokens anyone can sign")
        if self.public_key is not None and "BEGIN" not in self.public_key:
            raise ValueError("public_key must be a PEM public key")

    def _decode(self, token: str) -> dict[str, Any]:
        key, algorithm = (
            (self.secret, "HS256") if self.secret is not None else (self.public_key or "", "RS256")
        )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthorized("token expired") from e
        except jwt.InvalidTokenError as e:
            raise Unauthorized(f"invalid token ({type(e).__name__})") from e
        if not isinstance(claims, dict):
            raise Unauthorized("invalid token")
        return claims

    def _is_orchestrator(self, claims: Mapping[str, Any]) -> bool:
        me = self.orchestrator_id
        sub = claims.get("sub")
        return claims.get("droplet_id") == me or sub in (f"droplet-{me}", str(me))

    def verify(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
        """The bearer's claims, or Unauthorized. `headers` keys are lower case."""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token")
        claims = self._decode(token.strip())
        if not self._is_orchestrator(claims):
            raise Unauthorized("the token is not the orchestrator's")
        if self.require_signature:
            signature = body.get("signature")
            if not isinstance(signature, str) or not signature:
                raise Unauthorized("missing signature")
            if not self._is_orchestrator(self._decode(signature)):
                raise Unauthorized("the signature is not the orchestrator's")
        return claims
