"""Remote payload codec for the Temporal Web UI and the `temporal` CLI.

With `CP_CODEC__KEYS` set, every payload in Temporal is encrypted (see
`control_plane.core.codec`), so the UI shows ciphertext until it can ask this endpoint
to decode. `POST /api/v1/temporal-codec/decode` (and `/encode`) speak Temporal's remote
codec JSON: `{"payloads": [{"metadata": {"encoding": "<base64>", ...}, "data":
"<base64>"}]}` in and out. Only tenant admins may call them.

Pointing the tools at it:

- Dev server UI: `temporal server start-dev --ui-codec-endpoint
  http://127.0.0.1:8000/api/v1/temporal-codec` (or set the endpoint in the UI's "Codec
  Server" settings). The browser calls the endpoint itself, so its origin must be in
  `CP_API__TEMPORAL_UI_ORIGINS` (default: the dev UI on port 8233), and the request must
  carry a bearer token this API accepts: configure the UI to pass its access token
  (`codec.passAccessToken: true` in the UI server config; the UI and this API then share
  the identity provider, e.g. Keycloak). Browsers only send it to an https endpoint on
  some UI versions, so put TLS in front of the API outside a laptop.
- CLI: `temporal workflow show -w <id> --codec-endpoint
  http://127.0.0.1:8000/api/v1/temporal-codec --codec-auth "Bearer $TOKEN"`.

CORS applies to these two paths only (`TemporalCodecCORS`); preflight requests are
answered without authentication, the codec calls themselves need the bearer token.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from api.deps import TemporalDep, TenantAdmin
from api.errors import problems
from control_plane.core.codec import CodecError
from control_plane.core.errors import BadRequest

PREFIX = "/api/v1/temporal-codec"

router = APIRouter(prefix=PREFIX, tags=["temporal"])


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64") from None
    return value


Base64Text = Annotated[str, Field(json_schema_extra={"format": "byte"})]


class CodecPayload(BaseModel):
    """A Temporal `Payload` in protobuf JSON: base64 metadata values and data."""

    metadata: dict[str, Base64Text] = Field(default_factory=dict)
    data: Base64Text = ""

    @field_validator("metadata")
    @classmethod
    def _metadata_base64(cls, value: dict[str, str]) -> dict[str, str]:
        for item in value.values():
            _base64(item)
        return value

    @field_validator("data")
    @classmethod
    def _data_base64(cls, value: str) -> str:
        return _base64(value)

    def to_temporal(self) -> Payload:
        return Payload(
            metadata={k: base64.b64decode(v) for k, v in self.metadata.items()},
            data=base64.b64decode(self.data),
        )

    @classmethod
    def from_temporal(cls, payload: Payload) -> CodecPayload:
        return cls(
            metadata={k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
            data=base64.b64encode(payload.data).decode(),
        )


class CodecPayloads(BaseModel):
    payloads: list[CodecPayload] = Field(max_length=10_000)


async def _apply(client: Client, body: CodecPayloads, *, decode: bool) -> CodecPayloads:
    codec = client.data_converter.payload_codec
    if codec is None:
        # Payload encryption is off here: what Temporal holds is already clear.
        return body
    payloads = [p.to_temporal() for p in body.payloads]
    try:
        result = await (codec.decode(payloads) if decode else codec.encode(payloads))
    except CodecError as err:
        raise BadRequest(str(err)) from None
    return CodecPayloads(payloads=[CodecPayload.from_temporal(p) for p in result])


@router.post("/decode", response_model=CodecPayloads, responses=problems(400, 401, 403))
async def decode_payloads(
    body: CodecPayloads, _: TenantAdmin, client: TemporalDep
) -> CodecPayloads:
    """Decrypt payloads (those that are not encrypted come back unchanged)."""
    return await _apply(client, body, decode=True)


@router.post("/encode", response_model=CodecPayloads, responses=problems(400, 401, 403))
async def encode_payloads(
    body: CodecPayloads, _: TenantAdmin, client: TemporalDep
) -> CodecPayloads:
    """Encrypt payloads with the active codec key (unchanged when encryption is off)."""
    return await _apply(client, body, decode=False)


class TemporalCodecCORS:
    """CORS for the codec endpoints only, so the Temporal UI (another origin) may call
    them while the rest of the API keeps its own CORS policy."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST"],
            # The UI sends Authorization, Content-Type and X-Namespace (and more with
            # some identity setups); the origin list is what restricts callers.
            allow_headers=["*"],
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
