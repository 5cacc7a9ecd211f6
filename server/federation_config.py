"""The federation file: who the coordinator is, which hospitals take part, how long certificates last.

One validated TOML document, read by ``flowerbed provision`` and ``flowerbed coordinator start``.
Every section forbids unknown keys, so a typo is an error that names the key. Relative paths are
relative to the federation file's folder. Example::

    name = "heart-study"
    output = "provision"             # CA, coordinator certificate, start-up kits

    [coordinator]
    address = "fl.example.org:9093"  # what hospitals and operators dial (host:port)
    bind_host = "0.0.0.0"            # where the coordinator listens (the port is the address's)
    dns_names = ["fl.example.org"]   # extra names in the TLS certificate
    ip_addresses = ["10.1.2.3"]      # extra IP addresses in the TLS certificate
    state = "coordinator-state"      # database, logs, Flower home, runs

    [validity]
    ca_days = 3650
    server_days = 397

    [[sites]]
    name = "cleveland"
    contact = "it-helpdesk@cleveland.example.org"
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowerbed.config_utils import read_toml, validate
from flowerbed.exception import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:9093``) into host and port.

    Raises
    ------
    ValueError
        If the address has no port or the port is out of range.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{address!r} must look like host:port, e.g. fl.example.org:9093")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} must be between 1 and 65535")
    return host.strip("[]"), port


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is a literal IPv4 or IPv6 address (not a DNS name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class CoordinatorConfig(_Section):
    """Where the coordinator (Flower SuperLink) is reached and where it keeps its state."""

    address: str
    bind_host: str = "0.0.0.0"
    dns_names: list[str] = Field(default_factory=list)
    ip_addresses: list[str] = Field(default_factory=list)
    state: str = "coordinator-state"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("ip_addresses")
    @classmethod
    def _ips(cls, value: list[str]) -> list[str]:
        for item in value:
            if not is_ip_address(item):
                raise ValueError(f"{item!r} is not an IP address (put DNS names in dns_names)")
        return value

    @property
    def host(self) -> str:
        """The host part of ``address``."""
        return split_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port the coordinator listens on and hospitals dial."""
        return split_address(self.address)[1]

    def subject_alt_names(self) -> tuple[list[str], list[str]]:
        """DNS names and IP addresses the coordinator's certificate must carry.

        The address's host, the listed names, and always ``localhost`` / ``127.0.0.1``: Flower's
        own ServerApp process reaches the SuperLink over loopback with the same certificate.
        """
        dns = [*self.dns_names, "localhost"]
        ips = [*self.ip_addresses, "127.0.0.1"]
        (ips if is_ip_address(self.host) else dns).insert(0, self.host)
        return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


class ValidityConfig(_Section):
    """How long certificates stay valid, in days."""

    ca_days: int = Field(default=3650, gt=0, le=36500)
    server_days: int = Field(default=397, gt=0, le=3650)


class SiteConfig(_Section):
    """One hospital: its name (also its kit's folder name), who runs its node, and the most examples it may claim."""

    name: str
    contact: str = ""
    max_examples: int | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SITE_NAME.match(value):
            raise ValueError(
                "use letters, digits, '-', '_' or '.', starting with a letter or digit (at most 63 characters)"
            )
        return value


class FederationConfig(_Section):
    """A whole federation: see ``docs/deployment.md``."""

    name: str = "federation"
    output: str = "provision"
    coordinator: CoordinatorConfig
    validity: ValidityConfig = Field(default_factory=ValidityConfig)
    sites: list[SiteConfig] = Field(default_factory=list)
    # The federation's data contract, copied into every kit: a built-in name or a .toml/.json file.
    contract: str | None = None
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="federation.toml", exclude=True)

    @model_validator(mode="after")
    def _unique_sites(self) -> FederationConfig:
        seen: set[str] = set()
        for site in self.sites:
            if site.name.lower() in seen:
                raise ValueError(f"site {site.name!r} is listed twice (site names must be unique)")
            seen.add(site.name.lower())
        return self

    @property
    def output_dir(self) -> Path:
        """Absolute folder ``flowerbed provision`` writes to."""
        return (self.base_dir / self.output).resolve()

    @property
    def state_dir(self) -> Path:
        """Absolute folder of the coordinator's database, logs and runs."""
        return (self.base_dir / self.coordinator.state).resolve()

    def site_names(self) -> list[str]:
        """The sites' names, in file order."""
        return [s.name for s in self.sites]


def load_federation(path: str | Path) -> FederationConfig:
    """Read and validate a federation file.

    Raises
    ------
    ConfigError
        Naming the file and every bad key.
    """
    path = Path(path)
    data = read_toml(path, "federation.toml")
    for internal in ("base_dir", "source"):
        if internal in data:
            raise ConfigError(str(path), [f"{internal}: unknown key (check the spelling; see docs/deployment.md)"])
    data = {**data, "base_dir": path.resolve().parent, "source": str(path)}
    return validate(FederationConfig, data, str(path), "docs/deployment.md")


def append_site(path: str | Path, name: str, contact: str = "") -> bool:
    """Add a ``[[sites]]`` entry to the federation file; False if the site is already there.

    The file is appended to, never rewritten, so comments and layout stay as the operator wrote them.
    """
    path = Path(path)
    federation = load_federation(path)
    if name in federation.site_names():
        return False
    try:
        SiteConfig(name=name, contact=contact)
    except ValidationError as exc:
        raise ConfigError(
            str(path),
            [f"--add-site {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()],
        ) from None
    entry = f'\n[[sites]]\nname = "{name}"\n'
    if contact:
        entry += f'contact = "{contact}"\n'
    text = path.read_text()
    path.write_text(text + ("" if text.endswith("\n") else "\n") + entry)
    load_federation(path)
    return True
