"""Real nats-servers configured for each way a node authenticates: made here, with no tool but Python.

* certificates: a CA, a server certificate for 127.0.0.1 and a client certificate (``cryptography``);
* nkeys: seeds made with the ``nkeys`` package (what ``nk -gen user`` writes);
* creds: operator → account → user JWTs signed with those nkeys, as ``nsc`` would issue them, and a
  server in operator mode with the account preloaded (``resolver: MEMORY``), JetStream enabled for it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kre_runner.dev.embedded import EmbeddedNats, find_nats_server


class ConfiguredNats(EmbeddedNats):
    """``nats-server -c <config>`` with JetStream; ``body`` is the config without listen/jetstream."""

    def __init__(self, body: str, scheme: str = "nats") -> None:
        super().__init__()
        self.scheme = scheme
        self.config = Path(self.dir) / "server.conf"
        self.config.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                               f'jetstream {{ store_dir: "{self.dir}/js" }}\n{body}\n')

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [find_nats_server(), "-c", str(self.config)]


# ------------------------------------------------------------------ nkeys and JWTs

def new_seed(prefix: int) -> bytes:
    """A fresh nkey seed (``SU...`` for a user, ``SA...`` an account, ``SO...`` an operator)."""
    return nkeys.encode_seed(os.urandom(32), prefix)


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(seed).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def issue_jwt(signer_seed: bytes, subject: str, name: str, nats: dict[str, object],
              issuer_account: str | None = None) -> str:
    """A NATS v2 JWT (``ed25519-nkey``) for ``subject``, signed by ``signer_seed``."""
    claims: dict[str, object] = {"iat": int(time.time()), "iss": public_key(signer_seed), "name": name,
                                 "sub": subject, "nats": nats}
    if issuer_account:
        claims["nats"] = {**nats, "issuer_account": issuer_account}
    # jti: the hash of the claims without it, as the Go library computes it.
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(signer_seed).sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


@dataclass
class Operator:
    """An operator, one JetStream-enabled account and one user: the server config and the user's creds."""

    operator_jwt: str
    system_public: str
    system_jwt: str
    account_public: str
    account_jwt: str
    user_seed: bytes
    user_jwt: str

    @classmethod
    def create(cls) -> Operator:
        operator_seed = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        operator_jwt = issue_jwt(operator_seed, public_key(operator_seed), "kre-test-operator",
                                 {"type": "operator", "version": 2})
        # JetStream needs a system account in operator mode.
        system_seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        system = public_key(system_seed)
        system_jwt = issue_jwt(operator_seed, system, "SYS", {"type": "account", "version": 2})
        account_seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        account = public_key(account_seed)
        unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                     "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
                     "max_ack_pending": -1, "mem_max_stream_bytes": -1, "disk_max_stream_bytes": -1,
                     "max_bytes_required": False}
        account_jwt = issue_jwt(operator_seed, account, "kre-test-account",
                                {"type": "account", "version": 2, "limits": unlimited})
        user_seed = new_seed(nkeys.PREFIX_BYTE_USER)
        user_jwt = issue_jwt(account_seed, public_key(user_seed), "kre-test-user",
                             {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1})
        return cls(operator_jwt, system, system_jwt, account, account_jwt, user_seed, user_jwt)

    def server_config(self, directory: Path) -> str:
        path = directory / "operator.jwt"
        path.write_text(self.operator_jwt)
        return (f'operator: "{path}"\nresolver: MEMORY\nsystem_account: {self.system_public}\n'
                f'resolver_preload: {{ {self.system_public}: "{self.system_jwt}", '
                f'{self.account_public}: "{self.account_jwt}" }}\n')

    def creds(self, user_jwt: str | None = None) -> str:
        return (f"-----BEGIN NATS USER JWT-----\n{user_jwt or self.user_jwt}\n------END NATS USER JWT------\n\n"
                "************************* IMPORTANT *************************\n"
                "NKEY Seed printed below can be used to sign and prove identity.\n\n"
                f"-----BEGIN USER NKEY SEED-----\n{self.user_seed.decode()}\n------END USER NKEY SEED------\n")


# ------------------------------------------------------------------ certificates

@dataclass
class Certificates:
    """PEM files: ``ca``, ``server_cert``/``server_key`` (127.0.0.1), ``client_cert``/``client_key``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of them: verification must fail with it

    @classmethod
    def create(cls, directory: Path) -> Certificates:
        ca_key, ca_cert = _ca("kre-test-ca")
        other_key, other_cert = _ca("kre-test-other-ca")
        del other_key
        files: dict[str, Path] = {}
        for name, cert in (("ca", ca_cert), ("other_ca", other_cert)):
            files[name] = _write(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        for role, server in (("server", True), ("client", False)):
            key, cert = _leaf(ca_key, ca_cert, server)
            files[f"{role}_cert"] = _write(directory / f"{role}.crt", cert.public_bytes(serialization.Encoding.PEM))
            files[f"{role}_key"] = _write(directory / f"{role}.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cls(**files)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + day)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = _validity(x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                        .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                      key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                      decipher_only=False), critical=True)
    return key, builder.sign(key, hashes.SHA256())


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = "127.0.0.1" if server else "kre-node"
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                        .issuer_name(ca_cert.subject).public_key(key.public_key())
                        .serial_number(x509.random_serial_number()))
    usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())
