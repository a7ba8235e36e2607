"""Certificates and keys of the local control plane, made with the `cryptography` package: one CA
that signs the API server's serving certificate and every client certificate, and the key pair
that signs service-account tokens. ECDSA P-256 throughout: Kubernetes accepts it everywhere and it
is generated in microseconds, where RSA would add seconds to each start on a busy machine."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
                     + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Backdated a little: the processes that check it may read a clock a moment behind.
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY))


class CertificateAuthority:
    """The plane's one CA. Kept in memory after `create`/`load`, so further certificates
    (a node's, a test user's) can be issued at any time."""

    def __init__(self, pair: Pair):
        self.pair = pair
        self._cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):  # `create` writes only ECDSA keys
            raise TypeError(f"{pair.key}: not an ECDSA private key")
        self._key = key

    @classmethod
    def create(cls, directory: Path, common_name: str = "kubetune-local-ca") -> CertificateAuthority:
        key = _key()
        name = _name(common_name)
        cert = (_builder(name, name, key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        pair = Pair(directory / "ca.crt", directory / "ca.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return cls(pair)

    def issue(self, directory: Path, file_stem: str, common_name: str, *, organizations: tuple[str, ...] = (),
              hosts: tuple[str, ...] = ()) -> Pair:
        """A certificate for a client (the user is `common_name`, its groups `organizations`) or,
        with `hosts`, for a server answering on those names and IP addresses."""
        key = _key()
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if hosts else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (_builder(_name(common_name, organizations), self._cert.subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pair = Pair(directory / f"{file_stem}.crt", directory / f"{file_stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def signing_key_pair(directory: Path, file_stem: str = "sa") -> Pair:
    """The key pair that signs service-account tokens (`cert` holds the public key, not a certificate)."""
    key = _key()
    pair = Pair(directory / f"{file_stem}.pub", directory / f"{file_stem}.key")
    pair.cert.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    _write_key(key, pair.key)
    return pair
