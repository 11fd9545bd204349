"""The MCP server (issue 12, item 6) on the official SDK: an in-process client lists and calls
the tools as the configured agent token's principal; over streamable HTTP (uvicorn on
127.0.0.1) a request without a valid agent token is 401 and lists nothing, an agent without a
grant lists nothing, and a call is audited on channel agent. SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import select

from charter import Actor, Charter, ConfigurationError
from charter.audit.entry import audit_table
from charter.demo.service import DEMO_USERS, build_charter, directory
from charter.integrations.agent import AgentChannel
from charter.integrations.mcp import mcp_server
from charter.testing import FrozenClock
from charter.tokens import TokenSigner

AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
SECRET = "mcp-test-token-secret-0123456789abcdef"
SCOPES = {"invoices:read", "invoices:write"}
PURPOSE = "alice asked for a draft for ACME"


def user(name: str) -> Actor:
    return next(a for (_, uid), a in DEMO_USERS.items() if uid == name)


@pytest.fixture
def agents(database_url: str) -> Iterator[AgentChannel]:
    clock = FrozenClock(datetime.now(UTC).replace(microsecond=0))
    charter = build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock))
    yield AgentChannel(charter, directory=directory, signer=TokenSigner([SECRET]))
    charter.close()


def token(agents: AgentChannel, agent: str = "ada", for_: str = "alice") -> str:
    a = (
        Actor.make(agent, "acme", kind="agent", roles={"assistant"})
        if agent != "ada"
        else user("ada")
    )
    return agents.issue(a, user(for_), scopes=SCOPES)


def audited(agents: AgentChannel, action: str) -> list[Any]:
    with agents.charter.engine.connect() as conn:
        return list(conn.execute(select(audit_table).where(audit_table.c.action == action)))


def test_an_in_process_client_lists_and_calls_the_tools_of_its_principal(agents):
    server = mcp_server(agents, token=token(agents))

    async def session() -> tuple[Any, Any, Any]:
        async with Client(server) as client:
            listed = await client.list_tools()
            created = await client.call_tool("invoice.create", {
                "purpose": PURPOSE, "input": {"customer": "ACME", "amount": "99.00"}})  # fmt: skip
            refused = await client.call_tool("invoice.approve", {"purpose": PURPOSE, "target": 1})
            return listed, created, refused

    listed, created, refused = anyio.run(session)
    tools = {t.name: t for t in listed.tools}
    assert ["invoice.create", "invoice.get", "invoice.submit", "invoice.void"] == sorted(tools)
    get = tools["invoice.get"].annotations
    assert (True, False, False) == (get.read_only_hint, get.destructive_hint, get.open_world_hint)
    assert tools["invoice.void"].meta == {"charter/confirmation": True}
    assert not created.is_error
    assert "draft" == created.structured_content["result"]["state"]
    assert refused.is_error
    assert "unknown_action" == refused.structured_content["code"]
    (entry,) = audited(agents, "invoice.create")
    assert ("agent", "alice", "ada", PURPOSE) == (
        entry.channel,
        entry.subject,
        entry.real_actor,
        entry.reason,
    )


def test_stdio_refuses_to_start_without_a_token_that_authenticates(agents):
    with pytest.raises(ConfigurationError):
        mcp_server(agents, token="not-a-token")
    with pytest.raises(ConfigurationError):
        mcp_server(agents).serve("stdio")  # no token: no principal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_url(agents: AgentChannel) -> Iterator[str]:
    port = _free_port()
    app = mcp_server(agents).http_app(host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(10)


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def test_http_without_a_valid_agent_token_is_401_before_any_message(agents, http_url):
    users_own = TokenSigner([SECRET]).issue("alice", "acme", scopes=SCOPES)  # not an agent's
    for authorization in (None, "Bearer nonsense", f"Bearer {users_own}"):
        headers = dict(HEADERS)
        if authorization:
            headers["Authorization"] = authorization
        response = httpx2.post(http_url, json=INIT, headers=headers)
        assert 401 == response.status_code
        assert response.headers["www-authenticate"].startswith("Bearer")
        listed = httpx2.post(http_url, headers=headers, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/list"})  # fmt: skip
        assert 401 == listed.status_code


def _over_http(url: str, bearer: str, call: tuple[str, dict[str, Any]] | None = None) -> Any:
    async def go() -> Any:
        headers = {"Authorization": f"Bearer {bearer}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            listed = await client.list_tools()
            result = await client.call_tool(*call) if call else None
            return listed, result

    return anyio.run(go)


def test_http_lists_and_calls_for_the_token_and_an_agent_without_grant_gets_nothing(
    agents, http_url
):
    listed, result = _over_http(http_url, token(agents), ("invoice.create", {
        "purpose": PURPOSE, "input": {"customer": "ACME", "amount": 5}}))  # fmt: skip
    assert 4 == len(listed.tools)
    assert not result.is_error
    (entry,) = audited(agents, "invoice.create")
    assert ("agent", "alice", "ada") == (entry.channel, entry.subject, entry.real_actor)

    def rogue(tenant: str, uid: str) -> Actor | None:
        if uid == "rex":
            return Actor.make("rex", "acme", kind="agent", roles={"crawler"})
        return directory(tenant, uid)

    agents.directory = rogue
    rex = agents.issue(rogue("acme", "rex"), user("alice"), scopes=SCOPES)  # type: ignore[arg-type]
    listed, refused = _over_http(http_url, rex, ("invoice.create", {
        "purpose": PURPOSE, "input": {"customer": "ACME", "amount": 5}}))  # fmt: skip
    assert [] == listed.tools
    assert refused.is_error
    assert "forbidden" == refused.structured_content["code"]
