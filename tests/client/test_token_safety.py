"""A bearer token never goes out in cleartext across a network: refused at construction."""

from __future__ import annotations

import pytest

from turnid.client import AsyncTurnIdClient, ConnectOptions, TurnIdClient
from turnid.client._core import is_loopback_target

REMOTE = ["turnid.example.com:443", "10.0.0.7:50051", "dns:///turnid.internal:50051",
          "ipv4:127.0.0.1:1,10.0.0.1:2", "[2001:db8::1]:50051", "xds:///turnid", "0.0.0.0:50051",
          "dns://8.8.8.8/localhost.evil.com:1"]  # fmt: skip
LOOPBACK = ["127.0.0.1:50051", "127.3.4.5:1", "localhost:50051", "localhost", "[::1]:50051",
            "::1", "dns:///localhost:50051", "dns://8.8.8.8/127.0.0.1:9", "ipv4:127.0.0.1:1",
            "ipv6:[::1]:50051", "unix:/tmp/turnid.sock", "unix:///run/turnid.sock",
            "unix-abstract:turnid", "[::ffff:127.0.0.1]:5", "api.localhost:80"]  # fmt: skip


@pytest.mark.parametrize("target", REMOTE)
def test_remote_targets(target: str) -> None:
    assert not is_loopback_target(target)


@pytest.mark.parametrize("target", LOOPBACK)
def test_loopback_targets(target: str) -> None:
    assert is_loopback_target(target)


@pytest.mark.parametrize("make", [TurnIdClient, AsyncTurnIdClient, ConnectOptions])
def test_token_over_plaintext_to_a_remote_target_is_refused(make: type) -> None:
    with pytest.raises(ValueError, match="cleartext") as caught:
        make("turnid.example.com:50051", token="s3cret")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("make", [TurnIdClient, AsyncTurnIdClient, ConnectOptions])
def test_what_is_allowed(make: type) -> None:
    remote = "turnid.example.com:50051"
    for client in (
        make("127.0.0.1:50051", token="t"),  # loopback
        make("unix:/tmp/x.sock", token="t"),
        make(remote, token="t", insecure=True),  # the caller says so
        make(remote, token="t", tls=True),  # TLS
        make(remote, token="t", root_certificates=b"pem"),
        make(remote),  # no token
    ):
        if isinstance(client, TurnIdClient):
            client.close()


def test_connect_options_carry_insecure() -> None:
    options = ConnectOptions("10.1.2.3:1", token="t", insecure=True)
    assert options.insecure
    assert options.metadata() == (("authorization", "Bearer t"),)
    assert not ConnectOptions().insecure
