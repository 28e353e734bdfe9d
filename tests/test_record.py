"""The readiness record at scale: one parameter while it fits, else a manifest and its shards;
one reader (core.record.decode) for the program, the lab applier and `fab status`; a write or a
delete cut short proves nothing; a record that cannot be written is known before any change.

The pure tests feed the reader a dict of parameters; those marked integration go through the
real edge (awsapi.parameters, remote.readiness) into moto's Parameter Store on loopback."""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone

import boto3
import pytest

from core import record as records
from core.record import NAME_LIMIT, PARAMETER_LIMIT, RecordError, build, decode, encode

PATH = "/wsgate/staging/readiness"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def fleet_of(count: int, own_digests: bool, seed: int = 1) -> dict[str, str]:
    """instance ID -> digest, for `count` instances (IDs and digests as random as AWS's and sha256's)."""
    rnd = random.Random(seed)
    one = f"{rnd.getrandbits(256):064x}"
    return {f"i-{rnd.getrandbits(68):017x}": f"{rnd.getrandbits(256):064x}" if own_digests else one
            for _ in range(count)}


def record_of(served: dict[str, str], **kw) -> records.ReadinessRecord:
    return build("staging", [81, 80], served, now=NOW, load_balancer="wsgate-staging", **kw)


def assert_writable(params: dict[str, str]) -> None:
    """What Parameter Store takes: standard values, names within the limit (moto checks neither)."""
    assert all(len(v) <= PARAMETER_LIMIT for v in params.values())
    assert all(len(n) <= NAME_LIMIT for n in params)


# --- pure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("own_digests", [True, False], ids=["a digest each", "one digest"])
def test_five_thousand_instances_round_trip_in_standard_parameters(own_digests):
    record = record_of(fleet_of(5000, own_digests), plain_ports=[80, 81])
    params = encode(record, PATH)
    assert len(params) > 1 and PATH in params  # sharded: a manifest and its shards
    assert_writable(params)
    assert decode(params, PATH) == (record, None)
    manifest = params[PATH]
    assert '"version":2' in manifest and '"instances":5000' in manifest  # readable where it matters


def test_a_small_record_is_one_parameter_unchanged_on_the_wire():
    record = record_of(fleet_of(20, own_digests=True))
    assert encode(record, PATH) == {PATH: record.to_json()}
    assert decode({PATH: record.to_json()}, PATH) == (record, None)


def test_a_version_1_record_of_an_older_kit_is_still_read():
    old = ('{"version":1,"env":"staging","writtenAt":"2025-06-01T00:00:00Z","proxyProtocolPorts":[80,81],'
           '"digests":{"' + "d" * 64 + '":["i-0123456789abcdef0"]}}')
    record, problem = decode({PATH: old}, PATH)
    assert problem is None and record is not None and record.instances == {"i-0123456789abcdef0": "d" * 64}


def test_nothing_there_is_no_record_and_neighbours_are_not_shards():
    params = encode(record_of(fleet_of(400, own_digests=True)), PATH)
    theirs = {n.replace(PATH, PATH + "-old"): v for n, v in params.items()}
    assert decode({"/wsgate/staging/other": "x", **theirs}, PATH) == (None, f"no readiness record at {PATH}")
    assert decode({**params, **theirs, "/wsgate/staging/other": "x"}, PATH)[1] is None


def sharded(seed: int = 1) -> dict[str, str]:
    return encode(record_of(fleet_of(400, own_digests=True, seed=seed)), PATH)


def test_shards_without_a_manifest_prove_nothing():
    params = sharded()
    del params[PATH]
    record, problem = decode(params, PATH)
    assert record is None and problem is not None
    assert "no valid readiness record" in problem and "but no manifest (a write or a delete cut short)" in problem


def test_a_manifest_naming_a_missing_shard_proves_nothing():
    params = sharded()
    gone = sorted(n for n in params if n != PATH)[0]
    del params[gone]
    assert decode(params, PATH) == (None, f"no valid readiness record at {PATH}: shard {gone} is missing "
                                          "(a write cut short)")


def test_a_shard_of_another_write_proves_nothing():
    """A manifest over shards of another write: its own are gone, or one holds other content."""
    mine, theirs = sharded(1), sharded(2)
    mixed = {**{n: v for n, v in theirs.items() if n != PATH}, PATH: mine[PATH]}
    assert "is missing" in (decode(mixed, PATH)[1] or "")
    name = sorted(n for n in mine if n != PATH)[0]
    other = next(v for n, v in theirs.items() if n != PATH)
    assert "holds another write's content" in (decode({**mine, name: other}, PATH)[1] or "")


