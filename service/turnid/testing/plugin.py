"""pytest plugin: a real turnid service, in-process, for your own test suite.

Installed with turnid and registered through the `pytest11` entry point, so the fixtures are
there with no configuration:

- `turnid_server`: a `TurnIdTestServer` listening on `127.0.0.1:<free port>`, fresh for each
  test, with the `memory:` store. Ask for a temporary SQLite file with the marker
  `@pytest.mark.turnid(store="sqlite")` or indirect parametrization
  (`@pytest.mark.parametrize("turnid_server", ["memory", "sqlite"], indirect=True)`); any
  database URL works too (`store="sqlite:///path/x.db"`).
- `turnid_client`: a `TurnIdClient` connected to it.
- `turnid_async_client`: an `AsyncTurnIdClient` connected to it (an async fixture when
  pytest-asyncio is installed; otherwise a client that opens its channel on the first call, on
  your test's loop).

The server runs on its own event loop in a background thread. That is what lets the blocking
client call it from a plain (sync) test, and keeps it independent of whichever loop (if any)
your async tests use: the sync fixtures need no asyncio plugin at all.
`turnid_server.restart()` stops the server and starts a new one on the same port and the same
store, for testing how your code rides out a reconnect.

Security, for testing your own credential handling (same marker, or `TurnIdTestServer(...)`):

- `auth={"team-a": "token-a", "team-b": "token-b"}`: bearer tokens on, with these tokens (a
  tokens file of their hashes, as `turnid serve --auth-tokens` reads). `auth=["team-a",
  "team-b"]` makes a random token per namespace; `auth=True` one for the namespace `test`.
  `turnid_server.tokens` maps each namespace to its (newest) token; `add_token(namespace)` and
  `revoke_token(token)` edit the file and reload it, as SIGHUP does (token rotation).
- `tls=True`: TLS with a throwaway CA and a server certificate for 127.0.0.1 and localhost
  (`turnid_server.root_certificates` is the CA's PEM, `ca_file` its path). `tls="mutual"`
  also requires client certificates from that CA; `client_certificate(common_name)` issues
  one, as `(private_key, certificate_chain)` PEM bytes. With mutual TLS and no `auth`, the
  certificate's common name is the caller's namespace. Needs the `cryptography` package.
- `turnid_server.client_options(namespace=None)` are the keyword arguments for
  `TurnIdClient` / `AsyncTurnIdClient` that connect as `namespace` (default: the first one);
  `turnid_client` and `turnid_async_client` use them, so they just work on a secured server.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pytest

from turnid.client import AsyncTurnIdClient, TurnIdClient

if TYPE_CHECKING:
    from turnid.service.server import TurnIdServer
    from turnid.service.stores import Store

_T = TypeVar("_T")

#: How long starting or stopping the in-process server may take before the fixture gives up.
STARTUP_TIMEOUT = 30.0

MARKER = "turnid"


class TurnIdTestServer:
    """A `TurnIdServer` on its own event loop in a daemon thread; usable from sync and async code.

    `start()` binds `listen` (port 0: a free port) and later starts reuse that port, so
    `restart()` brings a new server up at the same `target`. With `memory:` the same in-memory
    store lives on across restarts; any other database URL is reopened (as a new process would).
    """

    def __init__(
        self,
        database: str = "memory:",
        listen: str = "127.0.0.1:0",
        *,
        auth: bool | Mapping[str, str] | Sequence[str] | None = None,
        tls: bool | Literal["mutual"] = False,
    ) -> None:
        self.database = database
        self.listen = listen
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: TurnIdServer | None = None
        self._memory_store: Store | None = None
        self.port = 0
        if tls not in (False, True, "mutual"):
            raise ValueError(f"tls must be False, True or 'mutual', not {tls!r}")
        self.tls = tls
        self._directory: Path | None = None
        self._pki: _TestPki | None = None
        #: (namespace, token) for every line of the tokens file, oldest first.
        self._token_lines: list[tuple[str, str]] = _token_lines(auth)
        self.auth = auth is not None and auth is not False
        if self.auth or tls:
            self._directory = directory = Path(tempfile.mkdtemp(prefix="turnid-test-"))
            try:
                if tls:
                    self._pki = _TestPki(directory / "tls")
                if self.auth:
                    self._write_tokens()
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise

    # -- security -----------------------------------------------------------------------------

    @property
    def tokens(self) -> dict[str, str]:
        """Each namespace's newest token (empty with authentication off)."""
        return dict(self._token_lines)

    @property
    def tokens_file(self) -> Path | None:
        return self._directory / "tokens" if self.auth and self._directory else None

    @property
    def root_certificates(self) -> bytes | None:
        """The test CA's certificate (PEM) that clients trust; None without TLS."""
        return self._pki.ca_pem if self._pki is not None else None

    @property
    def ca_file(self) -> Path | None:
        return self._pki.ca_file if self._pki is not None else None

    def client_certificate(self, common_name: str = "test") -> tuple[bytes, bytes]:
        """A client certificate from the test CA: (private_key, certificate_chain), PEM."""
        if self._pki is None:
            raise RuntimeError("client_certificate() needs a server started with tls=...")
        return self._pki.issue(common_name, server=False)

    def client_options(self, namespace: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `TurnIdClient(target, **options)` that call as `namespace`.

        The token of `namespace` (default: the first namespace) when authentication is on,
        the CA when TLS is, and with mutual TLS a client certificate named `namespace`
        (default: the first namespace, or `test`).
        """
        options: dict[str, Any] = {}
        names = list(self.tokens)
        if self.auth:
            if namespace is None:
                if not names:
                    raise RuntimeError("the turnid test server has no tokens")
                namespace = names[0]
            if namespace not in self.tokens:
                raise KeyError(f"no token for namespace {namespace!r}; have {names}")
            options["token"] = self.tokens[namespace]
        if self._pki is not None:
            options["root_certificates"] = self._pki.ca_pem
            if self.tls == "mutual":
                key, chain = self.client_certificate(namespace or (names or ["test"])[0])
                options["private_key"], options["certificate_chain"] = key, chain
        return options

    def add_token(self, namespace: str, token: str | None = None) -> str:
        """Add a token (random unless given) for `namespace` and reload; old tokens still work."""
        if not self.auth:
            raise RuntimeError("add_token() needs a server started with auth=...")
        token = token if token is not None else _new_token()
        self._token_lines.append((namespace, token))
        self._write_tokens()
        return token

    def revoke_token(self, token: str) -> None:
        """Remove a token's line and reload: calls with it are refused from now on."""
        lines = [line for line in self._token_lines if line[1] != token]
        if len(lines) == len(self._token_lines):
            raise KeyError("no such token")
        self._token_lines = lines
        self._write_tokens()

    def _write_tokens(self) -> None:
        from turnid.service.auth import hash_token

        path = self.tokens_file
        assert path is not None
        text = "".join(f"{ns} {hash_token(token)}\n" for ns, token in self._token_lines)
        fresh = path.with_suffix(".new")
        fresh.write_text("# written by turnid.testing\n" + text)
        fresh.chmod(0o600)
        fresh.replace(path)
        if self._server is not None:
            authenticator = self._server.security.authenticator
            if authenticator is None or not authenticator.reload():
                raise ValueError("the turnid test server did not take the new tokens file")

    def _security_settings(self) -> dict[str, str]:
        settings: dict[str, str] = {}
        if self._pki is not None:
            settings["tls_cert"] = str(self._pki.server_cert_file)
            settings["tls_key"] = str(self._pki.server_key_file)
            if self.tls == "mutual":
                settings["tls_client_ca"] = str(self._pki.ca_file)
        if self.tokens_file is not None:
            settings["auth_tokens"] = str(self.tokens_file)
        return settings

    @property
    def target(self) -> str:
        if not self.port:
            raise RuntimeError("the turnid test server has not been started")
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="turnid-test-server", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(STARTUP_TIMEOUT)

    def start(self) -> None:
        """Start serving (on the port of the previous start, if there was one)."""
        if self._server is not None:
            return
        from turnid.service.config import ServerConfig
        from turnid.service.server import TurnIdServer

        listen = self.listen
        if self.port:
            listen = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        store: Store | None = None
        if self.database == "memory:":
            if self._memory_store is None:
                from turnid.service.stores import open_store

                self._memory_store = open_store("memory:")
            store = self._memory_store
        security = self._security_settings()
        config = ServerConfig(
            listen=listen,
            database=self.database,
            tls_cert=security.get("tls_cert"),
            tls_key=security.get("tls_key"),
            tls_client_ca=security.get("tls_client_ca"),
            auth_tokens=security.get("auth_tokens"),
        )
        server = TurnIdServer(config, store=store)
        self._run(server.start())
        self._server = server
        self.port = server.port

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving; in-flight calls get `grace` seconds (default: none, they fail)."""
        server, self._server = self._server, None
        if server is not None:
            self._run(server.stop(grace))

    def restart(self, grace: float | None = 0) -> None:
        """Stop, then start a new server on the same port and store."""
        self.stop(grace)
        self.start()

    def close(self) -> None:
        """Stop the server and end its thread and loop."""
        try:
            self.stop()
        finally:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is not None and thread is not None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(STARTUP_TIMEOUT)
                if not thread.is_alive():
                    loop.close()
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> TurnIdTestServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.target if self.port else "not started"
        security = f", auth={sorted(self.tokens)}" if self.auth else ""
        if self.tls:
            security += f", tls={self.tls!r}"
        return f"TurnIdTestServer({where}, database={self.database!r}{security})"


def _new_token() -> str:
    return "tid_" + secrets.token_urlsafe(32)


def _token_lines(auth: bool | Mapping[str, str] | Sequence[str] | None) -> list[tuple[str, str]]:
    if auth is None or auth is False:
        return []
    if auth is True:
        return [("test", _new_token())]
    if isinstance(auth, str):
        raise TypeError("auth takes True, a list of namespaces or {namespace: token}, not a str")
    if isinstance(auth, Mapping):
        lines = [(str(namespace), str(token)) for namespace, token in auth.items()]
    else:
        lines = [(str(namespace), _new_token()) for namespace in auth]
    from turnid.service.auth import NAMESPACE_PATTERN, NAMESPACE_RULE

    for namespace, token in lines:
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise ValueError(f"auth: namespace {namespace!r} is not {NAMESPACE_RULE}")
        if not token or not token.isascii() or any(c.isspace() for c in token):
            raise ValueError(f"auth: the token of {namespace!r} must be non-empty printable ASCII")
    return lines


class _TestPki:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost (EC P-256, one day)."""

    def __init__(self, directory: Path) -> None:
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise pytest.UsageError(
                "turnid_server: tls needs the 'cryptography' package (pip install cryptography)"
            ) from None
        directory.mkdir(parents=True)
        self.directory = directory
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turnid test CA")])
        self.ca_pem = self._certificate(self._ca_name, self._ca_key.public_key(), ca=True)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca_pem)
        key, cert = self.issue("turnid test server", server=True)
        self.server_cert_file = directory / "server.pem"
        self.server_key_file = directory / "server.key"
        self.server_cert_file.write_bytes(cert)
        fd = os.open(self.server_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key)

    def _certificate(
        self, subject: Any, public_key: Any, *, ca: bool = False, server: bool = False
    ) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        )
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        certificate = builder.sign(self._ca_key, hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool) -> tuple[bytes, bytes]:
        """(private key, certificate) PEM for `common_name`, signed by the CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = self._certificate(subject, key.public_key(), server=server)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, cert


def database_url(store: str, directory: Path) -> str:
    """`memory` / `sqlite` (a file in `directory`) / a database URL, as a database URL."""
    if store in ("memory", "memory:"):
        return "memory:"
    if store == "sqlite":
        return f"sqlite://{directory / 'turnid.db'}"
    if ":" in store:
        return store
    raise pytest.UsageError(
        f"turnid_server: unknown store {store!r}; use 'memory', 'sqlite' or a database URL"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(store='memory', auth=None, tls=False): the turnid_server fixture's store: "
        "'memory' (default), 'sqlite' (a temporary file) or a database URL; auth: True, a list "
        "of namespaces or {namespace: token} turns bearer tokens on (turnid_server.tokens); "
        "tls: True or 'mutual' serves TLS with a test CA (turnid_server.root_certificates)",
    )


def _requested_store(request: pytest.FixtureRequest) -> str:
    param = getattr(request, "param", None)
    if param is not None:
        return str(param)
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        store = marker.kwargs.get("store", marker.args[0] if marker.args else "memory")
        return str(store)
    return "memory"


@pytest.fixture
def turnid_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TurnIdTestServer]:
    """A running turnid service on 127.0.0.1 (memory store unless asked otherwise)."""
    store = _requested_store(request)
    directory = tmp_path_factory.mktemp("turnid") if store == "sqlite" else Path()
    marker = request.node.get_closest_marker(MARKER)
    security = {
        key: marker.kwargs[key] for key in ("auth", "tls") if marker and key in marker.kwargs
    }
    try:
        server = TurnIdTestServer(database_url(store, directory), **security)
    except (TypeError, ValueError) as error:
        raise pytest.UsageError(f"turnid_server: {error}") from None
    with server:
        yield server


@pytest.fixture
def turnid_client(turnid_server: TurnIdTestServer) -> Iterator[TurnIdClient]:
    """A blocking `TurnIdClient` for `turnid_server`."""
    with TurnIdClient(turnid_server.target, **turnid_server.client_options()) as client:
        yield client


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - tests/client/test_plugin.py runs this in a subprocess
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True


if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def turnid_async_client(
        turnid_server: TurnIdTestServer,
    ) -> AsyncIterator[AsyncTurnIdClient]:
        """An `AsyncTurnIdClient` for `turnid_server`."""
        options = turnid_server.client_options()
        async with AsyncTurnIdClient(turnid_server.target, **options) as client:
            yield client

else:  # pragma: no cover

    @pytest.fixture
    def turnid_async_client(turnid_server: TurnIdTestServer) -> Iterator[AsyncTurnIdClient]:
        """An `AsyncTurnIdClient` for `turnid_server`; its channel opens on the test's loop."""
        client = AsyncTurnIdClient(turnid_server.target, **turnid_server.client_options())
        yield client
        loop = client.loop
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(client.close())
