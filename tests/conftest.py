"""Shared fixtures: settings built from the shipped environments, and the demo app."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.settings import Settings, from_config
from tests.support import procs

REPO = procs.REPO


def stack_config(env: str) -> dict:
    return yaml.safe_load((REPO / f"Pulumi.{env}.yaml").read_text())["config"]


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