def test_a_manifest_whose_shards_are_in_another_order_proves_nothing():
    params = sharded()
    manifest = records.Manifest.model_validate_json(params[PATH])
    swapped = manifest.model_copy(update={"shards": list(reversed(manifest.shards))})
    record, problem = decode({**params, PATH: swapped.model_dump_json(by_alias=True)}, PATH)
    assert record is None and "not the ones its manifest was written with" in (problem or "")


@pytest.mark.parametrize("manifest", ["{}", '{"version":2}', "not json", '{"version":3}'])
def test_a_malformed_manifest_proves_nothing(manifest):
    record, problem = decode({**sharded(), PATH: manifest}, PATH)
    assert record is None and "readiness record is not valid" in (problem or "")


def test_a_record_that_cannot_be_written_is_refused_naming_its_size_and_the_limit():
    record = record_of(fleet_of(15_000, own_digests=True))
    with pytest.raises(RecordError) as caught:
        encode(record, PATH)
    text = str(caught.value)
    assert "15000 instance(s) with 15000 digest(s)" in text and f"({PARAMETER_LIMIT})" in text
    assert "docs/troubleshooting.md#the-readiness-record-is-too-large" in text


def test_a_path_too_long_for_the_shard_names_is_refused():
    long = "/wsgate/" + "x" * (NAME_LIMIT - 20)
    with pytest.raises(RecordError, match="shorter record.parameterPath"):
        encode(record_of(fleet_of(400, own_digests=True)), long)


# --- through the edge: moto's Parameter Store ------------------------------------------------

def settings_at(aws_url: str):
    from tests.conftest import settings_from

    return settings_from("staging", **{"aws:endpoints": [{s: aws_url for s in ("ec2", "elb", "ssm", "sts")}]})


def by_path(s) -> dict[str, str]:
    """Every parameter beside the record, every page (what the program's invoke returns)."""
    ssm = boto3.client("ssm", region_name=s.aws.region, endpoint_url=s.aws.endpoints["ssm"])
    return {p["Name"]: p["Value"] for page in ssm.get_paginator("get_parameters_by_path").paginate(
        Path=s.parameter_dir, Recursive=False, WithDecryption=False) for p in page["Parameters"]}


@pytest.mark.integration
@pytest.mark.parametrize("own_digests", [True, False], ids=["a digest each", "one digest"])
def test_five_thousand_instances_round_trip_through_parameter_store(aws, own_digests):
    import awsapi.parameters as parameters

    s = settings_at(aws.url)
    small = record_of(fleet_of(3, own_digests))
    parameters.write_record(s, small)
    assert by_path(s) == {s.parameter_path: small.to_json()}  # a small fleet: one parameter, as before
    record = record_of(fleet_of(5000, own_digests))
    parameters.write_record(s, record)
    stored = by_path(s)
    assert len(stored) > 1 and stored == encode(record, s.parameter_path)
    assert parameters.read_record(s) == record
    assert decode(stored, s.parameter_path) == (record, None)  # the program's read
    parameters.write_record(s, small)  # and back: the shards it no longer names are gone
    assert by_path(s) == {s.parameter_path: small.to_json()}
    parameters.write_record(s, record)
    parameters.delete_record(s)
    assert by_path(s) == {}


@pytest.mark.integration
def test_a_delete_cut_short_leaves_no_proof(aws):
    """The manifest goes first: a delete that stops after it leaves shards that prove nothing."""
    import awsapi.parameters as parameters
    from tests.support.faults import AwsFaults

    faults = AwsFaults(aws.url)
    try:
        s = settings_at(faults.url)
        parameters.write_record(s, record_of(fleet_of(400, own_digests=True)))
        faults.add("DeleteParameters", "refuse")
        with pytest.raises(Exception, match="delete-parameters"):
            parameters.delete_record(s)
        assert faults.seen[-2:] == ["DeleteParameter", "DeleteParameters"]
        left = by_path(s)
        assert left and s.parameter_path not in left
        record, problem = decode(left, s.parameter_path)
        assert record is None and "but no manifest" in (problem or "")
    finally:
        faults.stop()


