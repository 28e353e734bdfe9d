"""The `fab` task collection. Tasks are thin: load settings, call the core, report.

Expected failures (bad settings, a failed host) end with a message and a non-zero exit,
never a traceback. Heavy modules are imported inside the tasks that need them, so
`fab -l` and `fab render` start fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from fabric import task
from invoke import Collection
from invoke.exceptions import Exit

from core.errors import KitError
from core.settings import Settings, load

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _reported(fn: Callable) -> Callable:
    """Turn the kit's typed errors into a message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KitError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def _settings(env: str) -> Settings:
    return load(env, PROJECT_DIR)


@task(help={"env": "environment name: reads Pulumi.<env>.yaml", "out": "write the tree(s) here"})
@_reported
def render(c, env, out=None):
    """Render the nginx tree for an environment and print its digest per host."""
    from core.render import render as render_tree, render_hosts

    settings = _settings(env)
    trees = render_hosts(settings) or {"(all)": render_tree(settings)}
    distinct = {t.digest: t for t in trees.values()}
    for host, tree in trees.items():
        print(f"{host}\t{tree.digest}")
    if out:
        if len(distinct) == 1:
            written = [next(iter(distinct.values())).write(out)]
        else:
            written = [tree.write(Path(out) / host) for host, tree in trees.items()]
        for path in written:
            print(f"wrote {path}")


ns = Collection(render)
