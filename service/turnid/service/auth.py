"""Authentication: bearer tokens from a file of hashes, or the client certificate's name (mTLS).

Every authenticated call runs in a *namespace* (invariant 10): the tokens file maps each token to
one, or, in mutual TLS with no tokens file, the client certificate's common name is the
namespace. The handler reads it from `current_namespace`. With authentication off, every call is
in the default namespace `""`.

Namespaces are 1-64 characters of `a-z 0-9 . _ -`, starting with a letter or a digit
(`team-a`, `voice.prod`). `""` is never a credential's namespace: it is only the namespace of a
server with authentication off, so turning authentication on never hands anyone the threads
written without it (they stay in `""`, which no token reaches).

The tokens file: one entry a line, `NAMESPACE sha256:HEX`, HEX the lower-case SHA-256 of the
token's UTF-8 bytes; blank lines and lines starting with `#` are ignored; a namespace may have
several lines (rotation: the new and the old token both work until the old line is deleted and
the server gets SIGHUP). The file never holds a token, so it may be read by operators and
checked into configuration management; who can *write* it can grant access.

Tokens travel as `authorization: Bearer TOKEN` (RFC 6750: the scheme is matched case-
insensitively, then exactly one space and a `b64token`). Anything else is refused with
UNAUTHENTICATED: reason MISSING_CREDENTIALS when no `authorization` header came, else
INVALID_CREDENTIALS (an unknown token, another scheme, an empty or malformed value, several
`authorization` headers). Neither the status, the logs nor any metadata ever carry the token.

Why a dict lookup by SHA-256 is constant-time enough: the server hashes the presented token and
looks the digest up. What a timing observer could learn is how the *digest* of their own guess
compares with stored digests (dict hashing, then a memcmp of 32 bytes). Steering a guess so that
its digest shares a prefix with a stored one needs a SHA-256 preimage search, and even a whole
stored digest is of no use without a preimage; tokens carry 256 random bits. So the lookup leaks
nothing usable about a token, unlike comparing the token itself byte by byte. Comparing with
`hmac.compare_digest` against every entry would cost O(entries) per call on the hot path (and
still leak the number of entries) for no gain over that.

The health service (`/grpc.health.v1.Health/*`) is always open, for load balancers; reflection
and every other method, including unknown ones (an unauthenticated peer cannot even learn which
methods exist), need credentials.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import datetime
import fcntl
import hashlib
import inspect
import logging
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_status import rpc_status

from turnid.service import logs
from turnid.service.domain.errors import ErrorCategory, TurnIdError
from turnid.service.tls import server_credentials

__all__ = [
    "NAMESPACE_PATTERN",
    "TOKEN_PREFIX",
    "Authenticator",
    "add_token_commands",
    "current_namespace",
    "hash_token",
    "parse_tokens",
    "run_token_command",
    "server_credentials",
]

log = logging.getLogger("turnid.auth")

#: The caller's namespace, set for the duration of each authenticated call's handler.
current_namespace: contextvars.ContextVar[str] = contextvars.ContextVar(
    "turnid_namespace", default=""
)

NAMESPACE_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAMESPACE_RULE = "1-64 characters of a-z 0-9 . _ -, starting with a letter or a digit"
TOKEN_PREFIX = "tid_"
TOKENS_ENV = "TURNID_AUTH_TOKENS"

MISSING_CREDENTIALS = "MISSING_CREDENTIALS"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"

_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_TURNID_SERVICE = "turnid.v1.TurnIdService"
_HASH = re.compile(r"sha256:([0-9a-f]{64})")
# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token; we take exactly one space.
_BEARER = re.compile(r"(?i:bearer) ([A-Za-z0-9\-._~+/]+=*)")
_FIELDS = re.compile(r"\S+")


def hash_token(token: str) -> str:
    """The tokens file's form of a token: `sha256:` + lower-case hex of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str = "tokens file") -> dict[bytes, str]:
    """{SHA-256 digest: namespace} from a tokens file's text; ValueError naming the line.

    The error never quotes the line: someone may have pasted a token into it.
    """
    tokens: dict[bytes, str] = {}
    first_line: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = _FIELDS.findall(stripped)
        where = f"{source}:{number}"
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected 'NAMESPACE sha256:HEX', found {len(fields)} field"
                + ("s" if len(fields) != 1 else "")
            )
        namespace, hashed = fields
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise ValueError(f"{where}: the namespace must be {NAMESPACE_RULE}")
        match = _HASH.fullmatch(hashed)
        if match is None:
            if hashed.lower().startswith("sha256:"):
                problem = "the hash must be 'sha256:' and 64 lower-case hex digits"
            else:
                problem = (
                    "the second field must be 'sha256:HEX' (the file holds hashes, never "
                    "tokens: add tokens with `turnid token create`)"
                )
            raise ValueError(f"{where}: {problem}")
        digest = bytes.fromhex(match.group(1))
        if digest in first_line:
            raise ValueError(f"{where}: the same hash as line {first_line[digest]}")
        first_line[digest] = number
        tokens[digest] = namespace
    return tokens


