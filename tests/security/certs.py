"""Certificates made at test time with `cryptography`: a CA, a server certificate for 127.0.0.1 and
localhost, client certificates with a common name, and a foreign CA that the server does not trust.

Keys are EC P-256 (fast to make); everything is valid from an hour ago for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A PEM certificate and its unencrypted PEM key, and where they were written."""

    cert: bytes
    key: bytes
    cert_file: Path
    key_file: Path


class Authority:
    """A self-signed CA that issues server and client certificates into `directory`."""

    def __init__(self, directory: Path, name: str = "turnid test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self._certificate.public_bytes(serialization.Encoding.PEM)
        self.cert_file = directory / "ca.pem"
        self.cert_file.write_bytes(self.cert)

    def issue(
        self,
        stem: str,
        *,
        common_name: str | None = None,
        server: bool = False,
        extra_common_names: tuple[str, ...] = (),
    ) -> Pair:
        """A certificate signed by this CA: for 127.0.0.1/localhost when `server`, else a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name or stem)]
        attributes += [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in extra_common_names]
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        cert = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_file, key_file = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_file.write_bytes(cert)
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        return Pair(cert, key_pem, cert_file, key_file)


@dataclass(frozen=True)
class Pki:
    """Everything the TLS tests use."""

    ca: Authority
    server: Pair
    client: Pair  # common name "team-a"
    foreign_ca: Authority
    foreign_client: Pair  # common name "team-a" too, but from a CA the server does not trust


def make_pki(directory: Path) -> Pki:
    ca = Authority(directory / "ca")
    foreign = Authority(directory / "foreign", name="someone else's CA")
    return Pki(
        ca=ca,
        server=ca.issue("server", common_name="turnid test server", server=True),
        client=ca.issue("client", common_name="team-a"),
        foreign_ca=foreign,
        foreign_client=foreign.issue("client", common_name="team-a"),
    )
