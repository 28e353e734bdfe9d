"""The readiness record as a run sees it: read before any change, written or deleted once, and
put back exactly as it was when the run restores the hosts after a failure.

The stored record is fetched in the background as soon as this is made, so the AWS call (and
importing botocore) overlaps connecting to the hosts; `load` waits for it and is the run's
precondition: no host is swapped before the record could be read.
"""

from __future__ import annotations

from core import record as records
from core.errors import KitError
from core.outcome import HostOutcome
from core.probe import plain_proven, proven_ports
from core.record import RecordError
from core.settings import Settings
from remote.background import Background


def build_for(s: Settings, served: dict[str, str]) -> records.ReadinessRecord:
    """The record a run over these settings proves (`served`: instance ID -> digest): the proxy and
    plain ports of every load balancer the hosts serve (Settings.balancers), and their names when
    more than one (during a move)."""
    names = [b.load_balancer.name for b in s.balancers]
    return records.build(s.env, proven_ports(s), served, load_balancer=s.load_balancer.name,
                         plain_ports=plain_proven(s), load_balancers=names if len(names) > 1 else None)


class ParameterRecord:
    """The environment's readiness record in Parameter Store (one parameter, or a manifest and its
    shards: core.record)."""

    def __init__(self, settings: Settings, reporter):
        self.settings, self.reporter = settings, reporter
        self._stored: dict[str, str] = {}  # the record's parameters as they were before this run
        self._now: dict[str, str] = {}  # ... as this run last wrote them
        self._loaded = False  # _stored holds what the background read found
        self._touched = False  # a write or delete was sent (its answer may have been lost)
        self._written: set[str] = set()  # shards this run may have written (a cut-short write's too)
        self._narrowed: dict[str, str] | None = None  # the record as withdraw_plain wrote it
        self._ahead: dict[str, str] = {}  # the shards `prepare` wrote (or found) for the coming write
        # Any error, not only AWS's own: the run must never take "could not read" for "no record".
        self._fetch = Background(self._read, what=f"ssm get-parameter {settings.parameter_path}")

    def _read(self) -> dict[str, str]:
        from awsapi import parameters

        return parameters.read_stored(self.settings)

    def load(self) -> None:
        """Wait for the stored record; raise if it could not be read, or if it is another
        environment's (two environments must never read or overwrite each other's record)."""
        if not self._loaded:
            self._stored = self._now = self._fetch.result()
            self._loaded = True
        old = self._parsed()
        foreign = old.foreign(self.settings.env, self.settings.load_balancer.name) if old else None
        if foreign:
            raise RecordError(f"the readiness record at {self.settings.parameter_path} is not this environment's "
                              f"({foreign}): two environments must not share a record; give this one its own "
                              "record.parameterPath")

    def _parsed(self) -> records.ReadinessRecord | None:
        """The stored record as this run last wrote it (None: none, or one that proves nothing)."""
        return records.decode(self._now, self.settings.parameter_path)[0]

    def _new(self, outcomes: list[HostOutcome]) -> records.ReadinessRecord:
        return self._build({o.instance: o.after for o in outcomes if o.instance and o.after})

    def _build(self, served: dict[str, str]) -> records.ReadinessRecord:
        """What the probes prove of every load balancer served (both during a move: the record names
        both, and its ports are the union of theirs)."""
        return build_for(self.settings, served)

    def prepare(self, served: dict[str, str]) -> None:
        """Before any host goes live: the record this run will write (`served`: instance ID -> the
        digest the run puts it on) must fit Parameter Store (else RecordError naming the size and the
        limit, and nothing changed); a sharded one gets its shards written now, so the write after the
        probes is its manifest alone (shards prove nothing until a manifest names them; `undo` removes
        them)."""
        from awsapi import parameters

        self.load()
        if not served:
            return
        params = records.encode(self._build(served), self.settings.parameter_path)
        if len(params) == 1:
            return
        self._touched = True
        self._written |= set(params) - {self.settings.parameter_path}
        written = parameters.put_shards(self.settings, params, self._now)
        self._ahead = {n: v for n, v in params.items() if n != self.settings.parameter_path}
        if written:
            self.reporter.note(f"readiness record {self.settings.parameter_path}: {len(written)} shard(s) written "
                               "ahead (they prove nothing until the manifest names them)")

    def needs(self, outcomes: list[HostOutcome]) -> bool:
        """Whether the stored record differs from what these outcomes prove."""
        self.load()
        new, old = self._new(outcomes), self._parsed()
        if old and (old.digests, old.proxy_protocol_ports, old.plain_ports, old.balancers) == (
                new.digests, new.proxy_protocol_ports, new.plain_ports, new.balancers):
            self.reporter.note(f"readiness record {self.settings.parameter_path} is already current")
            return False
        return True

    def write(self, outcomes: list[HostOutcome]) -> None:
        new = self._new(outcomes)
        params = self._put(records.encode(new, self.settings.parameter_path))
        shards = f", {len(params) - 1} shard(s)" if len(params) > 1 else ""
        self.reporter.note(f"readiness record written: {self.settings.parameter_path} "
                           f"({len(new.instances)} instance(s), ports {new.proxy_protocol_ports}{shards})")

    def _put(self, params: dict[str, str]) -> dict[str, str]:
        from awsapi import parameters

        self._touched = True
        self._written |= set(params) - {self.settings.parameter_path}
        parameters.put(self.settings, params, {**self._ahead, **self._now})  # shards written ahead: not again
        self._now, self._ahead = params, {}
        return params

    def delete(self) -> None:
        """No record: the hosts are about to stop reading the header (its manifest goes first)."""
        from awsapi import parameters

        self.load()
        if not self._now:
            return
        self._touched = True
        parameters.delete(self.settings, self._now)
        self._now = {}
        self.reporter.note(f"readiness record deleted: {self.settings.parameter_path}")

    def withdraw_header(self) -> None:
        """Turning off, before the load balancer stops the header: the record no longer proves any
        host reading it (a `pulumi up` from elsewhere must not put it back on that proof). What it
        proves of the plain ports stays: a network load balancer's program moves a listener back to a
        retired plain group only on that proof. With nothing else to prove, the record goes."""
        self.load()
        old = self._parsed()
        if old is None or not old.plain_ports:
            self.delete()
            return
        if not old.proxy_protocol_ports:
            return
        narrowed = old.model_copy(update={"proxy_protocol_ports": []})
        self._put(records.encode(narrowed, self.settings.parameter_path))
        self.reporter.note(f"readiness record {self.settings.parameter_path} no longer claims the proxy ports "
                           f"{old.proxy_protocol_ports} (the load balancer stops sending the header first)")

    def withdraw_plain(self, ports: set[int]) -> None:
        """Before the hosts stop serving `ports`: the stored record no longer claims them (else a
        `pulumi up` in the meantime could move a listener back to a retired plain group on the old
        proof, and a run killed before its own write would leave that claim behind). Put back by
        `undo` when the run restores the hosts."""
        self.load()
        old = self._parsed()
        if old is None or old.plain_ports is None or not set(old.plain_ports) & ports:
            return
        narrowed = old.model_copy(update={"plain_ports": sorted(set(old.plain_ports) - ports)})
        self._narrowed = self._put(records.encode(narrowed, self.settings.parameter_path))
        self.reporter.note(f"readiness record {self.settings.parameter_path} no longer claims plain ports "
                           f"{sorted(set(old.plain_ports) & ports)} (the hosts stop serving them)")

    def undo(self, all_back: bool = True) -> None:
        """Put the record back as it was before this run (or delete it), and read it back to prove it;
        shards this run wrote that the record does not name go too.
        `all_back` False (a host could not be put back): a withdrawal of plain ports stays, since
        that host may serve them no more."""
        from awsapi import parameters

        if not self._touched:
            return
        path = self.settings.parameter_path
        target = self._stored if all_back or self._narrowed is None else self._narrowed
        try:
            now = parameters.read_stored(self.settings)
            if now != target:  # the write (or delete) took effect: put it back
                if target:
                    parameters.put(self.settings, target, now)
                else:
                    parameters.delete(self.settings, now)
            parameters.remove(self.settings, sorted(self._written - set(target)))
            if now != target:
                now = parameters.read_stored(self.settings)
        except KitError as exc:
            raise RecordError(f"readiness record {path} could not be put back: {exc}. It may still name hosts "
                              f"that were restored: {self._manual(target)}") from None
        if now != target:
            raise RecordError(f"readiness record {path} reads back as something else after putting it back: "
                              f"{self._manual(target)}")
        self._touched, self._now, self._written = False, target, set()
        self.reporter.note(f"readiness record {path} removed, as before the run" if not target else
                           f"readiness record {path} put back as it was" if target == self._stored else
                           f"readiness record {path} put back as it was, without the plain ports withdrawn "
                           "(a host was not put back)")

    def _manual(self, target: dict[str, str]) -> str:
        path = self.settings.parameter_path
        if not target:
            return f"delete it by hand (aws ssm delete-parameter --name {path}) before the next `pulumi up`"
        if len(target) > 1:
            return (f"delete its manifest by hand (aws ssm delete-parameter --name {path}) before the next "
                    "`pulumi up`, then run `fab rollout` to write it anew")
        return (f"put it back by hand before the next `pulumi up`: aws ssm put-parameter --overwrite --type String "
                f"--name {path} --value '{target[path]}'")

    @property
    def before(self) -> str | None:
        """The value at the record's path before this run (the record, or its manifest)."""
        return self._stored.get(self.settings.parameter_path)
