"""End to end without TLS: a real SuperLink and four SuperNodes on 127.0.0.1, one per hospital file.

``--insecure`` must be given explicitly to the coordinator and to every node, and each prints a
warning when it starts. Every command runs with a ``PATH`` that lacks this environment's folder:
Flower's programs are found beside the interpreter. The heart experiment runs three rounds with
secure aggregation (its five message exchanges per round cross the real SuperLink) and leaves its
final checkpoint. Secure aggregation has no unauthenticated rounds: every node gets its identity
(node key, certificate, federation CA) from a kit that provisioning made, passed with ``--kit``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerbed.benchmarks.deployment_harness import HEART_TOML, SITES, Deployment, free_port, wait_for, write_federation
from flowerbed.server.federation_config import load_federation
from flowerbed.server.provisioning import provision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_insecure_federation_of_four_hospitals(tmp_path: Path) -> None:
    port = free_port()
    federation = write_federation(tmp_path, list(SITES), port)
    (tmp_path / "identities").mkdir()
    kits = provision(load_federation(write_federation(tmp_path / "identities", list(SITES), port))).kits
    with Deployment(tmp_path) as d:
        d.env["PATH"] = "/usr/bin:/bin"  # as a service runs /opt/venv/bin/flowerbed: the environment not activated
        d.start_coordinator(federation, "--insecure")
        assert "WARNING: the coordinator runs with --insecure" in d.log("coordinator").read_text()
        for site in SITES:
            d.start_node(
                site,
                "--insecure",
                "--kit",
                str(kits[site]),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--site",
                site,
                "--state",
                str(tmp_path / f"state-{site}"),
                "--runtime-port",
                str(free_port()),
            )
        start = d.run(
            [
                "run",
                "start",
                str(HEART_TOML),
                "--federation",
                str(federation),
                "--set",
                "rounds=3",
                "--set",
                "evaluate.local_baselines=false",
                "--set",
                "secagg.enabled=true",
            ]
        )
        assert start.returncode == 0, start.stderr + start.stdout
        assert "WARNING: the coordinator runs with --insecure" in start.stderr
        runs = json.loads((tmp_path / "coordinator-state" / "runs.json").read_text())
        run_dir = Path(runs[-1]["run_dir"])
        wait_for(lambda: (run_dir / "summary.json").is_file(), 600, f"three rounds\n{d.tail()}", poll=1)

        latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
        assert latest.endswith("0003"), latest
        assert (run_dir / "checkpoints" / latest / "weights.safetensors").is_file()
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert sorted(rounds[-1]["participants"]) == sorted(SITES)
        assert all("secagg-out-of-range" in r["train"] for r in rounds), "the rounds were secure"
        for site in SITES:
            assert "WARNING: this node runs with --insecure" in d.log(f"node-{site}").read_text()
