"""Shared fixtures: settings built from the shipped environments, and the demo app."""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from pathlib import Path

import pytest
import yaml

from core.settings import Settings, from_config
from tests.support import procs
from tests.support.fleet import Fleet
from tests.support.moto import MotoServer

PROJECT_DIR = procs.PROJECT_DIR


def stack_config(env: str) -> dict:
    return yaml.safe_load((PROJECT_DIR / f"Pulumi.{env}.yaml").read_text())["config"]


def settings_from(env: str = "lab", **changes) -> Settings:
    """A shipped environment with keys changed: settings_from(ports={...}) merges into wsgate:ports."""
    config = copy.deepcopy(stack_config(env))
    for key, value in changes.items():
        name = key if ":" in key else f"wsgate:{_camel(key)}"
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return from_config(env, config, f"Pulumi.{env}.yaml")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


@pytest.fixture(scope="session")
def app(tmp_path_factory) -> tuple[str, int]:
    """The demo WebSocket app on loopback: (address, port)."""
    port = procs.free_port()
    proc = procs.start_app("127.0.0.1", port, tmp_path_factory.mktemp("app") / "app.log")
    yield "127.0.0.1", port
    procs.stop(proc)


@pytest.fixture(autouse=True)
def _isolated_aws(monkeypatch):
    """Never the user's real AWS credentials or profile: dummy keys for the loopback endpoint."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server):
    """A clean loopback AWS endpoint for one test."""
    moto_server.reset()
    return moto_server


# each fleet and each lab on its own 127.0.N.0/24 (WSGATE_TEST_NET: where to start, for a second suite
# beside this one). Under pytest-xdist each worker (gw0, gw1, ...) takes its own share of the networks
# from there up to 127.0.250 (at most 80 each), and goes round them again: a worker runs one test at
# a time, and a test's fleet or lab is stopped before the next test starts.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_FIRST = int(os.environ.get("WSGATE_TEST_NET", "10"))
_SHARE = max(1, min(80, (250 - _FIRST) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
_nets = itertools.cycle(range(_FIRST + _SHARE * _WORKER, _FIRST + _SHARE * (_WORKER + 1)))


def own_net() -> int:
    """N of a 127.0.N.0/24 no other fleet or lab of this suite (any worker) uses now."""
    return next(_nets)


@pytest.fixture
def fleet(request, tmp_path, app, aws):
    """Real hosts (sshd each; nginx once rolled out) on loopback; a module sets FLEET_SIZE."""
    # nginx's workers run as `nobody` under a root master: as on a real host, the nginx root
    # must be reachable for them (pytest makes its temp directories 0700).
    for d in (tmp_path, *tmp_path.parents):
        if d == Path(tempfile.gettempdir()):
            break
        d.chmod(d.stat().st_mode | 0o011)
    size = getattr(request.module, "FLEET_SIZE", 3)
    f = Fleet(tmp_path / "fleet", size, own_net(), app, aws.url).start()
    yield f
    f.stop()


REAL_SERVICES = {"moto_server", "app", "fleet"}  # fixtures that start real processes on loopback


# The modules whose tests take longest (a lab each, loads, fleets through many runs), longest first:
# collected first, so that under pytest-xdist they start first and the short tests fill the other
# workers around them (the suite is CPU-bound on two cores; one long test started last leaves a
# core idle while it ends). `make test` prints the slowest tests, to keep this list true.
LONGEST_FIRST = ("test_lab.py", "test_lab_moves.py", "test_move_fleet.py", "test_move_sequences.py",
                 "test_host_sequences.py", "test_warm_listener.py", "test_faults.py", "test_network_sequences.py")


def pytest_collection_modifyitems(items):
    """A test that starts a real service (moto server, the app, sshd and nginx) is an integration
    test, whether its module says so or not: `make unit` runs the others. The longest modules'
    tests come first (LONGEST_FIRST), the rest in their order; every worker sorts alike."""
    for item in items:
        if REAL_SERVICES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
