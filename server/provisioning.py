"""Provisioning: a federation's certificate authority, the coordinator's TLS certificate, node keys.

``provision`` turns a federation file into this folder (``output`` in the file)::

    ca/ca.pem, ca/ca.key                   the federation's certificate authority (key 0600)
    coordinator/ca.pem                     the CA certificate, for ``flowerbed run`` commands
    coordinator/server.pem, server.key     the coordinator's TLS certificate and key (key 0600)
    coordinator/node-keys/<site>.pub       every hospital's public key, registered at start
    coordinator/operator.token             the operator's credential for ``flowerbed run`` (0600)
    kits/<site>/                           one start-up kit per hospital:
        kit.toml                           site name, federation, coordinator address
        ca.pem                             the CA certificate that vouches for the coordinator
        node.key, node.pub                 the node's authentication key pair (key 0600)
        node.crt                           the CA's certificate for node.key naming the site: the
                                           node's identity in secure aggregation
        contract.json                      the federation's data contract (when the file names one)
        flowerbed-<version>-py3-none-any.whl  flowerbed itself, to install without a package index
                                           (``--wheel``: a wheel, or a source folder to build one)
        README.md                          what the hospital's IT does with the kit

Flower's SuperNode authenticates with an elliptic-curve key on a NIST curve in OpenSSH format
(``ssh-keygen -t ecdsa -b 384``): the private key is read with ``load_ssh_private_key`` and the
public key is registered at the SuperLink with ``flwr supernode register``. TLS keys and
certificates are PEM. Existing keys are never overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowerbed.exception import ConfigError
from flowerbed.kit import KIT_FILE
from flowerbed.server.federation_config import FederationConfig

NODE_CURVE = ec.SECP384R1()
TLS_CURVE = ec.SECP256R1()


@dataclass
class ProvisionReport:
    """What ``provision`` wrote and what it left alone (paths)."""

    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    kits: dict[str, Path] = field(default_factory=dict)
    wheel: Path | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def generate_ca(federation: str, validity_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate authority for one federation.

    Parameters
    ----------
    federation : str
        The federation's name (goes in the certificate's subject).
    validity_days : int
        How long the CA certificate stays valid.
    """
    key = ec.generate_private_key(TLS_CURVE)
    subject = _name(f"{federation} federation CA", federation)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=validity_days))
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
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ip_addresses: list[str],
    validity_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The coordinator's TLS certificate, signed by the federation CA.

    Parameters
    ----------
    ca_key, ca_cert
        The federation CA.
    dns_names, ip_addresses : list[str]
        Subject alternative names: every name and address hospitals use to reach the coordinator.
    validity_days : int
        How long the certificate stays valid (public CAs allow at most 397 days).
    """
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(TLS_CURVE)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    now = _now()
    not_after = min(now + dt.timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ip_addresses[0], str(organization)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_agreement=True,
                content_commitment=False,
                data_encipherment=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def generate_node_key_pair(site: str) -> tuple[bytes, bytes]:
    """A node-authentication key pair in the format Flower's SuperNode expects.

    Returns
    -------
    tuple[bytes, bytes]
        The private key (OpenSSH PEM, unencrypted: the SuperNode reads it without a passphrase)
        and the public key (one OpenSSH line, ``ecdsa-sha2-nistp384 AAAA... flowerbed:<site>``).
    """
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" flowerbed:{site}\n".encode()


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600), replacing any file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate, public key or text file (0644), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def certificate_sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses a certificate carries."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(ext.get_values_for_type(x509.DNSName)), {str(a) for a in ext.get_values_for_type(x509.IPAddress)}


def is_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` was issued by ``ca_cert`` (signature check)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception):  # InvalidSignature has no common base
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the provisioning folder


class ProvisionPaths:
    """Where every provisioned file lives under the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_cert = root / "ca" / "ca.pem"
        self.ca_key = root / "ca" / "ca.key"
        self.coordinator = root / "coordinator"
        self.coordinator_ca = self.coordinator / "ca.pem"
        self.server_cert = self.coordinator / "server.pem"
        self.server_key = self.coordinator / "server.key"
        self.node_keys = self.coordinator / "node-keys"
        self.operator_token = self.coordinator / "operator.token"

    def kit(self, site: str) -> Path:
        """A site's start-up kit folder."""
        return self.root / "kits" / site

    def registered_key(self, site: str) -> Path:
        """A site's public key as the coordinator registers it."""
        return self.node_keys / f"{site}.pub"


