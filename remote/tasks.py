"""The `fab` task collection. Tasks are thin: load settings, call the core and the edges, report.

Expected failures (bad settings, a failed host, an AWS error) end with a message and a
non-zero exit, never a traceback. Heavy modules (botocore, the Pulumi SDK) are imported inside
the tasks that need them, so `fab -l` and `fab render` start fast.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path
from typing import Callable

from fabric import task
from invoke import Collection
from invoke.exceptions import Exit

from core.errors import KitError
from core.settings import Settings, load

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENV_HELP = "environment name (reads Pulumi.<env>.yaml) or a path to a Pulumi.<env>.yaml file"


def _reported(fn: Callable) -> Callable:
    """Turn the kit's typed errors into a message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KitError as exc:
            raise Exit(f"error: {exc}", code=1) from None
        finally:
            # The process ends next: spare it the final collection over every object the
            # imports made (botocore's models, pydantic's schemas), about 0.15 s.
            gc.freeze()

    return wrapper


def _settings(env: str) -> Settings:
    return load(env, PROJECT_DIR)


@task(help={"env": ENV_HELP, "out": "write the tree(s) here"})
@_reported
def render(c, env, out=None):
    """Render the nginx tree for an environment and print its digest per host."""
    from core.render import render as render_tree, render_hosts

    settings = _settings(env)
    trees = render_hosts(settings) or {"(all)": render_tree(settings, settings.nginx.bind)}
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


def _prepare(env: str, only: str | None = None):
    from core.render import render_hosts
    from remote.hosts import resolve

    settings = _settings(env)
    hosts = resolve(settings, only)
    return settings, hosts, render_hosts(settings, hosts)


@task(help={"env": ENV_HELP, "hosts": "only these hosts (comma-separated names)",
            "parallel": "hosts worked on at once (default 10)", "json": "print JSON instead of a table"})
@_reported
def check(c, env, hosts=None, parallel=10, json=False):
    """Dry run: upload and `nginx -t` on every host, show what would change. Changes nothing live."""
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    settings, targets, trees = _prepare(env, hosts)
    reporter = Reporter(quiet=json)
    run = Rollout(settings, targets, trees, Ssh(settings), reporter, parallel=int(parallel))
    ok = run.check()
    if json:
        reporter.json({"env": settings.env, "ok": ok, "hosts": [
            {**o.as_dict(), "would_change": o.before != o.target, "diff": run.diffs.get(o.host, "")}
            for o in run.outcomes]})
    else:
        for o in run.outcomes:
            if o.ok and o.before != o.target:
                reporter.message(f"--- {o.host}: would change {(o.before or 'nothing')[:12]} -> {o.target[:12]}")
                reporter.message(run.diffs.get(o.host, ""))
        reporter.table(f"check {settings.env}: {'passes' if ok else 'FAILED'} (nothing live was changed)",
                       run.outcomes)
    if not ok:
        raise Exit(code=1)


class ReadinessRecord:
    """The rollout's record sink: the readiness record in Parameter Store.

    The stored record is fetched in the background as soon as this is made, so the AWS call
    (and importing botocore) overlaps the work on the hosts.
    """

    def __init__(self, settings: Settings, reporter):
        import threading

        self.settings, self.reporter = settings, reporter
        self._stored = None
        self._error: KitError | None = None
        self._fetch = threading.Thread(target=self._read, daemon=True)
        self._fetch.start()

    def _read(self) -> None:
        from remote import aws

        try:
            self._stored = aws.read_record(self.settings)
        except KitError as exc:
            self._error = exc

    def _new(self, outcomes):
        from core import record as records

        return records.build(self.settings.env, list(self.settings.ports.proxied),
                             {o.instance: o.after for o in outcomes})

    def needs(self, outcomes) -> bool:
        self._fetch.join()
        if self._error:
            raise self._error
        new, old = self._new(outcomes), self._stored
        if old and old.digests == new.digests and old.proxy_protocol_ports == new.proxy_protocol_ports:
            self.reporter.note(f"readiness record {self.settings.parameter_path} is already current")
            return False
        return True

    def write(self, outcomes) -> None:
        from remote import aws

        new = self._new(outcomes)
        aws.write_record(self.settings, new)
        self.reporter.note(f"readiness record written: {self.settings.parameter_path} "
                           f"({len(outcomes)} instance(s), ports {new.proxy_protocol_ports})")


