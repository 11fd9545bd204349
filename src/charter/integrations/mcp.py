"""An MCP server for the agent channel, on the official SDK's ``MCPServer`` (``mcp>=2,<3``).

``mcp_server(charter, directory=..., signer=...)`` serves the tools of
:class:`~charter.integrations.agent.AgentChannel` over streamable HTTP
(:meth:`CharterMCP.http_app`) or stdio (``token=``). It fails closed:

* **HTTP** — every request carries ``Authorization: Bearer <agent token>``;
  the SDK's bearer middleware answers 401 (``WWW-Authenticate: Bearer
  error="invalid_token"``) to a request without a valid one, before any MCP
  message is read, so an anonymous client cannot even list tools (what
  fastapi-mcp #324 let through). The SDK binds a session to the principal
  that opened it. Each message is authenticated again from its own request's
  header when it is handled: the principal is the request's, never the
  session's memory.
* **stdio** — the principal is configuration: ``token=`` (``charter mcp serve``
  reads ``CHARTER_AGENT_TOKEN``). No token, or one that does not authenticate,
  and the server refuses to start; each message authenticates it again, so it
  stops working when it expires or its agent is removed.

``tools/list`` answers the caller's tools only (:meth:`Charter.tools`);
``tools/call`` runs :meth:`AgentChannel.call` in a worker thread. A refusal is
a tool result with ``isError`` and the RFC 9457 problem as its structured
content (the agent can read why); it never leaks an unexposed action.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio.to_thread
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent, Tool, ToolAnnotations
from starlette.applications import Starlette

from ..actor import Actor
from ..agent_tools import ToolDefinition
from ..errors import CharterError, ConfigurationError, Unauthenticated
from ..gate import Charter
from ..tokens import TokenSigner
from .agent import AgentChannel, Directory

__all__ = ["CharterMCP", "CharterTokenVerifier", "mcp_server"]

#: The principal of the message being handled (set by the server's middleware).
_principal: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "charter_mcp_principal", default=None
)


class CharterTokenVerifier:
    """The SDK's ``TokenVerifier`` over agent tokens: a valid one is an ``AccessToken``."""

    def __init__(self, channel: AgentChannel) -> None:
        self.channel = channel

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            actor = await anyio.to_thread.run_sync(self.channel.authenticate, token)
        except CharterError:
            return None  # the SDK answers 401 invalid_token
        subject = actor.subject
        return AccessToken(
            token=token,
            client_id=actor.id,  # the agent
            scopes=sorted(actor.scopes or ()),
            subject=f"{subject.tenant}/{subject.id}",  # whom it acts for
        )


class CharterMCP(MCPServer[Any]):
    """``MCPServer`` whose tools are a Charter's exposed actions, per principal."""

    def __init__(
        self,
        channel: AgentChannel,
        *,
        token: str | None = None,
        name: str = "charter",
        issuer_url: str = "http://127.0.0.1/",
    ) -> None:
        self.channel = channel
        self._token = token
        auth = None
        verifier = None
        if token is None:  # HTTP: every request brings its bearer token
            auth = AuthSettings(issuer_url=issuer_url, resource_server_url=None)
            verifier = CharterTokenVerifier(channel)
        super().__init__(
            name,
            instructions="Business actions of this service. Every call states its purpose "
            "(audited); some wait for a person's confirmation.",
            token_verifier=verifier,
            auth=auth,
        )
        self.middleware.append(self._authenticate)

    async def _authenticate(self, ctx: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        """Set the message's principal (its request's token, or the configured one)."""
        principal = await anyio.to_thread.run_sync(self._principal_of, ctx)
        reset = _principal.set(principal)
        try:
            return await call_next(ctx)
        finally:
            _principal.reset(reset)

    def _principal_of(self, ctx: Any) -> Actor | None:
        if self._token is not None:
            token: str | None = self._token
        else:
            request = getattr(ctx, "request", None)
            headers = getattr(request, "headers", None)
            header = headers.get("authorization") if headers is not None else None
            scheme, _, value = (header or "").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        try:
            return self.channel.authenticate(token)
        except CharterError:
            return None

    async def list_tools(self) -> list[Tool]:
        """The caller's tools; none without an authenticated principal."""
        actor = _principal.get()
        if actor is None:
            return []
        tools = await anyio.to_thread.run_sync(self.channel.tools, actor)
        return [_tool(t) for t in tools]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Any = None
    ) -> CallToolResult:
        """Run one tool call through the gate; a refusal is an error result with its problem."""
        actor = _principal.get()
        try:
            if actor is None:
                raise Unauthenticated("This MCP server needs an agent's bearer token.")
            result = await anyio.to_thread.run_sync(
                partial(self.channel.call, actor, name, arguments)
            )
        except CharterError as exc:
            problem = exc.problem()
            return CallToolResult(
                content=[TextContent(type="text", text=json.dumps(problem, default=str))],
                structured_content=problem,
                is_error=True,
            )
        body = result.as_json()
        text = json.dumps(body, default=str)
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=json.loads(text)
        )

    def http_app(self, *, path: str = "/mcp", host: str = "127.0.0.1", **options: Any) -> Starlette:
        """The streamable HTTP ASGI app (its lifespan runs the SDK's session manager)."""
        if self._token is not None:
            raise ConfigurationError("a server built with token= serves stdio only")
        return self.streamable_http_app(streamable_http_path=path, host=host, **options)

    def serve(self, transport: str, *, host: str = "127.0.0.1", port: int = 8765) -> None:
        """Serve over ``stdio`` or ``http`` (streamable HTTP under uvicorn) until stopped."""
        if transport == "stdio":
            if self._token is None:
                raise ConfigurationError("stdio needs the agent's token (CHARTER_AGENT_TOKEN)")
            self.run("stdio")
            return
        if transport != "http":
            raise ConfigurationError(f"transport is stdio or http, not {transport!r}")
        import uvicorn

        uvicorn.run(self.http_app(host=host), host=host, port=port, log_level="info")


def _tool(t: ToolDefinition) -> Tool:
    a = t.annotations
    return Tool(
        name=t.name,
        description=t.description,
        input_schema=t.input_schema,
        annotations=ToolAnnotations(
            title=a["title"],
            read_only_hint=a["readOnlyHint"],
            destructive_hint=a["destructiveHint"],
            idempotent_hint=a["idempotentHint"],
            open_world_hint=a["openWorldHint"],
        ),
        _meta={"charter/confirmation": t.confirmation},
    )


def mcp_server(
    target: Charter | AgentChannel,
    *,
    directory: Directory | None = None,
    signer: TokenSigner | None = None,
    token: str | None = None,
    name: str = "charter",
) -> CharterMCP:
    """An MCP server over ``target``'s agent tools (a Charter with its directory and signer,
    or an :class:`AgentChannel`). ``token``: serve stdio as that agent token's principal,
    checked now (a token that does not authenticate refuses to start)."""
    if isinstance(target, AgentChannel):
        channel = target
    else:
        if directory is None or signer is None:
            raise ConfigurationError("mcp_server(charter) needs directory= and signer=")
        channel = AgentChannel(target, directory=directory, signer=signer)
    if token is not None:
        try:
            channel.authenticate(token)
        except CharterError as exc:
            raise ConfigurationError(
                f"the agent token does not authenticate: {exc.message}"
            ) from exc
    return CharterMCP(channel, token=token, name=name)