def provision(
    federation: FederationConfig,
    *,
    sites: list[str] | None = None,
    force: bool = False,
    ca_days: int | None = None,
    server_days: int | None = None,
    wheel: Path | None = None,
) -> ProvisionReport:
    """Create whatever the federation still lacks: CA, coordinator certificate, kits.

    Parameters
    ----------
    federation : FederationConfig
        The validated federation file.
    sites : list[str] | None (default: None)
        Only (re)provision these sites' kits; the CA and the coordinator certificate are then
        left alone. ``None`` means every site and the coordinator.
    force : bool (default: False)
        Replace existing node keys and the coordinator certificate (key rotation). The CA is never
        replaced: to start a new CA, move the old ``ca/`` folder away first.
    ca_days, server_days : int | None (default: None)
        Override the file's ``validity`` section.
    wheel : Path | None (default: None)
        flowerbed's wheel for every kit (a hospital installs it without a package index): a
        ``.whl`` file, or a flowerbed source folder to build it from (``pip wheel --no-deps``,
        into ``<output>/dist``).

    Raises
    ------
    ConfigError
        A named site is not in the file, or an existing coordinator certificate no longer matches
        the file or the CA and ``force`` is not set.
    """
    paths = ProvisionPaths(federation.output_dir)
    report = ProvisionReport()
    source = federation.source
    unknown = [s for s in sites or [] if s not in federation.site_names()]
    if unknown:
        raise ConfigError(
            source,
            [f"site {s!r} is not in the federation file (add it with --add-site {s})" for s in unknown],
        )
    ca_key, ca_cert = _ensure_ca(federation, paths, report, ca_days)
    write_public(paths.coordinator_ca, _pem(ca_cert))
    _ensure_operator_token(paths, report)
    if sites is None:
        _ensure_server_certificate(federation, paths, report, ca_key, ca_cert, force, server_days)
    if wheel is not None:
        report.wheel = flowerbed_wheel(wheel, paths.root / "dist")
    for site in sites if sites is not None else federation.site_names():
        _ensure_kit(federation, paths, site, report, force, ca_key, ca_cert)
    return report


