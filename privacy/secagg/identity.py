"""Node identities for secure aggregation: who may sit in a round's roster, and what they sign.

A hospital's identity is its node key (``node.key`` in its kit: the EC P-384 key its SuperNode
authenticates with) and an X.509 certificate for that key (``node.crt``), issued by the federation
CA with the site's name as common name and the extended key usage ``NODE_IDENTITY_USAGE``, which no
other certificate of the federation carries (the coordinator's TLS certificate has server-auth
only). A node signs its round keys and, later, the round's survivor set with that key; every node
checks the other nodes' certificates against the CA certificate of its own kit (``ca.pem``) and
their signatures over the data it was itself sent.

Signed data is domain separated (``PROTOCOL_ID|roster|...``, ``PROTOCOL_ID|survivors|...``, every
field length-prefixed) and hashed with the SHA-2 that matches the curve. Flower's node
authentication signs ASCII timestamps with the same key; those never read as these messages.

Successful checks are remembered per process, keyed on the exact bytes involved (CA, certificate,
message, signature): the virtual nodes of a simulation share one process and see the same roster,
so each entry is checked once per round there, while a deployed node checks every entry itself.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowerbed.exception import NodeError, SecureAggregationError
from flowerbed.privacy.secagg.crypto import PROTOCOL_ID, node_bytes

NODE_IDENTITY_USAGE = x509.ObjectIdentifier("2.25.243199017322656334998375307748041550571")
"""Extended key usage of a node identity certificate: "flowerbed secure-aggregation node" (a UUID OID)."""

NODE_CURVE = ec.SECP384R1()
"""The curve of node keys (Flower's SuperNode authentication keys)."""

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_CACHE_LIMIT = 1 << 16
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Member:
    """A roster member's checked certificate: its site and identity public key.

    Attributes
    ----------
    site : str
        The certificate's common name.
    public_key : EllipticCurvePublicKey
        The node's identity key.
    spki : bytes
        The same key as DER SubjectPublicKeyInfo (what a node keeps between stages).
    not_after : datetime
        End of the certificate's validity.
    """

    site: str
    public_key: ec.EllipticCurvePublicKey
    spki: bytes
    not_after: dt.datetime


@dataclass(frozen=True)
class NodeIdentity:
    """This node's identity: its key, its certificate and the CA it trusts.

    Attributes
    ----------
    site : str
        The certificate's common name.
    private_key : EllipticCurvePrivateKey
        The node key (never leaves the node; not part of any protocol state).
    certificate : bytes
        The node's certificate, DER (sent in its roster entry).
    ca : bytes
        The federation CA certificate, DER: every roster entry must chain to it.
    """

    site: str
    private_key: ec.EllipticCurvePrivateKey
    certificate: bytes
    ca: bytes

    def sign(self, message: bytes) -> bytes:
        """An ECDSA signature of ``message`` with the node key."""
        return self.private_key.sign(message, ec.ECDSA(_hash_for(self.private_key.curve)()))


# ------------------------------------------------------------------------------ signed data


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _ids(ids: Sequence[int]) -> bytes:
    return len(ids).to_bytes(4, "big") + b"".join(node_bytes(i) for i in ids)


def roster_message(
    session: bytes, round_id: int, node_id: int, channel_pk: bytes, mask_pk: bytes, params_digest: bytes
) -> bytes:
    """What a node signs in its advertise reply: its two round keys, bound to session, round, node id and parameters."""
    return b"".join(
        [
            PROTOCOL_ID + b"|roster|",
            _field(session),
            int(round_id).to_bytes(8, "big", signed=True),
            node_bytes(node_id),
            _field(channel_pk),
            _field(mask_pk),
            _field(params_digest),
        ]
    )


def survivors_message(
    session: bytes,
    round_id: int,
    node_id: int,
    survivors: Sequence[int],
    dropped: Sequence[int],
    roster_digest: bytes,
) -> bytes:
    """What a node signs in the consistency check: the survivor and dropout lists and the roster it was sent."""
    return b"".join(
        [
            PROTOCOL_ID + b"|survivors|",
            _field(session),
            int(round_id).to_bytes(8, "big", signed=True),
            node_bytes(node_id),
            _ids(sorted(survivors)),
            _ids(sorted(dropped)),
            _field(roster_digest),
        ]
    )


# ------------------------------------------------------------------------------ checks


def _hash_for(curve: ec.EllipticCurve) -> type[hashes.HashAlgorithm]:
    algorithm = _HASHES.get(curve.name)
    if algorithm is None:
        raise SecureAggregationError(f"identity keys on curve {curve.name} are not supported (use P-384)")
    return algorithm


def _key(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_field(part))
    return digest.digest()


_members: dict[bytes, Member] = {}
_signatures: set[bytes] = set()


def common_name(certificate: x509.Certificate) -> str | None:
    """The certificate's one common name, or None."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
        return None
    return names[0].value


def check_certificate(certificate: bytes, ca: bytes, now: dt.datetime | None = None) -> Member:
    """Check a node certificate (DER) against the CA (DER); return its site and key.

    The certificate must be issued directly by the CA (signature and issuer name), valid now, not a
    CA, carry ``NODE_IDENTITY_USAGE``, one common name, and an EC key on a supported curve.

    Raises
    ------
    SecureAggregationError
        Saying which of these fails (the caller names the node and the stage).
    """
    now = now or dt.datetime.now(dt.UTC)
    key = _key(ca, certificate)
    member = _members.get(key)
    if member is None:
        member = _check_certificate(certificate, ca)
        with _LOCK:
            if len(_members) >= _CACHE_LIMIT:
                _members.clear()
            _members[key] = member
    if now > member.not_after:
        raise SecureAggregationError(f"the certificate of site {member.site!r} has expired")
    return member


def _check_certificate(certificate: bytes, ca: bytes) -> Member:
    try:
        cert = x509.load_der_x509_certificate(certificate)
        authority = x509.load_der_x509_certificate(ca)
    except ValueError:
        raise SecureAggregationError("the certificate is not a valid DER X.509 certificate") from None
    site = common_name(cert)
    label = f"the certificate of site {site!r}" if site else "a certificate without a common name"
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise SecureAggregationError(f"{label} was not issued by this federation's CA") from None
    if site is None:
        raise SecureAggregationError(f"{label} names no site")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecureAggregationError(
            f"{label} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        usages, constraints = None, None
    if usages is None or constraints is None or NODE_IDENTITY_USAGE not in usages or constraints.ca:
        raise SecureAggregationError(f"{label} is not a node identity certificate (wrong key usage)")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _HASHES:
        raise SecureAggregationError(f"{label} does not carry an EC P-384 node key")
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Member(site, public_key, spki, cert.not_valid_after_utc)


def verify_signature(public_key: ec.EllipticCurvePublicKey | bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the key's ECDSA signature of ``message`` (a key object or DER SubjectPublicKeyInfo)."""
    if isinstance(public_key, bytes):
        spki = public_key
        loaded = serialization.load_der_public_key(public_key)
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            return False
        public_key = loaded
    else:
        spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = _key(spki, message, signature)
    if key in _signatures:
        return True
    try:
        public_key.verify(signature, message, ec.ECDSA(_hash_for(public_key.curve)()))
    except (InvalidSignature, ValueError):
        return False
    with _LOCK:
        if len(_signatures) >= _CACHE_LIMIT:
            _signatures.clear()
        _signatures.add(key)
    return True


def forget_checks() -> None:
    """Forget every remembered certificate and signature check (a fresh process, for benchmarks)."""
    with _LOCK:
        _members.clear()
        _signatures.clear()


# ------------------------------------------------------------------------------ loading


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NodeError(f"{path}: cannot read this node's {what}: {exc.strerror or exc}") from None


def _load_certificate(data: bytes, path: Path, what: str) -> x509.Certificate:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise NodeError(f"{path}: not a PEM or DER X.509 certificate ({what})") from None


def _load_private_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise NodeError(f"{path}: not an unencrypted OpenSSH or PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _HASHES:
        raise NodeError(f"{path}: the node key must be an EC key on P-384 (ssh-keygen -t ecdsa -b 384)")
    return key


def load_identity(key_path: str | Path, cert_path: str | Path, ca_path: str | Path) -> NodeIdentity:
    """Read and check this node's identity: key, certificate (OpenSSH/PEM key; PEM/DER certificates).

    Raises
    ------
    NodeError
        Naming the file that is missing or unreadable, a certificate that does not belong to the
        key, or one that the CA does not vouch for.
    """
    key_path, cert_path, ca_path = Path(key_path).expanduser(), Path(cert_path).expanduser(), Path(ca_path).expanduser()
    stamp = tuple(_stamp(p) for p in (key_path, cert_path, ca_path))
    return _load_identity_cached(str(key_path), str(cert_path), str(ca_path), stamp)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as exc:
        raise NodeError(f"{path}: cannot read this node's identity file: {exc.strerror or exc}") from None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4096)
def _load_identity_cached(key_path: str, cert_path: str, ca_path: str, stamp: tuple) -> NodeIdentity:
    return _load_identity(Path(key_path), Path(cert_path), Path(ca_path))


def _load_identity(key_path: Path, cert_path: Path, ca_path: Path) -> NodeIdentity:
    key = _load_private_key(_read(key_path, "identity key"), key_path)
    cert = _load_certificate(_read(cert_path, "identity certificate"), cert_path, "identity-cert")
    ca = _load_certificate(_read(ca_path, "CA certificate"), ca_path, "ca-cert")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise NodeError(f"{ca_path}: not a CA certificate (ca-cert must be the federation's ca.pem)")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise NodeError(f"{cert_path}: this certificate is for another key than {key_path}; use the kit's own pair")
    der = cert.public_bytes(serialization.Encoding.DER)
    ca_der = ca.public_bytes(serialization.Encoding.DER)
    try:
        member = check_certificate(der, ca_der)
    except SecureAggregationError as exc:
        raise NodeError(f"{cert_path}: {exc}; ask the federation's operator to re-provision this kit") from None
    return NodeIdentity(member.site, key, der, ca_der)


# ------------------------------------------------------------------------------ issuing


def issue_node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    site: str,
    public_key: ec.EllipticCurvePublicKey,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A node identity certificate for ``site``'s key, signed by the federation CA.

    Parameters
    ----------
    ca_key, ca_cert
        The federation CA.
    site : str
        The site's name (the common name; 1 to 64 characters).
    public_key : EllipticCurvePublicKey
        The node key's public half.
    not_after : datetime or None (default: None)
        End of validity; at most, and by default, the CA's own.
    """
    now = dt.datetime.now(dt.UTC)
    end = min(not_after or ca_cert.not_valid_after_utc, ca_cert.not_valid_after_utc)
    organizations = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(organizations[0].value))] if organizations else []
    subject = x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, site)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([NODE_IDENTITY_USAGE, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def throwaway_federation(
    sites: Sequence[str], days: int = 7
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, dict[str, NodeIdentity]]:
    """A new CA and one identity per site, in memory: for simulations, benchmarks and tests.

    Returns
    -------
    tuple
        The CA's key and certificate (the caller discards the key once it issued what it needs)
        and ``{site: NodeIdentity}``.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerbed simulation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "throwaway federation CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_der = ca_cert.public_bytes(serialization.Encoding.DER)
    identities = {}
    for site in sites:
        key = ec.generate_private_key(NODE_CURVE)
        cert = issue_node_certificate(ca_key, ca_cert, site, key.public_key())
        identities[site] = NodeIdentity(site, key, cert.public_bytes(serialization.Encoding.DER), ca_der)
    return ca_key, ca_cert, identities
