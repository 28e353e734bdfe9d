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


class ParameterRecord:
    """The environment's readiness record in Parameter Store."""

    def __init__(self, settings: Settings, reporter):
        self.settings, self.reporter = settings, reporter
        self._stored: str | None = None  # the text as it was before this run
        self._touched = False  # a write or delete was sent (its answer may have been lost)
        self._narrowed: str | None = None  # the record as withdraw_plain wrote it
        # Any error, not only AWS's own: the run must never take "could not read" for "no record".
        self._fetch = Background(self._read, what=f"ssm get-parameter {settings.parameter_path}")

    def _read(self) -> str | None:
        from awsapi import parameters

        return parameters.read_record_text(self.settings)

    def load(self) -> None:
        """Wait for the stored record; raise if it could not be read, or if it is another
        environment's (two environments must never read or overwrite each other's record)."""
        self._stored = self._fetch.result()
        old = self._parsed()
        foreign = old.foreign(self.settings.env, self.settings.load_balancer.name) if old else None
        if foreign:
            raise RecordError(f"the readiness record at {self.settings.parameter_path} is not this environment's "
                              f"({foreign}): two environments must not share a record; give this one its own "
                              "record.parameterPath")

    def _parsed(self) -> records.ReadinessRecord | None:
        if self._stored is None:
            return None
        try:
            return records.ReadinessRecord.from_json(self._stored)
        except KitError:
            return None

    def _new(self, outcomes: list[HostOutcome]) -> records.ReadinessRecord:
        served = {o.instance: o.after for o in outcomes if o.instance and o.after}
        return records.build(self.settings.env, proven_ports(self.settings), served,
                             load_balancer=self.settings.load_balancer.name, plain_ports=plain_proven(self.settings))

    def needs(self, outcomes: list[HostOutcome]) -> bool:
        """Whether the stored record differs from what these outcomes prove."""
        self.load()
        new, old = self._new(outcomes), self._parsed()
        if old and (old.digests, old.proxy_protocol_ports, old.plain_ports, old.load_balancer) == (
                new.digests, new.proxy_protocol_ports, new.plain_ports, new.load_balancer):
            self.reporter.note(f"readiness record {self.settings.parameter_path} is already current")
            return False
        return True

    def write(self, outcomes: list[HostOutcome]) -> None:
        from awsapi import parameters

        new = self._new(outcomes)
        self._touched = True
        parameters.write_record(self.settings, new)
        self.reporter.note(f"readiness record written: {self.settings.parameter_path} "
                           f"({len(new.instances)} instance(s), ports {new.proxy_protocol_ports})")

    def delete(self) -> None:
        """No record: the hosts are about to stop reading the header."""
        from awsapi import parameters

        self.load()
        if self._stored is None:
            return
        self._touched = True
        parameters.delete_record(self.settings)
        self.reporter.note(f"readiness record deleted: {self.settings.parameter_path}")

    def withdraw_plain(self, ports: set[int]) -> None:
        """Before the hosts stop serving `ports`: the stored record no longer claims them (else a
        `pulumi up` in the meantime could move a listener back to a retired plain group on the old
        proof, and a run killed before its own write would leave that claim behind). Put back by
        `undo` when the run restores the hosts."""
        from awsapi import parameters

        self.load()
        old = self._parsed()
        if old is None or old.plain_ports is None or not set(old.plain_ports) & ports:
            return
        narrowed = old.model_copy(update={"plain_ports": sorted(set(old.plain_ports) - ports)})
        self._touched, self._narrowed = True, narrowed.to_json()
        parameters.put_record_text(self.settings, self._narrowed)
        self.reporter.note(f"readiness record {self.settings.parameter_path} no longer claims plain ports "
                           f"{sorted(set(old.plain_ports) & ports)} (the hosts stop serving them)")

    def undo(self, all_back: bool = True) -> None:
        """Put the record back as it was before this run (or delete it), and read it back to prove it.
        `all_back` False (a host could not be put back): a withdrawal of plain ports stays, since
        that host may serve them no more."""
        from awsapi import parameters

        if not self._touched:
            return
        path = self.settings.parameter_path
        target = self._stored if all_back or self._narrowed is None else self._narrowed
        try:
            now = parameters.read_record_text(self.settings)
            if now != target:  # the write (or delete) took effect: put it back
                if target is None:
                    parameters.delete_record(self.settings)
                else:
                    parameters.put_record_text(self.settings, target)
                now = parameters.read_record_text(self.settings)
        except KitError as exc:
            raise RecordError(f"readiness record {path} could not be put back: {exc}. It may still name hosts "
                              f"that were restored: {self._manual(target)}") from None
        if now != target:
            raise RecordError(f"readiness record {path} reads back as something else after putting it back: "
                              f"{self._manual(target)}")
        self._touched = False
        self.reporter.note(f"readiness record {path} removed, as before the run" if target is None else
                           f"readiness record {path} put back as it was" if target == self._stored else
                           f"readiness record {path} put back as it was, without the plain ports withdrawn "
                           "(a host was not put back)")

    def _manual(self, target: str | None) -> str:
        path = self.settings.parameter_path
        if target is None:
            return f"delete it by hand (aws ssm delete-parameter --name {path}) before the next `pulumi up`"
        return (f"put it back by hand before the next `pulumi up`: aws ssm put-parameter --overwrite --type String "
                f"--name {path} --value '{target}'")

    @property
    def before(self) -> str | None:
        return self._stored
