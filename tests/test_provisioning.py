"""Provisioning: federation file validation, CA and certificates, node keys, kits, no overwrites."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from flowerbed.exception import ConfigError, NodeError
from flowerbed.kit import load_kit
from flowerbed.server.federation_config import append_site, load_federation
from flowerbed.server.provisioning import (
    ProvisionPaths,
    certificate_sans,
    is_signed_by,
    load_certificate,
    provision,
)

FEDERATION = """
name = "heart-study"
output = "out"

[coordinator]
address = "fl.example.org:9093"
dns_names = ["fl-alt.example.org"]
ip_addresses = ["10.1.2.3"]

[validity]
ca_days = 30
server_days = 7

[[sites]]
name = "cleveland"

[[sites]]
name = "hungary"
contact = "it@hungary.example.org"
"""


@pytest.fixture
def fed_file(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(FEDERATION)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_federation_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text(
        '[coordinator]\naddress = "no-port"\nbind = "x"\n[validity]\nca_days = -1\n'
        '[[sites]]\nname = "a b"\n[[sites]]\nname = "ok"\n[[sites]]\nname = "OK"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    text = str(info.value)
    assert "coordinator.address = 'no-port'" in text
    assert "coordinator.bind: unknown key" in text
    assert "validity.ca_days = -1" in text
    assert "sites.0.name = 'a b'" in text
    assert str(path) in text


def test_federation_missing_coordinator(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('name = "x"\n')
    with pytest.raises(ConfigError, match="coordinator: required key is missing"):
        load_federation(path)


def test_provision_creates_ca_certificate_and_kits(fed_file: Path) -> None:
    fed = load_federation(fed_file)
    report = provision(fed)
    paths = ProvisionPaths(fed_file.parent / "out")
    assert set(report.kits) == {"cleveland", "hungary"}
    for private in (paths.ca_key, paths.server_key, *(paths.kit(s) / "node.key" for s in report.kits)):
        assert _mode(private) == 0o600, private
    ca, server = load_certificate(paths.ca_cert), load_certificate(paths.server_cert)
    assert is_signed_by(server, ca)
    dns, ips = certificate_sans(server)
    assert dns == {"fl.example.org", "fl-alt.example.org", "localhost"}
    assert ips == {"10.1.2.3", "127.0.0.1"}
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 6 < lifetime.days <= 7

    kit = load_kit(paths.kit("hungary"))
    assert (kit.site, kit.coordinator, kit.federation) == ("hungary", "fl.example.org:9093", "heart-study")
    assert "it@hungary.example.org" in (kit.folder / "README.md").read_text()
    # the formats Flower's SuperNode and `flwr supernode register` read
    private = load_ssh_private_key(kit.node_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public_line = (kit.folder / "node.pub").read_bytes()
    assert load_ssh_public_key(public_line).public_numbers() == private.public_key().public_numbers()
    assert try_load_public_key(paths.registered_key("hungary"))
    assert (kit.folder / "ca.pem").read_bytes() == paths.ca_cert.read_bytes()


def test_provision_never_overwrites_without_force(fed_file: Path) -> None:
    fed = load_federation(fed_file)
    provision(fed)
    paths = ProvisionPaths(fed.output_dir)
    keys = [paths.ca_key, paths.server_key, paths.kit("cleveland") / "node.key"]
    before = [k.read_bytes() for k in keys]
    again = provision(fed)
    assert again.created == []
    assert [k.read_bytes() for k in keys] == before

    rotated = provision(fed, sites=["cleveland"], force=True)
    assert paths.kit("cleveland") / "node.key" in rotated.created
    assert (paths.kit("cleveland") / "node.key").read_bytes() != before[2]
    assert paths.registered_key("cleveland").read_bytes() == (paths.kit("cleveland") / "node.pub").read_bytes()
    assert paths.ca_key.read_bytes() == before[0]  # the CA is never replaced
    assert paths.server_key.read_bytes() == before[1]  # --site leaves the coordinator alone


def test_changed_address_needs_force(fed_file: Path) -> None:
    provision(load_federation(fed_file))
    fed_file.write_text(FEDERATION.replace("fl.example.org:9093", "fl-new.example.org:9093"))
    fed = load_federation(fed_file)
    with pytest.raises(ConfigError, match="(?s)lacks fl-new.example.org.*--force"):
        provision(fed)
    provision(fed, force=True)
    dns, _ = certificate_sans(load_certificate(ProvisionPaths(fed.output_dir).server_cert))
    assert "fl-new.example.org" in dns


def test_add_site_appends_and_provisions_only_that_site(fed_file: Path) -> None:
    provision(load_federation(fed_file))
    assert append_site(fed_file, "va-longbeach")
    assert not append_site(fed_file, "va-longbeach")
    fed = load_federation(fed_file)
    assert fed.site_names()[-1] == "va-longbeach"
    report = provision(fed, sites=["va-longbeach"])
    assert set(report.kits) == {"va-longbeach"}
    with pytest.raises(ConfigError, match="--add-site"):
        append_site(fed_file, "bad name")
    with pytest.raises(ConfigError, match="'zurich' is not in the federation file"):
        provision(fed, sites=["zurich"])


def test_kit_with_readable_key_is_refused(fed_file: Path) -> None:
    fed = load_federation(fed_file)
    provision(fed)
    key = ProvisionPaths(fed.output_dir).kit("cleveland") / "node.key"
    key.chmod(0o644)
    with pytest.raises(NodeError, match="chmod 600"):
        load_kit(key.parent)
    with pytest.raises(NodeError, match="not a start-up kit"):
        load_kit(fed.output_dir)


def test_kits_carry_flowerbed_to_install_without_a_package_index(fed_file: Path, tmp_path: Path) -> None:
    import shutil
    import zipfile

    from typer.testing import CliRunner

    from flowerbed.cli import _register, app

    from .conftest import ROOT

    fed = load_federation(fed_file)
    readme = (provision(fed).kits["cleveland"] / "README.md").read_text()
    assert "pip install flowerbed`" not in readme, "there is no such package on an index"
    assert "ask the coordinator's operator for `flowerbed-" in readme

    build_folder = ROOT / "build"
    had_build = build_folder.exists()
    try:  # the wheel of this checkout, as `flowerbed provision --wheel FLOWERBED_SOURCE` builds it
        _register()
        result = CliRunner().invoke(app, ["provision", str(fed_file), "--wheel", str(ROOT)])
    finally:
        if not had_build:
            shutil.rmtree(build_folder, ignore_errors=True)
    assert result.exit_code == 0, result.output
    (built,) = (fed.output_dir / "dist").glob("flowerbed-*.whl")
    with zipfile.ZipFile(built) as wheel:
        names = set(wheel.namelist())
    # the ServerApp's packaged default experiment and the node's code travel in the wheel
    assert {"flowerbed/simulations/experiments/heart.toml", "flowerbed/client/app.py"} <= names
    for site in ("cleveland", "hungary"):
        kit = ProvisionPaths(fed.output_dir).kit(site)
        assert (kit / built.name).read_bytes() == built.read_bytes()
        readme = (kit / "README.md").read_text()
        assert f"carries it: `{built.name}`" in readme
        assert f"pip install /opt/flowerbed/kit/{built.name}" in readme
        assert f"pip download /path/to/{built.name} -d wheelhouse" in readme
        assert "pip install --no-index --find-links wheelhouse flowerbed" in readme

    # a re-provision keeps the kit's wheel and says so; a file that is not flowerbed's wheel is refused
    assert built.name in (provision(fed, sites=["hungary"]).kits["hungary"] / "README.md").read_text()
    fake = tmp_path / "flowerbed-9.9-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("other/__init__.py", "")
    with pytest.raises(ConfigError, match="does not hold flowerbed"):
        provision(fed, wheel=fake)
    with pytest.raises(ConfigError, match="not a flowerbed source folder"):
        provision(fed, wheel=tmp_path)
