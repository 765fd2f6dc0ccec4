"""Server TLS: certificate files to gRPC server credentials, reloaded when the files change.

`server_credentials(cert, key)` serves TLS; with `client_ca` it also requires and verifies a
client certificate signed by that CA (mutual TLS), as `grpc.ssl_server_credentials(...,
require_client_auth=True)` would.

Rotation needs no restart. The credentials come from `grpc.dynamic_ssl_server_credentials`,
whose fetcher gRPC calls before the TLS handshake of every new connection (never per call). The
fetcher here costs three `os.stat` calls when nothing changed; when a file's (inode, size, mtime)
changes it reads the three files, checks that the key matches the certificate and that the CA
file parses (the standard library's `ssl` module does both), and hands gRPC the new
configuration: new connections then use it, open connections keep the old one until they close.
A set of files that does not check out (half-written, key and certificate from different
pairs) is logged on `turnid.tls` and the server keeps serving what it had; once all three
files are written, the next connection picks them up. Writing the files in place or swapping a
symlink (as Kubernetes does for mounted secrets) are both noticed.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import cast

import grpc

log = logging.getLogger("turnid.tls")

_Signature = tuple[tuple[int, int, int], ...]


def _no_password() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted; gRPC needs an unencrypted PEM key")


def _check(cert_file: str, key_file: str, client_ca_file: str | None) -> None:
    """ValueError (one line, naming the file) unless the key matches the cert and the CA parses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, ValueError) as error:
        raise ValueError(
            f"TLS certificate {cert_file} with key {key_file}: {_ssl_reason(error)}"
        ) from None
    except OSError as error:
        raise ValueError(f"TLS certificate or key: {error.filename}: {error.strerror}") from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError as error:
            raise ValueError(f"TLS client CA {client_ca_file}: {_ssl_reason(error)}") from None
        except OSError as error:
            raise ValueError(f"TLS client CA {client_ca_file}: {error.strerror}") from None


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).lower().replace("_", " ")
    return str(error) or type(error).__name__


class _CertificateFiles:
    """The three files, their last seen signature, and the fetcher gRPC calls per connection."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None) -> None:
        self.paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p is not None)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()  # gRPC may call the fetcher from several core threads
        self._seen = self._signature()
        self.initial = self._load()

    def _signature(self) -> _Signature:
        signature = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                signature.append((-1, -1, -1))
            else:
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(signature)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        def read(path: str) -> bytes:
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError as error:
                raise ValueError(f"TLS: cannot read {path}: {error.strerror}") from None

        ca = read(self.client_ca_file) if self.client_ca_file is not None else None
        return read(self.cert_file), read(self.key_file), ca

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files; ValueError with the reason when they do not check out."""
        before = self._read()
        _check(self.cert_file, self.key_file, self.client_ca_file)
        if self._read() != before:  # changed between reading and checking: not a stable set
            raise ValueError("TLS: the certificate files changed while they were read")
        cert, key, ca = before
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None (keep the current configuration) unless the files changed and check out."""
        signature = self._signature()
        if signature == self._seen:
            return None
        with self._lock:
            if signature == self._seen:
                return None
            self._seen = signature  # judge each version of the files once, not per connection
            try:
                configuration = self._load()
            except ValueError as error:
                log.warning("TLS files changed but cannot be used; keeping the old ones: %s", error)
                return None
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return configuration


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for `add_secure_port`; with `client_ca_file`, mutual TLS (required).

    ValueError with a one-line reason when a file cannot be read, the key does not match the
    certificate, or the CA file is not PEM certificates. The files are watched: see the module.
    """
    files = _CertificateFiles(cert_file, key_file, client_ca_file)
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], files.fetch)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, fetcher, require_client_authentication=client_ca_file is not None
    )