class Notes:
    def __init__(self):
        self.lines: list[str] = []

    def note(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.integration
def test_a_restore_puts_the_previous_shards_back_exactly_and_removes_those_written_ahead(aws):
    """Shards written ahead leave the old record proving what it proved; the write after go-live
    is the manifest alone; a restore puts the old shards and manifest back and removes the rest."""
    from tests.support.faults import AwsFaults

    faults = AwsFaults(aws.url)
    try:
        restores(settings_at(faults.url), faults)
    finally:
        faults.stop()


def restores(s, faults) -> None:
    import awsapi.parameters as parameters
    from core.outcome import HostOutcome
    from remote.readiness import ParameterRecord

    parameters.write_record(s, record_of(fleet_of(400, own_digests=True, seed=1)))
    before = by_path(s)
    served = fleet_of(400, own_digests=True, seed=2)
    outcomes = [HostOutcome(f"h{n}", i, "127.0.0.1", after=d, target=d) for n, (i, d) in enumerate(served.items())]

    notes = Notes()
    cut = ParameterRecord(s, notes)
    cut.prepare(served)  # the shards ahead: the old record still proves what it proved
    assert decode(by_path(s), s.parameter_path) == decode(before, s.parameter_path)
    cut.undo()  # the run stopped before the write
    assert by_path(s) == before

    cut = ParameterRecord(s, notes)
    cut.prepare(served)
    assert cut.needs(outcomes)
    sent = len(faults.seen)
    cut.write(outcomes)
    assert faults.seen[sent:].count("PutParameter") == 1  # in the cutover window: the manifest only
    assert parameters.read_record(s).instances == served
    cut.undo()
    assert by_path(s) == before and "put back as it was" in notes.lines[-1]

    cut = ParameterRecord(s, notes)
    cut.delete()
    assert by_path(s) == {}
    cut.undo()
    assert by_path(s) == before


@pytest.mark.integration
def test_the_program_reads_a_sharded_record_and_nothing_reattaches_after_the_withdrawal(aws):
    """The turn-off's window as another checkout (still proxyProtocol: true) sees it: the policy
    detached, every host still reading the header. A (sharded) record would put the header back on
    ports the hosts are about to drop; a record cut short, or withdrawn, does not."""
    import awsapi.parameters as parameters
    from tests.test_program import STAGING_INSTANCES, mark_attached, proxy_ports, run

    s = settings_at(aws.url)
    mark_attached("staging", aws.url, ports=[])  # every instance registered, the policy detached
    served = {**fleet_of(2000, own_digests=True), **{i: "d" * 64 for i in STAGING_INSTANCES}}
    parameters.write_record(s, build("staging", [80, 81], served, load_balancer=s.load_balancer.name))
    stored = by_path(s)
    assert len(stored) > 10  # more than one page of the by-path read
    mocks, exports, _ = run("staging", aws.url)
    assert exports["state"] == "open" and proxy_ports(mocks) == [80, 81]

    parameters.remove(s, [sorted(n for n in stored if n != s.parameter_path)[-1]])  # a shard lost
    mocks, exports, _ = run("staging", aws.url)
    assert exports["state"] == "closed" and proxy_ports(mocks) == []
    assert all("is missing (a write cut short)" in why for why in exports["missing"].values())

    parameters.write_record(s, build("staging", [80, 81], served, load_balancer=s.load_balancer.name))
    parameters.delete_record(s)  # what the turn-off does before its pulumi up
    assert by_path(s) == {}
    mocks, exports, _ = run("staging", aws.url)
    assert exports["state"] == "closed" and proxy_ports(mocks) == []


# --- with a fleet: `fab status`, and turning off -----------------------------------------------

FLEET_SIZE = 2


def direct(fleet):
    """The fleet's settings with AWS reached straight at moto (never through a fault injector)."""
    from tests.test_rollout import settings

    s = settings(fleet)
    return s.model_copy(update={"aws": s.aws.model_copy(update={"endpoints": {k: fleet.aws_url
                                                                              for k in s.aws.endpoints}})})


@pytest.mark.integration
def test_fab_status_reads_a_sharded_record(fleet):
    import json

    import awsapi.parameters as parameters
    from tests.test_rollout import fab

    assert fab(fleet, "rollout", "--apply").returncode == 0
    s = direct(fleet)
    mine = parameters.read_record(s)
    assert mine is not None
    wide = build(s.env, mine.proxy_protocol_ports, {**fleet_of(400, own_digests=True), **mine.instances},
                 load_balancer=mine.load_balancer, plain_ports=mine.plain_ports)
    parameters.write_record(s, wide)
    assert len(by_path(s)) > 1
    result = fab(fleet, "status", "--json")
    view = json.loads(result.stdout)
    assert result.returncode == 0 and view["ok"], result.stdout
    assert view["gate"]["state"] == "open" and view["gate"]["record"]["instances"] == wide.instances

    parameters.remove(s, [sorted(n for n in by_path(s) if n != s.parameter_path)[0]])  # a shard lost
    result = fab(fleet, "status", "--json")
    view = json.loads(result.stdout)
    assert view["gate"]["record"] is None and "is missing (a write cut short)" in result.stdout


class Watching:
    """The lab's applier, noting the stored record at the moment `pulumi up` starts."""

    def __init__(self, settings, fleet):
        from lab.applier import LabApplier

        self.inner, self.fleet, self.seen = LabApplier(settings), fleet, []

    def check(self) -> None:
        self.inner.check()

    def apply(self, note):
        import awsapi.parameters as parameters

        self.seen.append(parameters.read_record_text(direct(self.fleet)))
        return self.inner.apply(note)


@pytest.mark.integration
def test_turning_off_withdraws_the_record_before_the_switch_back(fleet, aws):
    """A `pulumi up` from elsewhere while the listeners move back must find no proof (it would put
    the header back, and the gate is sticky); a switch back that fails puts the record back as it
    was, since no host changed and every host still reads the header."""
    import threading

    import awsapi.classic
    import awsapi.parameters as parameters
    from core.render import render_hosts
    from remote import cutover
    from remote.hosts import resolve
    from remote.readiness import ParameterRecord
    from remote.report import Reporter
    from remote.rollout import Rollout
    from remote.ssh import Ssh
    from tests.support.faults import AwsFaults
    from tests.test_rollout import fab, live_digests, settings, targets

    assert fab(fleet, "rollout", "--apply").returncode == 0
    on, before, served = sorted(settings(fleet).ports.proxied), parameters.read_record_text(direct(fleet)), \
        live_digests(fleet)
    assert before is not None and awsapi.classic.header_ports(direct(fleet)) == on
    faults = AwsFaults(aws.url)
    try:
        fleet.set("aws:endpoints", [{x: faults.url for x in ("ec2", "elb", "ssm", "sts")}])
        fleet.set("wsgate:proxyProtocol", False)
        faults.add("SetLoadBalancerPoliciesForBackendServer", "refuse")
        failed = fab(fleet, "rollout", "--apply")
        assert failed.returncode == 3, failed.stdout + failed.stderr
        assert "stopping the PROXY header at the load balancer" in failed.stderr
        assert faults.seen.index("DeleteParameter") < faults.seen.index("SetLoadBalancerPoliciesForBackendServer")
        assert parameters.read_record_text(direct(fleet)) == before  # put back: it was true
        assert awsapi.classic.header_ports(direct(fleet)) == on and live_digests(fleet) == served
        faults.clear()

        s = settings(fleet)
        seen: list[str | None] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(parameters.read_record_text(direct(fleet)))
                stop.wait(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            hosts = resolve(s, None)
            applier = Watching(s, fleet)
            run = Rollout(s, hosts, render_hosts(s, hosts), Ssh(s), Reporter())
            verdict = cutover.rollout(run, ParameterRecord(s, Reporter()), applier, apply=True)
        finally:
            stop.set()
            watcher.join(timeout=30)
        assert verdict.ok, verdict.problems
        assert applier.seen == [None]  # no proof while the policy is detached
        gone = seen.index(None)
        assert set(seen[gone:]) == {None}  # and none at any moment after the withdrawal
        assert parameters.read_record_text(direct(fleet)) is None
        assert awsapi.classic.header_ports(direct(fleet)) == [] and live_digests(fleet) == targets(fleet)
    finally:
        faults.stop()


@pytest.mark.integration
def test_a_rollout_whose_record_cannot_be_written_is_refused_before_any_host_changes(fleet, monkeypatch):
    """Parameter Store's limit made small enough for this fleet's record: the run stops before
    go-live, every host as it was (nothing served, no links, the lock free), no record."""
    from tests.test_faults import lock_free, snapshot
    from tests.test_rollout import driver

    before = snapshot(fleet)
    monkeypatch.setattr(records, "PARAMETER_LIMIT", 200)
    verdict, outcomes = driver(fleet)
    assert verdict.code == 1
    assert any("before any change: the readiness record of 2 instance(s)" in p and "(200)" in p
               for p in verdict.problems), verdict.problems
    assert not any(o.changed for o in outcomes.values())
    assert snapshot(fleet) == before
    deadline = time.monotonic() + 30  # each host's session lets go once its connection closed
    while not all(lock_free(h) for h in fleet.hosts):
        assert time.monotonic() < deadline, "a rollout lock is still held"
        time.sleep(0.1)
    assert not [p for h in fleet.hosts for p in (h.root / "releases").iterdir() if p.name.startswith(".stage")]
    assert by_path(direct(fleet)) == {}