def _apply(settings: Settings, reporter) -> None:
    """`pulumi up` for the stack, then prove through the AWS API that the policy is where it must be."""
    from infra import automation
    from remote import aws

    if not automation.cli_available() and aws.is_lab(settings):
        from lab.elb import apply

        reporter.note("pulumi CLI not installed: applying the lab's load balancer with boto3 (same gate code)")
        decision = apply(settings)
        outputs = {"proxyProtocolGate": decision.state.value, "gateMessage": decision.message}
    else:
        reporter.note(f"pulumi up -s {settings.env} (Automation API)")
        outputs = automation.up(settings.env, on_output=lambda line: reporter.note(line.rstrip()))
    want = sorted(settings.ports.proxied) if settings.proxy_protocol else []
    have = aws.proxy_protocol_ports(settings)
    if have != want:
        raise KitError(f"after pulumi up the ProxyProtocol policy is on ports {have or 'none'}, expected "
                       f"{want or 'none'}; gate: {outputs.get('proxyProtocolGate')}: {outputs.get('gateMessage')}")
    reporter.note(f"verified: ProxyProtocol policy on ports {have or 'none'}")


@task(help={"env": ENV_HELP, "parallel": "hosts worked on at once (default 10)",
            "batch": "go live in batches, e.g. 1,25%,100% (a failure stops the rest untouched)",
            "apply": "then run `pulumi up` (Automation API) and verify the policy through the AWS API",
            "json": "print JSON instead of a table"})
@_reported
def rollout(c, env, parallel=10, batch=None, apply=False, json=False):
    """Render, upload, test, swap, reload and probe on every host; roll back on any failure."""
    from core.plan import batches
    from remote.hosts import require_instance_ids
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    settings, targets, trees = _prepare(env)
    batches(batch, len(targets))  # a bad --batch fails here, before any host is touched
    reporter = Reporter(quiet=json)
    record = None
    if settings.proxy_protocol:
        require_instance_ids(targets)
        record = ReadinessRecord(settings, reporter)
    else:
        # Turning it off: the load balancer stops sending the header first, then nginx.
        from remote import aws

        if apply:
            _apply(settings, reporter)
        attached = aws.proxy_protocol_ports(settings)
        if attached:
            raise KitError(f"the ProxyProtocol policy is still attached on ports {attached}: nginx must keep "
                           "reading the header until it is detached. Run `pulumi up` with proxyProtocol: false "
                           "first (or `fab rollout --apply`), then this rollout")
        aws.delete_record(settings)
    run = Rollout(settings, targets, trees, Ssh(settings), reporter, parallel=int(parallel), batch=batch)
    ok = run.run(record)
    _summary(reporter, json, f"rollout {settings.env}", ok, run.outcomes)
    if not ok:
        raise Exit(code=1)
    if apply and settings.proxy_protocol:
        _apply(settings, reporter)


@task(help={"env": ENV_HELP, "parallel": "hosts worked on at once (default 10)", "json": "print JSON"})
@_reported
def rollback(c, env, parallel=10, json=False):
    """Put every host back on its previous release: swap, reload, probe (all or nothing)."""
    from remote.hosts import require_instance_ids
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    settings, targets, _ = _prepare(env)
    reporter = Reporter(quiet=json)
    record = None
    if settings.proxy_protocol:
        require_instance_ids(targets)
        record = ReadinessRecord(settings, reporter)
    run = Rollout(settings, targets, None, Ssh(settings), reporter, parallel=int(parallel))
    ok = run.run(record)
    _summary(reporter, json, f"rollback {settings.env}", ok, run.outcomes)
    if not ok:
        raise Exit(code=1)


def _summary(reporter, as_json: bool, title: str, ok: bool, outcomes) -> None:
    if as_json:
        reporter.json({"ok": ok, "hosts": [o.as_dict() for o in outcomes]})
        return
    failed = [o for o in outcomes if o.ok is False and not o.error.startswith("restored")]
    reporter.table(f"{title}: {'every host ready' if ok else 'FAILED'}", outcomes)
    for o in failed:
        reporter.message(f"{o.host}: failed at {o.step.value}: {o.error}", error=True)


@task(help={"env": ENV_HELP, "json": "print JSON instead of tables"})
@_reported
def status(c, env, json=False):
    """Per host: live vs rendered digest, proxy_protocol ports, probe; the load balancer and the gate."""
    from remote.report import Reporter
    from remote.ssh import Ssh
    from remote.status import gather

    settings, targets, trees = _prepare(env)
    reporter = Reporter()
    view = gather(settings, targets, trees, Ssh(settings))
    if json:
        reporter.json(view)
    else:
        from remote.status import show

        show(reporter, view)


ns = Collection(render, check, rollout, rollback, status)
