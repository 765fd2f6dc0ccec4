"""The pytest plugin, as a project that installs turnid sees it: pytester runs a fresh pytest
in a subprocess with no conftest and no configuration; the `pytest11` entry point brings the
fixtures."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import pytest

from turnid.client import AsyncTurnIdClient, TurnIdClient, TurnKind
from turnid.testing import TurnIdTestServer


def test_sync_client(turnid_client: TurnIdClient, turnid_server: TurnIdTestServer) -> None:
    assert turnid_server.database == "memory:"
    assert turnid_server.target.startswith("127.0.0.1:")
    assert turnid_client.auto_compaction("t").turn_id == "auto-compact-0"
    assert turnid_client.auto_compaction("t").turn_id == "auto-compact-1"


def test_each_test_gets_a_fresh_server(turnid_client: TurnIdClient) -> None:
    assert turnid_client.auto_compaction("t").turn_id == "auto-compact-0"


@pytest.mark.turnid(store="sqlite")
def test_sqlite_by_marker(turnid_server: TurnIdTestServer, turnid_client: TurnIdClient) -> None:
    assert turnid_server.database.startswith("sqlite://")
    assert turnid_server.database.endswith("turnid.db")
    turn = turnid_client.user_input("t")
    turnid_server.restart()
    assert list(turnid_client.list_turns("t")) == [turn]


@pytest.mark.parametrize("turnid_server", ["memory", "sqlite"], indirect=True)
def test_both_stores_by_parameter(turnid_server: TurnIdTestServer) -> None:
    with TurnIdClient(turnid_server.target) as client:
        assert client.user_input("t").sequence == 1


@pytest.mark.asyncio
async def test_async_client(turnid_async_client: AsyncTurnIdClient) -> None:
    turns = await turnid_async_client.allocate_batch("t", TurnKind.AUTO_COMPACTION, 2)
    listed = [turn async for turn in turnid_async_client.list_turns("t")]
    assert listed == turns
"""

SYNC_ONLY_TESTS = """
from turnid.client import TurnIdClient


def test_sync_client(turnid_client: TurnIdClient) -> None:
    assert turnid_client.realtime_delegation("t").sequence == 1
"""


def test_fixtures_need_no_configuration(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


def test_sync_fixtures_need_no_asyncio_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=SYNC_ONLY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixtures_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        ["*turnid_server*", "*turnid_client*", "*turnid_async_client*"], consecutive=False
    )
    markers = pytester.runpytest_subprocess("--markers", "-p", "no:cacheprovider")
    markers.stdout.fnmatch_lines(["@pytest.mark.turnid(store='memory', auth=None, tls=False)*"])


def test_unknown_store_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
import pytest

@pytest.mark.turnid(store="cassandra")
def test_it(turnid_server):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown store 'cassandra'*"])


def test_async_client_fixture_without_pytest_asyncio(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no pytest-asyncio importable, the fixture is a client that connects on first use."""
    hidden = pytester.mkdir("hide_pytest_asyncio")
    (hidden / "pytest_asyncio.py").write_text("raise ImportError('hidden for this test')\n")
    pytester.makepyfile(
        test_user="""
import asyncio

from turnid.client import AsyncTurnIdClient


def test_async_client_on_my_own_loop(turnid_async_client: AsyncTurnIdClient) -> None:
    async def use() -> str:
        return (await turnid_async_client.auto_compaction("t")).turn_id

    assert asyncio.run(use()) == "auto-compact-0"
"""
    )
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


SECURED_TESTS = """
import grpc
import pytest

from turnid.client import AsyncTurnIdClient, TurnIdClient
from turnid.client.errors import Unauthenticated, Unavailable
from turnid.testing import TurnIdTestServer


@pytest.mark.turnid(auth={"team-a": "token-a", "team-b": "token-b"})
def test_given_tokens(turnid_server: TurnIdTestServer, turnid_client: TurnIdClient) -> None:
    assert turnid_server.tokens == {"team-a": "token-a", "team-b": "token-b"}
    assert turnid_client.auto_compaction("t").turn_id == "auto-compact-0"  # as team-a
    with TurnIdClient(turnid_server.target, **turnid_server.client_options("team-b")) as b:
        assert b.auto_compaction("t").turn_id == "auto-compact-0"  # its own namespace
    with TurnIdClient(turnid_server.target) as anonymous:
        with pytest.raises(Unauthenticated) as raised:
            anonymous.auto_compaction("t")
        assert raised.value.reason == "MISSING_CREDENTIALS"
    with TurnIdClient(turnid_server.target, token="wrong") as wrong:
        with pytest.raises(Unauthenticated) as raised:
            wrong.auto_compaction("t")
        assert raised.value.reason == "INVALID_CREDENTIALS"


@pytest.mark.turnid(auth=True)
def test_generated_token_and_rotation(turnid_server: TurnIdTestServer) -> None:
    old = turnid_server.tokens["test"]
    assert old.startswith("tid_")
    new = turnid_server.add_token("test")
    assert turnid_server.tokens == {"test": new}
    for token in (old, new):
        with TurnIdClient(turnid_server.target, token=token) as client:
            client.user_input("t")
    turnid_server.revoke_token(old)
    with TurnIdClient(turnid_server.target, token=old) as client:
        with pytest.raises(Unauthenticated):
            client.user_input("t")
    turnid_server.restart()  # the tokens survive a restart
    with TurnIdClient(turnid_server.target, token=new) as client:
        assert client.get_thread("t").last_sequence == 2


@pytest.mark.asyncio
@pytest.mark.turnid(tls=True, auth=["svc"])
async def test_tls_async(
    turnid_server: TurnIdTestServer, turnid_async_client: AsyncTurnIdClient
) -> None:
    assert turnid_server.root_certificates is not None
    assert b"BEGIN CERTIFICATE" in turnid_server.root_certificates
    assert (await turnid_async_client.auto_compaction("t")).turn_id == "auto-compact-0"
    async with AsyncTurnIdClient(turnid_server.target, token=turnid_server.tokens["svc"]) as plain:
        with pytest.raises(Unavailable):
            await plain.get_thread("t", timeout=2)


@pytest.mark.turnid(tls="mutual")
def test_mutual_tls_names_are_namespaces(
    turnid_server: TurnIdTestServer, turnid_client: TurnIdClient
) -> None:
    assert turnid_client.auto_compaction("t").turn_id == "auto-compact-0"  # as "test"
    key, chain = turnid_server.client_certificate("team-b")
    with TurnIdClient(
        turnid_server.target,
        root_certificates=turnid_server.root_certificates,
        private_key=key,
        certificate_chain=chain,
    ) as b:
        assert b.auto_compaction("t").turn_id == "auto-compact-0"
    with TurnIdClient(turnid_server.target, root_certificates=turnid_server.root_certificates) as c:
        with pytest.raises(Unavailable):
            c.get_thread("t", timeout=2)


def test_in_a_with_block() -> None:
    with TurnIdTestServer(auth=["a"], tls=True) as server:
        with TurnIdClient(server.target, **server.client_options()) as client:
            assert client.user_input("t").sequence == 1
        directory = server.tokens_file.parent
    assert not directory.exists()  # the test certificates and tokens are cleaned up
"""


def test_secured_server_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=SECURED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_bad_security_markers_are_clear_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
import pytest

@pytest.mark.turnid(auth={"Team A": "x"})
def test_bad_namespace(turnid_server):
    pass

@pytest.mark.turnid(tls="yes")
def test_bad_tls(turnid_server):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        ["*namespace 'Team A' is not*", "*tls must be False, True or 'mutual'*"], consecutive=False
    )
