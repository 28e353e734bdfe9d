"""A read started now on a thread of its own, so an AWS call (and importing botocore) overlaps
connecting to the hosts; `result` waits for it and raises what it raised, as a KitError."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from core.errors import KitError

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, fn: Callable[[], T], what: str = ""):
        """`what` names the call in an error that is not already the kit's own."""
        self._value: T | None = None
        self._error: KitError | None = None
        self._what = what
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except KitError as exc:
            self._error = exc
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint...: handed to the caller
            self._error = KitError(f"{self._what + ': ' if self._what else ''}{type(exc).__name__}: {exc}")

    def result(self) -> T:
        self._thread.join()
        if self._error:
            raise self._error
        return self._value  # type: ignore[return-value]  # set when no error was raised
