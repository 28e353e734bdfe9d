"""The `fab` task collection. Tasks are thin: load settings, call the core and the edges, report.

Expected failures (bad settings, a failed host, an AWS error) end with a message and a
non-zero exit, never a traceback. Heavy modules (botocore, the Pulumi SDK) are imported inside
the tasks that need them, so `fab -l` and `fab render` start fast.
"""

from __future__ import annotations

import functools
import gc
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from fabric import task
from invoke import Collection
from invoke.exceptions import Exit

from core.batches import at_once, batches
from core.errors import KitError
from core.settings import Settings, load

PROJECT_DIR = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = "docs/troubleshooting.md"  # every failure message, with what to do
ENV_HELP = "environment name (reads Pulumi.<env>.yaml) or a path to a Pulumi.<env>.yaml file"


def _reported(fn: Callable) -> Callable:
    """Turn the kit's typed errors into a message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        throttled = _throttled_calls()
        gc.freeze()  # what the imports made lives to the end: no collection need scan it again
        try:
            return fn(*args, **kwargs)
        except KitError as exc:
            raise Exit(f"error: {exc}\n(what it means and what to do: {TROUBLESHOOTING})", code=1) from None
        finally:
            _throttle_note(_throttled_calls() - throttled)
            # The process ends next: spare it the final collection over every object the
            # imports made (botocore's models, pydantic's schemas), about 0.15 s.
            gc.freeze()

    return wrapper


def _throttled_calls() -> int:
    """AWS calls throttled so far in this process (0 while the task has not needed AWS: botocore
    is imported only by the tasks that call it; and while a background read is still importing
    it, when a run ends early: no call was made through it yet)."""
    counter = getattr(sys.modules.get("awsapi.clients"), "throttled_calls", None)
    return counter() if counter else 0


def _throttle_note(calls: int) -> None:
    """Say so when AWS throttled calls of this task: they were retried with backoff, so the run
    was slower than it looked (docs/troubleshooting.md#aws-throttled)."""
    if calls:
        print(f"AWS throttled {calls} call{'s' if calls != 1 else ''}; retried with backoff "
              "(docs/troubleshooting.md#aws-throttled)", file=sys.stderr)


def _settings(env: str) -> Settings:
    return load(env, PROJECT_DIR)


@task(help={"env": ENV_HELP, "out": "write the tree(s) here"})
@_reported
def render(c, env, out=None):
    """Render the nginx tree for an environment and print its digest per host."""
    from core.render import render as render_tree
    from core.render import render_hosts

    if out is not None and not str(out).strip():  # `--out=`: never "nowhere", silently
        raise KitError(f"--out {out!r}: names no directory")
    settings, _ = _as_the_load_balancer_has_it(_settings(env), note=lambda line: print(line, file=sys.stderr))
    trees = render_hosts(settings) or {"(all)": render_tree(settings, settings.nginx.bind)}
    distinct = {t.digest: t for t in trees.values()}
    for host, tree in trees.items():
        print(f"{host}\t{tree.digest}")
    if out:
        try:
            if len(distinct) == 1:
                written = [next(iter(distinct.values())).write(out)]
            else:
                written = [tree.write(Path(out) / host) for host, tree in trees.items()]
        except OSError as exc:
            raise KitError(f"--out {out}: cannot write the tree there: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else "")) from None
        for path in written:
            print(f"wrote {path}")


def _as_the_load_balancer_has_it(settings: Settings, strict: bool = False,
                                 note: Callable[[str], None] = print):
    """The settings the hosts are rendered from, and the load balancer's traffic read (None when not
    read): with a network load balancer and proxy protocol on, the plain ports it has retired (their
    listeners forward to the proxy groups and the plain groups hold no target, the ELBv2 API says)
    are no longer served. `strict` (a rollout): always read for a network load balancer, and a
    failed read stops the task. Otherwise (render, check, status, rollback) read only with proxy
    protocol on, and a failed read is noted: the hosts are rendered serving every plain port.

    While a move is set (moveTo), the hosts serve every load balancer the move record says
    (core.move.served: both, then the new one alone once the old one was retired), each as its
    load balancer has it (its own retired plain ports, from its own read: one that does not exist
    yet has retired none); the settings returned are the first's, serving the others beside
    (Settings.serving), and the traffic read is the first's. A move record of another move half
    done refuses the task before any host is touched."""
    return as_served(_served(settings, strict, note), strict, note)


def as_served(balancers: list[Settings], strict: bool = False, note: Callable[[str], None] = print):
    """The settings that render and probe what the hosts serve for `balancers` (core.move.served,
    or a list `fab move` chose), each as its load balancer has it, and the first's traffic read
    (None when not read): the first's settings, serving the others beside (Settings.serving)."""
    had = [_one_as_it_has(b, strict, note) for b in balancers]
    first, now = had[0]
    return (first.serving([b for b, _ in had]) if len(had) > 1 else first), now


def _served(settings: Settings, strict: bool, note: Callable[[str], None]) -> list[Settings]:
    """The load balancers whose ports the hosts serve (core.move.served), from the move record; the
    record unreadable: a rollout stops, anything else goes on as if the move had not begun
    (both served). A conflicting move record (core.move.conflict) is refused."""
    if settings.move_to is None:
        return [settings]
    from awsapi.parameters import read_move
    from core import move

    try:
        record = read_move(settings)
    except KitError as exc:
        if strict:
            raise
        note(f"cannot read the move record ({exc}): rendered serving both load balancers")
        record = None
    problem = move.conflict(settings, record)
    if problem:
        raise move.MoveError(f"{problem}; nothing was changed")
    return move.served(settings, record)


def _one_as_it_has(settings: Settings, strict: bool, note: Callable[[str], None]):
    """One load balancer's settings as it has them, and its traffic read (None when not read)."""
    if settings.load_balancer.type != "network" or not (settings.proxy_protocol or strict):
        return settings, None
    from awsapi.balancer import traffic

    try:
        now = traffic(settings)
    except KitError as exc:
        if strict:
            raise
        note(f"cannot read the load balancer ({exc}): rendered as if no plain port were retired")
        return settings, None
    return (settings.retiring(now.retired) if settings.proxy_protocol else settings), now


def _prepare(env: str, only: str | None = None, strict: bool = False, note: Callable[[str], None] = print,
             served: list[Settings] | None = None):
    """Settings as the load balancer has them, the hosts, their trees, the traffic read. `served`:
    the load balancers whose ports the hosts serve, as whole settings (`fab move`'s choice; None:
    what the settings and the move record say)."""
    from core.render import render_hosts
    from remote.hosts import resolve

    if served:
        settings, now = as_served(served, strict, note)
    else:
        settings, now = _as_the_load_balancer_has_it(_settings(env), strict, note)
    hosts = resolve(settings, only)
    return settings, hosts, render_hosts(settings, hosts), now


@task(help={"env": ENV_HELP, "hosts": "only these hosts (comma-separated names)",
            "parallel": "hosts worked on at once (default 10)", "json": "print JSON instead of a table"})
@_reported
def check(c, env, hosts=None, parallel=None, json=False):
    """Dry run: upload and `nginx -t` on every host, show what would change. Changes nothing live."""
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    count = at_once(parallel)  # a bad --parallel fails before anything is read
    reporter = Reporter(quiet=json)
    settings, targets, trees, _ = _prepare(env, hosts, note=reporter.note)
    run = Rollout(settings, targets, trees, Ssh.for_run(settings, targets), reporter, parallel=count)
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


def _refuse_certificate(settings: Settings, note: Callable[[str], None]) -> None:
    """--apply: a certificate the Pulumi program would refuse stops the run before any host changes
    (else a Classic cutover leaves the hosts reading a header the load balancer never starts sending)."""
    from awsapi import certificates

    try:
        problem, soon = certificates.verdict(settings)
    except certificates.NotChecked as exc:
        if not exc.lab:
            note(str(exc))
        return
    if problem:
        raise KitError(f"{problem}: `pulumi up` would refuse it; nothing was changed "
                       "(docs/troubleshooting.md#the-certificate-cannot-serve)")
    if soon:
        note(soon)


def _run(env: str, trees_wanted: bool, parallel: int, batch, apply: bool, as_json: bool, what: str,
         take_over: bool = False, served: list[Settings] | None = None) -> None:
    """A rollout (trees) or a rollback (no trees), in the cutover order; report; exit with its code.
    `served`: the load balancers whose ports the hosts serve (`_prepare`)."""
    from core.render import render_hosts
    from remote import cutover
    from remote.applier import chosen
    from remote.hosts import require_instance_ids
    from remote.readiness import ParameterRecord
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh

    reporter = Reporter(quiet=as_json)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a cancelled CI job or a closed terminal acts as Ctrl-C
        signal.signal(sig, signal.default_int_handler)  # (the run's guard notes them; pulumi up is interrupted)
    # a rollback is an emergency path: without the load balancer's word it probes every plain port
    settings, targets, trees, now = _prepare(env, strict=trees_wanted, note=reporter.note, served=served)
    gc.freeze()  # and so do the settings, the trees and the modules the run imported
    batches(batch, len(targets))  # a bad --batch fails here, before any host is touched
    if apply:
        _refuse_certificate(settings, reporter.note)
    if any(b.proxy_protocol for b in settings.balancers) or (now and now.header_ports):
        require_instance_ids(targets)

    def one(s: Settings, trees, now, apply: bool, title: str):
        record = ParameterRecord(s, reporter)  # its read starts now, overlapping the connections
        run = Rollout(s, targets, trees, Ssh.for_run(s, targets), reporter, parallel=parallel, batch=batch,
                      take_over=take_over)
        verdict = cutover.rollout(run, record, chosen(s), apply=apply, now=now)
        if not as_json:
            _summary(reporter, False, title, verdict, run.outcomes)
        return verdict, run.outcomes

    steps = []
    two_steps = bool(trees_wanted and apply and now and now.retired and not settings.proxy_protocol)
    if two_steps:
        # Turning off while the hosts no longer serve a plain port: first they serve both port sets
        # again, proven and recorded (the Pulumi program moves a listener back to a retired plain
        # group only on that proof), then the turn-off as always.
        both = settings.model_copy(update={"proxy_protocol": True})
        reporter.note(f"plain ports {now.retired} were retired: the hosts serve them again first (step 1 of 2)")
        steps.append(one(both, render_hosts(both, targets), now, False,
                         f"{what} {settings.env}, step 1 of 2: plain ports back"))
        if steps[0][0].ok:
            steps.append(one(settings, trees, None, apply, f"{what} {settings.env}, step 2 of 2"))
    else:
        steps.append(one(settings, trees if trees_wanted else None, now, apply, f"{what} {settings.env}"))
    verdict, outcomes = steps[-1]
    if as_json:
        _summary(reporter, True, what, verdict, outcomes, steps if two_steps else None)
    if not verdict.ok:
        raise Exit(code=verdict.code)


@task(help={"env": ENV_HELP, "parallel": "hosts worked on at once (default 10)",
            "batch": "go live in batches, e.g. 1,25%,100% (a failure stops the rest untouched)",
            "apply": "also run `pulumi up` (Automation API) and verify the policy through the AWS API",
            "json": "print JSON instead of a table",
            "take-over": "take hosts whose live release is another environment's (refused without it)"})
@_reported
def rollout(c, env, parallel=None, batch=None, apply=False, json=False, take_over=False):
    """Render, upload, test, swap, reload and probe on every host; restore every host on any failure."""
    _run(env, True, at_once(parallel), batch, apply, json, "rollout", take_over=take_over)


@task(help={"env": ENV_HELP, "parallel": "hosts worked on at once (default 10)", "json": "print JSON"})
@_reported
def rollback(c, env, parallel=None, json=False):
    """Put every host back on its previous release: swap, reload, probe (all or nothing)."""
    _run(env, False, at_once(parallel), None, False, json, "rollback")


def _summary(reporter, as_json: bool, title: str, verdict, outcomes, steps=None) -> None:
    """The run's table and errors; with `as_json` one document (`steps`: every step's, when the run
    had two: the last step's verdict and hosts are the document's own)."""
    from remote.cutover import INTERRUPTED, failed_hosts

    def doc(verdict, outcomes) -> dict:
        return {"ok": verdict.ok, "exit_code": verdict.code, "problems": verdict.problems,
                "hosts": [o.as_dict() for o in outcomes]}

    if as_json:
        reporter.json({**doc(verdict, outcomes), **({"steps": [doc(v, o) for v, o in steps]} if steps else {})})
        return
    headline = "every host ready" if verdict.ok else "INTERRUPTED" if verdict.code == INTERRUPTED else "FAILED"
    reporter.table(f"{title}: {headline}", outcomes)
    for o in failed_hosts(outcomes):
        reporter.message(f"{o.host}: failed at {o.step.value}: {o.error}", error=True)
    for problem in verdict.problems:
        reporter.message(f"error: {problem}", error=True)
    if not verdict.ok:
        reporter.message(f"what each message means and what to do: {TROUBLESHOOTING}", error=True)


@task(help={"env": ENV_HELP, "json": "print JSON instead of tables"})
@_reported
def status(c, env, json=False):
    """Judge every host and the load balancer: digests, links, ports vs policy, listeners, health, gate, locks."""
    from remote.report import Reporter
    from remote.ssh import Ssh
    from remote.status import gather

    reporter = Reporter()
    settings, targets, trees, now = _prepare(env, note=reporter.note)
    view = gather(settings, targets, trees, Ssh.for_run(settings, targets), now=now)
    configured = _settings(env)
    if configured.dns:
        from remote.move import move_view

        view["dns"] = move_view(configured, targets)
        view["ok"] = view["ok"] and not view["dns"]["problems"]
    if json:
        reporter.json(view)
    else:
        from remote.status import show

        show(reporter, view)
        if configured.dns:
            from remote.move import show_move

            show_move(reporter, view["dns"])
    if not view["ok"]:
        raise Exit(code=1)


@task(help={"env": ENV_HELP, "parallel": "hosts worked on at once in the rollouts (default 10)",
            "cut": "past dns.drainMax, retire the old load balancer with its connections still open (they are cut)"})
@_reported
def move(c, env, parallel=None, cut=False):
    """Move to the load balancer moveTo names, failing no request: serve both, create and prove the new one, move
    the DNS weights, drain and retire the old one. A rerun goes on from the last proven step."""
    from remote.applier import chosen, ready
    from remote.cutover import INTERRUPTED
    from remote.hosts import resolve
    from remote.move import Move, MoveStopped
    from remote.report import Reporter

    count = at_once(parallel)  # a bad --parallel fails before anything is read
    reporter = Reporter()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: the step in flight stops where it is safe
        signal.signal(sig, signal.default_int_handler)
    settings = _settings(env)
    hosts = resolve(settings, None)
    applier = chosen(settings)

    def rollout(balancers: list[Settings]) -> bool:
        try:
            _run(env, True, count, None, False, False, "rollout", served=balancers)
        except Exit as exc:
            if exc.code == INTERRUPTED:
                raise MoveStopped("interrupted during the rollout (every host it changed was put back)",
                                  INTERRUPTED) from None
            return False
        return True

    try:
        if settings.moving_to is not None:
            ready(applier)  # the applier can run: else nothing starts
        Move(settings, hosts, applier, rollout, reporter.note, cut=bool(cut)).run()
    except MoveStopped as exc:
        reporter.message(f"error: {exc}", error=True)
        reporter.message(f"the move stopped there; `fab status --env {env}` shows the step reached, `fab move --env "
                         f"{env}` goes on from it ({TROUBLESHOOTING}#moving-to-another-load-balancer)", error=True)
        raise Exit(code=exc.code) from None
    except KeyboardInterrupt:
        raise Exit(f"interrupted: the move stopped at its last proven step; `fab move --env {env}` goes on from it",
                   code=INTERRUPTED) from None


ns = Collection(render, check, rollout, rollback, status, move)