def flowerbed_wheel(source: Path, folder: Path) -> Path:
    """flowerbed's wheel: ``source`` itself (a ``.whl``), or built from a source folder into ``folder``.

    Raises
    ------
    ConfigError
        When ``source`` is neither flowerbed's wheel nor its source folder, or the build fails.
    """
    source = source.expanduser().resolve()
    if source.is_dir():
        project = source / "pyproject.toml"
        name = tomllib.loads(project.read_text()).get("project", {}).get("name") if project.is_file() else None
        if name != "flowerbed":
            raise ConfigError(f"--wheel {source}", ["not a flowerbed source folder (no pyproject.toml of flowerbed)"])
        folder.mkdir(parents=True, exist_ok=True)
        before = set(folder.glob("flowerbed-*.whl"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
        result = subprocess.run([*command, str(source)], capture_output=True, text=True, check=False)
        built = sorted(set(folder.glob("flowerbed-*.whl")) - before) or sorted(folder.glob("flowerbed-*.whl"))
        if result.returncode != 0 or not built:
            raise ConfigError(
                f"--wheel {source}",
                [
                    f"pip wheel failed ({(result.stderr or result.stdout).strip()[-300:]}); build it yourself with "
                    "`pip wheel --no-deps FLOWERBED_SOURCE -w dist` and give --wheel dist/flowerbed-*.whl"
                ],
            )
        source = max(built, key=lambda p: p.stat().st_mtime)
    if not (source.name.startswith("flowerbed-") and source.suffix == ".whl" and zipfile.is_zipfile(source)):
        raise ConfigError(f"--wheel {source}", ["not flowerbed's wheel (flowerbed-<version>-py3-none-any.whl)"])
    with zipfile.ZipFile(source) as archive:
        if "flowerbed/server/app.py" not in archive.namelist():
            raise ConfigError(f"--wheel {source}", ["this wheel does not hold flowerbed's server and node code"])
    return source


def kit_wheels(kit: Path) -> list[Path]:
    """The flowerbed wheels in a kit folder (the newest last)."""
    return sorted(kit.glob("flowerbed-*.whl"), key=lambda p: p.stat().st_mtime)


def _ensure_ca(
    federation: FederationConfig,
    paths: ProvisionPaths,
    report: ProvisionReport,
    ca_days: int | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if paths.ca_key.exists() and paths.ca_cert.exists():
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(str(paths.ca_key), ["not an elliptic-curve CA key"])
        report.kept += [paths.ca_cert, paths.ca_key]
        return key, load_certificate(paths.ca_cert)
    if paths.ca_key.exists() or paths.ca_cert.exists():
        raise ConfigError(
            str(paths.ca_cert.parent),
            ["has only one of ca.pem and ca.key: restore the missing file or move the folder away"],
        )
    key, cert = generate_ca(federation.name, ca_days or federation.validity.ca_days)
    write_private(paths.ca_key, _pem(key))
    write_public(paths.ca_cert, _pem(cert))
    report.created += [paths.ca_cert, paths.ca_key]
    return key, cert


def _ensure_operator_token(paths: ProvisionPaths, report: ProvisionReport) -> None:
    """The operator's credential for run commands (0600, coordinator folder only; kept once made)."""
    from flowerbed.server.operator_auth import new_token

    if paths.operator_token.exists():
        report.kept.append(paths.operator_token)
        return
    write_private(paths.operator_token, new_token())
    report.created.append(paths.operator_token)


def _ensure_server_certificate(
    federation: FederationConfig,
    paths: ProvisionPaths,
    report: ProvisionReport,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    force: bool,
    server_days: int | None,
) -> None:
    dns, ips = federation.coordinator.subject_alt_names()
    if paths.server_cert.exists() and paths.server_key.exists() and not force:
        cert = load_certificate(paths.server_cert)
        problems = []
        if not is_signed_by(cert, ca_cert):
            problems.append("coordinator/server.pem was not issued by ca/ca.pem")
        have_dns, have_ips = certificate_sans(cert)
        missing = sorted((set(dns) - have_dns) | (set(ips) - have_ips))
        if missing:
            problems.append(f"coordinator/server.pem lacks {', '.join(missing)} from [coordinator]")
        if problems:
            raise ConfigError(
                str(paths.root),
                [*problems, "re-run with --force to issue a new coordinator certificate"],
            )
        report.kept += [paths.server_cert, paths.server_key]
        return
    key, cert = issue_server_certificate(ca_key, ca_cert, dns, ips, server_days or federation.validity.server_days)
    write_private(paths.server_key, _pem(key))
    write_public(paths.server_cert, _pem(cert))
    report.created += [paths.server_cert, paths.server_key]


def _ensure_kit(
    federation: FederationConfig,
    paths: ProvisionPaths,
    site: str,
    report: ProvisionReport,
    force: bool,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    kit = paths.kit(site)
    key_path, pub_path = kit / "node.key", kit / "node.pub"
    if key_path.exists() and pub_path.exists() and not force:
        report.kept += [key_path, pub_path]
        public = pub_path.read_bytes()
    else:
        private, public = generate_node_key_pair(site)
        write_private(key_path, private)
        write_public(pub_path, public)
        report.created += [key_path, pub_path]
    _ensure_node_certificate(kit / "node.crt", public, site, report, ca_key, ca_cert)
    write_public(paths.registered_key(site), public)
    write_public(kit / "ca.pem", paths.ca_cert.read_bytes())
    kit_toml = (
        f'site = "{site}"\n'
        f'federation = "{federation.name}"\n'
        f'coordinator = "{federation.coordinator.address}"\n'
        'ca = "ca.pem"\n'
        'node_key = "node.key"\n'
        'node_cert = "node.crt"\n'
    )
    if federation.contract is not None:  # the federation's data contract, as every node reads its data
        from flowerbed.tasks.data.catalog import named_contract

        write_public(kit / "contract.json", named_contract(federation.contract, federation.base_dir).to_json().encode())
        kit_toml += 'contract = "contract.json"\n'
    write_public(kit / KIT_FILE, kit_toml.encode())
    if report.wheel is not None:
        for old in kit_wheels(kit):
            old.unlink()
        shutil.copy2(report.wheel, kit / report.wheel.name)
        os.chmod(kit / report.wheel.name, 0o644)
        report.created.append(kit / report.wheel.name)
    wheels = kit_wheels(kit)
    write_public(kit / "README.md", kit_readme(federation, site, wheels[-1].name if wheels else None).encode())
    report.kits[site] = kit


def _ensure_node_certificate(
    path: Path,
    public: bytes,
    site: str,
    report: ProvisionReport,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    """The node's identity certificate (``node.crt``), made when missing or no longer current.

    Current: it names the site, certifies ``node.pub``, comes from this CA and has not expired
    (it is issued for as long as the CA is valid).
    """
    from flowerbed.privacy.secagg.identity import common_name, issue_node_certificate

    key = serialization.load_ssh_public_key(public)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(str(path.parent / "node.pub"), ["not an elliptic-curve node key; re-run with --force"])
    if path.exists():
        cert = load_certificate(path)
        current = (
            common_name(cert) == site
            and is_signed_by(cert, ca_cert)
            and cert.public_key().public_numbers() == key.public_numbers()
            and _now() < cert.not_valid_after_utc
        )
        if current:
            report.kept.append(path)
            return
    write_public(path, _pem(issue_node_certificate(ca_key, ca_cert, site, key)))
    report.created.append(path)


def install_steps(wheel: str | None) -> str:
    """The kit README's install step: flowerbed from the kit's wheel, with a package index or without one."""
    from flowerbed import __version__

    name = wheel or f"flowerbed-{__version__}-py3-none-any.whl"
    get = (
        f"flowerbed is not on a public package index;\n   this kit carries it: `{name}`."
        if wheel
        else f"flowerbed is not on a public package index:\n   ask the coordinator's operator for `{name}` "
        "(`flowerbed provision --wheel` puts it in every kit)."
    )
    return f"""2. Install flowerbed on that machine (Python 3.11+). {get}
   In a virtual environment of its own:

       python3 -m venv /opt/flowerbed/venv
       /opt/flowerbed/venv/bin/pip install /opt/flowerbed/kit/{name}

   pip takes flowerbed's dependencies (torch, Flower, Opacus, ...) from PyPI or your package
   mirror. Without any package index: on a machine with internet access and the same operating
   system, processor type and Python version, run

       pip download /path/to/{name} -d wheelhouse

   copy `wheelhouse/` to the node's machine and install from it alone:

       /opt/flowerbed/venv/bin/pip install --no-index --find-links wheelhouse flowerbed

   The commands below run from the environment without activating it, as a service manager
   runs them: `/opt/flowerbed/venv/bin/flowerbed ...`."""


def kit_readme(federation: FederationConfig, site: str, wheel: str | None = None) -> str:
    """The start-up kit's README for the hospital's IT staff (``wheel``: the flowerbed wheel in the kit)."""
    contact = next((s.contact for s in federation.sites if s.name == site), "") or "the coordinator's operator"
    wheel_line = f"\n- `{wheel}`: flowerbed itself, to install (step 2)." if wheel else ""
    return f"""# Start-up kit: {site} in federation "{federation.name}"

This folder lets this hospital's computer join the federation. It contains no patient data and
sends none: only model updates leave the hospital, and only for tasks this node allows.

- `node.key`: this node's private key; it proves to the coordinator that you are {site}.
  Keep it secret, readable only by the account that runs the node (mode 0600).
- `node.pub`: the matching public key (the coordinator already has a copy).
- `node.crt`: the federation CA's certificate for that key, naming {site}. In secure aggregation
  this node signs its round keys with `node.key` and sends `node.crt`; every other node checks
  both, so the coordinator cannot put keys of its own in place of this hospital's.
- `ca.pem`: the federation's certificate authority; the node talks only to a coordinator that
  this authority vouches for, and accepts in a secure-aggregation round only nodes it certified.
- `kit.toml`: site name, federation name and the coordinator's address
  ({federation.coordinator.address}).{wheel_line}

## Steps

1. Copy this folder to the machine that can read the hospital's data, e.g. `/opt/flowerbed/kit`,
   and check that `node.key` is readable only by the account that runs the node:
   `chmod 600 node.key`. Open outgoing TCP to {federation.coordinator.address}; nothing incoming.
{install_steps(wheel)}
3. Check your data without any network access:
   `flowerbed node check --kit /opt/flowerbed/kit --data /path/to/data.csv`
4. Join the federation:
   `flowerbed node start --kit /opt/flowerbed/kit --data /path/to/data.csv \\
      --ledger /var/lib/flowerbed/ledger.db --budget-epsilon 8`
   The node runs flowerbed's built-in tasks. A task written by a researcher runs only after you
   approve its source: `flowerbed node approve package.module:attr`.
5. Run it as a service (systemd, Windows service) that restarts on failure.
6. See the privacy budget, what each run spent and what is left:
   `flowerbed node budget --kit /opt/flowerbed/kit`

If `node.key` leaks, tell the coordinator's operator: they issue a new kit and the old key stops
working. Contact: {contact}.
See docs/deployment.md in the flowerbed documentation for details.
"""
