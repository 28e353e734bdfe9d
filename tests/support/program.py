"""The real Pulumi program (infra/program.py) under Pulumi's mock runtime: one harness for every
program test, whichever resources its mocks answer for."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import pulumi


class Messages(logging.Handler):
    """What the program logs at `level` or above (warnings, by default)."""

    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)  # the logger hands a handler only records at its level or above
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def engine_format(config: dict) -> dict:
    """Config as the engine hands it to a program: structured values as JSON text."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


def run_program(mocks: pulumi.runtime.Mocks, config: dict, body: Callable, stack: str = "staging",
                monkeypatch=None, level: int = logging.WARNING) -> tuple[dict, list[str]]:
    """Run `body(program module, exports)` as the program's main under `mocks` with `config`;
    returns (exports, the messages logged at `level` or above). With `monkeypatch`, what the
    program passes to pulumi.export lands in exports too."""
    asyncio.set_event_loop(asyncio.new_event_loop())  # Pulumi's runtime wants a current loop
    said = Messages(level)
    logger = logging.getLogger(f"pulumi-test-{id(mocks)}")
    logger.setLevel(min(level, logging.WARNING))
    logger.addHandler(said)
    pulumi.runtime.set_mocks(mocks, project="wsgate", stack=stack, preview=False, logger=logger)
    pulumi.runtime.set_all_config(engine_format(config))
    exports: dict = {}
    if monkeypatch is not None:
        monkeypatch.setattr(pulumi, "export", lambda name, value: exports.__setitem__(name, value))

    @pulumi.runtime.test
    def program():
        from infra import program as prog

        return body(prog, exports)

    program()
    return exports, said.messages