def _read_tokens_file(path: str) -> dict[bytes, str]:
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            raw = file.read()
    except OSError as error:
        raise ValueError(f"cannot read tokens file {path}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text") from None
    tokens = parse_tokens(text, path)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "tokens file %s is writable by group or others: whoever can write it can grant "
            "themselves access (chmod go-w)",
            path,
        )
    return tokens


@dataclass(frozen=True, slots=True)
class _Refusal(Exception):
    reason: str
    detail: str  # for the message and the debug log; never the credential itself


_MESSAGES = {
    MISSING_CREDENTIALS: "this call needs credentials: send 'authorization: Bearer <token>'",
    INVALID_CREDENTIALS: "the credentials are not valid",
}


def _status(reason: str, message: str) -> grpc.Status:
    """UNAUTHENTICATED with exactly one ErrorInfo (domain turnid, `reason`), no metadata."""
    from turnid.service.servicer import error_to_status  # the servicer imports this module

    error = TurnIdError(ErrorCategory.UNAUTHENTICATED, reason, message)
    return rpc_status.to_status(error_to_status(error))


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


class Authenticator:
    """Who is calling: tokens from `tokens_file`, or the client certificate's common name.

    With a tokens file the token decides the namespace (mutual TLS, if configured, then only
    decides who may connect). `client_cert_namespaces=True` with no tokens file makes the
    verified client certificate's common name the namespace; use it only with
    `server_credentials(..., client_ca_file=...)`, which makes gRPC verify that certificate.
    """

    def __init__(
        self, tokens_file: str | None = None, client_cert_namespaces: bool = False
    ) -> None:
        self.tokens_file = tokens_file
        self.client_cert_namespaces = client_cert_namespaces and tokens_file is None
        self.refusals: collections.Counter[str] = collections.Counter()
        self._tokens: dict[bytes, str] = {}
        self._statuses: dict[str, grpc.Status] = {}
        if tokens_file is not None:
            self._tokens = _read_tokens_file(tokens_file)
            self._log_loaded()

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None or self.client_cert_namespaces

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces that the tokens file grants (empty in mTLS-only mode)."""
        return frozenset(self._tokens.values())

    def _log_loaded(self) -> None:
        if not self._tokens:
            log.warning(
                "tokens file %s has no tokens: every call will be refused", self.tokens_file
            )
            return
        log.info(
            "loaded %d token(s) for %d namespace(s) from %s",
            len(self._tokens),
            len(self.namespaces),
            self.tokens_file,
        )

    def reload(self) -> bool:
        """Re-read the tokens file (SIGHUP). A bad file is logged and the old tokens stay."""
        if self.tokens_file is None:
            return False
        try:
            tokens = _read_tokens_file(self.tokens_file)
        except ValueError as error:
            log.error("tokens file not reloaded, the previous tokens stay in force: %s", error)
            return False
        self._tokens = tokens  # one assignment: calls see the old set or the new one
        self._log_loaded()
        return True

    # -- the decision ---------------------------------------------------------------------

    def namespace_for_token(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The namespace of the one `authorization: Bearer` token in `metadata`, or _Refusal."""
        header: str | bytes | None = None
        count = 0
        for key, value in metadata or ():
            if key == "authorization":
                header, count = value, count + 1
        if header is None:
            raise _Refusal(MISSING_CREDENTIALS, "no authorization header")
        if count > 1:
            raise _Refusal(INVALID_CREDENTIALS, "several authorization headers")
        if not isinstance(header, str):
            raise _Refusal(INVALID_CREDENTIALS, "authorization header is not text")
        match = _BEARER.fullmatch(header)
        if match is None:
            scheme = header.split(" ", 1)[0]
            if scheme.lower() != "bearer":
                raise _Refusal(INVALID_CREDENTIALS, "authorization is not a Bearer token")
            raise _Refusal(INVALID_CREDENTIALS, "malformed Bearer token")
        digest = hashlib.sha256(match.group(1).encode()).digest()
        namespace = self._tokens.get(digest)
        if namespace is None:
            raise _Refusal(INVALID_CREDENTIALS, "unknown token")
        return namespace

    @staticmethod
    def namespace_for_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> str:
        """The client certificate's common name (verified by the TLS layer), or _Refusal."""
        names = list(auth_context.get("x509_common_name", ()))
        if not names:
            raise _Refusal(MISSING_CREDENTIALS, "no client certificate with a common name")
        if len(names) > 1:
            raise _Refusal(INVALID_CREDENTIALS, "client certificate has several common names")
        try:
            name = names[0].decode("ascii")
        except UnicodeDecodeError:
            raise _Refusal(INVALID_CREDENTIALS, "client certificate name is not ASCII") from None
        if not NAMESPACE_PATTERN.fullmatch(name):
            raise _Refusal(
                INVALID_CREDENTIALS,
                f"client certificate name is not a namespace ({NAMESPACE_RULE})",
            )
        return name

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> str:
        started = time.perf_counter()
        try:
            if self.client_cert_namespaces:
                return self.namespace_for_certificate(context.auth_context())
            return self.namespace_for_token(context.invocation_metadata())
        except _Refusal as refusal:
            await self._refuse(context, method, refusal, started)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        refusal: _Refusal,
        started: float,
    ) -> NoReturn:
        self.refusals[refusal.reason] += 1
        peer = context.peer()
        log.debug("refused %s from %s: %s", method, peer, refusal.detail)
        # The servicer's access log never sees a refused call: write its line here.
        service, _, name = method.lstrip("/").partition("/")
        logs.access_log(
            method=name if service == _TURNID_SERVICE else method,
            code="UNAUTHENTICATED",
            reason=refusal.reason,
            request_id="",
            namespace="",
            peer=peer,
            duration_s=time.perf_counter() - started,
        )
        status = self._statuses.get(refusal.detail)
        if status is None:
            message = _MESSAGES[refusal.reason]
            if refusal.reason == INVALID_CREDENTIALS:
                message = f"{message}: {refusal.detail}"
            elif self.client_cert_namespaces:
                message = "this call needs a client certificate"
            status = self._statuses[refusal.detail] = _status(refusal.reason, message)
        await context.abort_with_status(status)  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    # -- gRPC -----------------------------------------------------------------------------

    def interceptor(self) -> grpc.aio.ServerInterceptor[Any, Any] | None:
        """The server interceptor that enforces this; None when authentication is off."""
        return _AuthInterceptor(self) if self.enabled else None

    def _wrap_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any] | None
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler is None:  # unknown method: UNIMPLEMENTED, but only for an authenticated peer
            return grpc.stream_stream_rpc_method_handler(self._guard(method, _unimplemented, True))
        kinds: list[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]]] = [
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ]
        for attribute, make in kinds:
            behavior = getattr(handler, attribute, None)
            if behavior is not None:
                return make(
                    self._guard(method, behavior, handler.response_streaming),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        raise TypeError(f"{method}: a method handler with no behavior")  # pragma: no cover

    def _guard(self, method: str, behavior: Behavior, response_streaming: bool) -> Behavior:
        """`behavior`, run only for an authenticated caller, inside its namespace."""
        authenticate = self._authenticate
        if response_streaming and not inspect.iscoroutinefunction(behavior):

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                token = current_namespace.set(await authenticate(context, method))
                try:
                    responses = behavior(request, context)
                    if hasattr(responses, "__aiter__"):
                        async for response in responses:
                            yield response
                    else:
                        for response in responses:
                            yield response
                finally:
                    with contextlib.suppress(ValueError):  # closed from another context
                        current_namespace.reset(token)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = current_namespace.set(await authenticate(context, method))
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                current_namespace.reset(token)

        return call


async def _unimplemented(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not found")


class _AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator
        self._cache: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(_HEALTH_PREFIX):
            return handler
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._authenticator._wrap_handler(method, handler)
        if handler is not None:  # registered methods only: made-up names must not grow it
            self._cache[method] = (handler, wrapped)
        return wrapped


# -- `turnid token ...` -------------------------------------------------------------------


def add_token_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`turnid token create NAMESPACE [--auth-tokens FILE]`."""
    token = commands.add_parser(
        "token",
        help="manage bearer tokens",
        description="Manage the bearer tokens of `turnid serve --auth-tokens FILE`.",
    )
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser(
        "create",
        help="make a new token for a namespace",
        description="Print a new random token for NAMESPACE (once: it is not stored anywhere) "
        "and append its hash to the tokens file (created with mode 0600 if missing). Running "
        "servers pick it up on SIGHUP. A namespace may have several tokens: to rotate, create "
        "a new one, move clients over, delete the old line and send SIGHUP again.",
    )
    create.add_argument("namespace", metavar="NAMESPACE", help=f"the namespace: {NAMESPACE_RULE}")
    create.add_argument(
        "--auth-tokens",
        default=os.environ.get(TOKENS_ENV),
        metavar="FILE",
        help=f"the tokens file (env {TOKENS_ENV})",
    )


def run_token_command(args: argparse.Namespace) -> int:
    if args.token_command == "create":
        return _create_token(args.namespace, args.auth_tokens)
    raise AssertionError(args.token_command)  # pragma: no cover


def _create_token(namespace: str, path: str | None) -> int:
    def fail(message: str, code: int = 1) -> int:
        print(f"turnid token create: {message}", file=sys.stderr)
        return code

    if not path:
        return fail(f"no tokens file: pass --auth-tokens FILE or set {TOKENS_ENV}", 2)
    if not NAMESPACE_PATTERN.fullmatch(namespace):
        return fail(f"the namespace must be {NAMESPACE_RULE}", 2)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = f"# {namespace}: token created {created}\n{namespace} {hash_token(token)}\n"
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as error:
        return fail(f"cannot open {path}: {error.strerror}")
    with os.fdopen(descriptor, "r+b") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # two creates at once append whole lines
        existing = file.read()
        try:
            parse_tokens(existing.decode("utf-8"), path)
        except (ValueError, UnicodeDecodeError) as error:
            return fail(f"{error}; fix the file first (nothing was added)")
        if existing and not existing.endswith(b"\n"):
            entry = "\n" + entry
        file.write(entry.encode())
        file.flush()
        os.fsync(file.fileno())
        line = existing.count(b"\n") + entry.count("\n")
    print(token)
    print(
        f"turnid token create: added a token for namespace {namespace!r} to {path} (line "
        f"{line}). It is shown only this once. Send SIGHUP to running servers to load it.",
        file=sys.stderr,
    )
    return 0
