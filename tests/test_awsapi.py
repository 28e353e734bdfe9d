"""The AWS edge at fleet size, against a loopback AWS endpoint (moto server): every read returns
every item, past a chunk of IDs; the lab's applier registers a fleet in bounded batches; a
throttled call is retried by botocore and the task says so."""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import threading

import pytest

import awsapi.clients
from awsapi import balancer, classic, ec2, network, parameters
from awsapi.clients import REGISTER_PER_CALL, client
from core.errors import SettingsError
from core.settings import CLASSIC_INSTANCES_QUOTA, NLB_CROSS_ZONE_TARGETS_QUOTA, NLB_TARGETS_QUOTA, from_config
from lab import applier
from remote.report import reading
from tests.conftest import settings_from, stack_config
from tests.support.procs import free_port

FLEET = 120  # more than two chunks of IDs (CHUNK) and a batch of registrations (REGISTER_PER_CALL)
CHUNK = 50  # IDs per describe call in the fleet test
SIZED = {"DescribeInstances": CHUNK, "DescribeSecurityGroups": CHUNK,
         "RegisterInstancesWithLoadBalancer": REGISTER_PER_CALL, "RegisterTargets": REGISTER_PER_CALL,
         "DeregisterTargets": REGISTER_PER_CALL}


def ids(n: int, start: int = 1) -> list[str]:
    return [f"i-{k:017x}" for k in range(start, start + n)]


# --- AWS's default quotas, checked at load -------------------------------------------------------

def test_more_instances_than_a_classic_load_balancer_takes_are_refused_at_load_naming_the_quota():
    with pytest.raises(SettingsError) as raised:
        settings_from("staging", hosts=[], load_balancer={"instances": ids(CLASSIC_INSTANCES_QUOTA + 1)})
    message = str(raised.value)
    assert "1001 instances (loadBalancer.instances and hosts[].instanceId)" in message
    assert "AWS's default quota of 1,000 registered instances per Classic Load Balancer" in message
    assert "loadBalancer.raisedQuotas: true" in message and "docs/troubleshooting.md#aws-quota" in message
    settings_from("staging", hosts=[], load_balancer={"instances": ids(CLASSIC_INSTANCES_QUOTA)})  # the quota: fine


def test_hosts_instance_ids_count_once_with_the_load_balancers_instances():
    hosts = [{"name": f"web-{k}", "address": f"10.0.{k // 250}.{k % 250 + 1}", "instanceId": i}
             for k, i in enumerate(ids(CLASSIC_INSTANCES_QUOTA))]
    s = settings_from("staging", hosts=hosts, load_balancer={"instances": ids(10)})  # the same 10 again: 1,000
    assert len(s.instances) == CLASSIC_INSTANCES_QUOTA
    with pytest.raises(SettingsError, match="1001 instances"):
        settings_from("staging", hosts=hosts, load_balancer={"instances": ids(1, start=CLASSIC_INSTANCES_QUOTA + 1)})


@pytest.mark.parametrize("cross_zone, fits, quota", [(True, NLB_CROSS_ZONE_TARGETS_QUOTA // 4, "500 targets per "
                                                      "Network Load Balancer with cross-zone load balancing on"),
                                                     (False, NLB_TARGETS_QUOTA // 4, "3,000 targets per Network Load "
                                                      "Balancer:")])
def test_a_network_load_balancer_counts_each_instance_in_the_kits_four_groups(cross_zone, fits, quota):
    lb = {"type": "network", "crossZone": cross_zone}
    settings_from("staging", hosts=[], load_balancer={**lb, "instances": ids(fits)})
    with pytest.raises(SettingsError) as raised:
        settings_from("staging", hosts=[], load_balancer={**lb, "instances": ids(fits + 1)})
    assert f"{fits + 1} instances (loadBalancer.instances and hosts[].instanceId), each in up to 4 target groups: " \
           f"{4 * (fits + 1)} targets exceed AWS's default quota of {quota}" in str(raised.value)


def test_raised_quotas_skip_the_default_ones():
    s = settings_from("staging", load_balancer={"instances": ids(CLASSIC_INSTANCES_QUOTA + 1), "raisedQuotas": True})
    assert s.quota_problem() is None


# --- reads and registrations at fleet size (moto server) -----------------------------------------

@contextlib.contextmanager
def sizes(*apis):
    """Operation name -> the size of the list each call sent (the one SIZED bounds), on these
    (shared) clients, while the block runs."""
    seen: dict[str, list[int]] = {}

    def record(params, model, **_):
        key = {"DescribeInstances": "InstanceIds", "DescribeSecurityGroups": "GroupIds"}.get(model.name)
        listed = params.get(key) if key else params.get("Instances") or params.get("Targets")
        if model.name == "DescribeInstances" and not listed:
            listed = next((f["Values"] for f in params.get("Filters", []) if f["Name"] == "instance-id"), None)
        if model.name in SIZED and listed is not None:
            seen.setdefault(model.name, []).append(len(listed))

    for api in apis:
        api.meta.events.register("provide-client-params", record, unique_id="test-awsapi-sizes")
    try:
        yield seen
    finally:
        for api in apis:
            api.meta.events.unregister("provide-client-params", unique_id="test-awsapi-sizes")


def endpoints(url: str) -> list[dict[str, str]]:
    return [{x: url for x in ("ec2", "elb", "elbv2", "ssm", "sts")}]


def run_fleet(s, subnet: str | None = None, groups: int = 0) -> list[str]:
    """FLEET instances in the endpoint's EC2; with `groups`, the last one has that many security
    groups, one inbound rule each (more than AWS allows on one instance, but moto takes them, and a
    read of them crosses a chunk of group IDs)."""
    api = client(s, "ec2")
    image = api.describe_images()["Images"][0]["ImageId"]
    where = {"SubnetId": subnet} if subnet else {}
    vpc = api.describe_vpcs()["Vpcs"][0]["VpcId"]
    made = [i["InstanceId"] for i in api.run_instances(ImageId=image, MinCount=FLEET - 1, MaxCount=FLEET - 1,
                                                        **where)["Instances"]]
    ids = [api.create_security_group(GroupName=f"fleet-{k}", Description="fleet", VpcId=vpc)["GroupId"]
           for k in range(groups)]
    for group in ids:
        api.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 81, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    made += [i["InstanceId"] for i in api.run_instances(ImageId=image, MinCount=1, MaxCount=1, **where,
                                                         **({"SecurityGroupIds": ids} if ids else {}))["Instances"]]
    return sorted(made)


def test_a_fleet_is_read_whole_and_registered_in_batches_by_both_kinds(aws, monkeypatch):
    """One fleet in the lab's subnet, behind a Classic ELB and a network load balancer (each its own
    environment): the applier registers every instance in batches, every read returns all of them.
    IDs go CHUNK a call here (fewer security groups to make than past the kit's IDS_PER_CALL)."""
    monkeypatch.setattr(ec2, "IDS_PER_CALL", CHUNK)
    base = settings_from("lab", dns=None, **{"aws:endpoints": endpoints(aws.url)})
    vpc, subnets = applier.lab_network(base)
    fleet = run_fleet(base, subnets[0], groups=CHUNK + 1)
    s = settings_from("lab", dns=None, proxy_protocol=False, load_balancer={"instances": fleet},
                      **{"aws:endpoints": endpoints(aws.url)})
    with sizes(client(s, "elb"), client(s, "ec2")) as seen:
        applier.apply(s)
        assert classic.registered(s) == fleet
        assert sorted(classic.instance_health(s)) == fleet
        read = balancer.health(s)  # one description, then the instances' health
        assert read is not None and read.registered == fleet and sorted(read.states) == fleet
        assert sorted(balancer.registered_instances(s)) == fleet
        ingress, unknown = ec2.instance_ingress(s, fleet)
    assert sorted(ingress) == fleet and unknown == []
    assert max(len(rules) for rules in ingress.values()) == CHUNK + 1
    assert sum(seen["RegisterInstancesWithLoadBalancer"]) == FLEET
    assert len(seen["DescribeSecurityGroups"]) == 2  # past a chunk
    for name, counts in seen.items():
        assert max(counts) <= SIZED[name], (name, counts)

    config = {**stack_config("lab"), "aws:endpoints": endpoints(aws.url), "wsgate:proxyProtocol": False}
    config.pop("wsgate:dns")
    config = applier.network_config(config, vpc, subnets)
    config["wsgate:loadBalancer"] = {**config["wsgate:loadBalancer"], "instances": fleet,
                                     "crossZone": False}  # 120 x 4 targets: more than 500 with cross-zone on
    s = from_config("lab-nlb", config, "Pulumi.lab-nlb.yaml")  # its own environment
    with sizes(client(s, "elbv2"), client(s, "ec2")) as seen:
        applier.apply(s)
        state = network.network_state(s)
        assert state is not None and list(state.present) == fleet
        assert len(state.groups) == 4 and all(list(g.targets) == fleet for g in state.groups.values())
        assert sorted(balancer.registered_instances(s)) == fleet
        read = balancer.health(s)  # the instances in the groups the listeners forward to
        assert read is not None and sorted(read.registered) == fleet and sorted(read.states) == fleet
    assert sum(seen["RegisterTargets"]) == 4 * FLEET
    for name, counts in seen.items():
        assert max(counts) <= SIZED[name], (name, counts)


@contextlib.contextmanager
def calls(api):
    """The operation names called on this (shared) client while the block runs, in order."""
    seen: list[str] = []
    api.meta.events.register("provide-client-params", lambda model, **_: seen.append(model.name),
                             unique_id="test-awsapi-calls")
    try:
        yield seen
    finally:
        api.meta.events.unregister("provide-client-params", unique_id="test-awsapi-calls")


def test_a_network_read_describes_the_groups_in_one_call_and_still_reads_them_when_one_is_missing(aws):
    """The stand-ins, the waits and fab status read the network load balancer again and again: the
    kit's four groups are one DescribeTargetGroups call. AWS refuses a call naming a group that does
    not exist, so with one gone the others are still read, each by its name."""
    base = settings_from("lab", dns=None, **{"aws:endpoints": endpoints(aws.url)})
    vpc, subnets = applier.lab_network(base)
    fleet = run_fleet(base, subnets[0])[:2]
    config = {**stack_config("lab"), "aws:endpoints": endpoints(aws.url), "wsgate:proxyProtocol": False}
    config.pop("wsgate:dns")
    config = applier.network_config(config, vpc, subnets)
    config["wsgate:loadBalancer"] = {**config["wsgate:loadBalancer"], "instances": fleet}
    s = from_config("lab-nlb", config, "Pulumi.lab-nlb.yaml")
    applier.apply(s)
    elbv2 = client(s, "elbv2")
    with calls(elbv2) as seen:
        whole = network.network_state(s)
    assert whole is not None and len(whole.groups) == 4 and seen.count("DescribeTargetGroups") == 1, seen
    proxy = next(g for g in whole.groups.values() if g.proxy_protocol_v2)  # no listener forwards to it (off)
    assert all(proxy not in groups for groups in whole.listeners.values())
    elbv2.delete_target_group(TargetGroupArn=proxy.arn)
    with calls(elbv2) as seen:
        read = network.network_state(s)
    assert read is not None and sorted(read.groups) == sorted(set(whole.groups) - {proxy.name}), read.groups
    assert read.listeners == whole.listeners and read.present == whole.present
    assert seen.count("DescribeTargetGroups") == 1 + 4, seen  # the four together (refused), then one each


# --- an endpoint out of reach ---------------------------------------------------------------------

class _Refusing(http.server.BaseHTTPRequestHandler):
    """An SSM endpoint that answers every call with an error of AWS's (not one botocore retries)."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"__type": "AccessDeniedException", "message": "not here"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_endpoint_out_of_reach_is_tried_three_times_then_once_until_it_answers_again():
    """A connection AWS's endpoint does not take is tried CONNECT_ATTEMPTS times, not the 8 a
    throttle gets (a route that drops packets held each call for a minute: 8 connect timeouts),
    and once for the next call to that endpoint; once it answers (an error of its own too), the
    next failure gets its three tries again."""
    port = free_port()  # nothing listens there: every connection is refused
    s = settings_from("lab", dns=None, **{"aws:endpoints": [{"ssm": f"http://127.0.0.1:{port}"}]})
    tries: list[str] = []
    client(s, "ssm").meta.events.register("before-send", lambda **_: tries.append("try"))

    def read() -> tuple[int, str]:
        tries.clear()
        with pytest.raises(awsapi.clients.AwsError) as failed:
            parameters.read_stored(s)
        return len(tries), str(failed.value)

    first = read()
    assert first[0] == awsapi.clients.CONNECT_ATTEMPTS == 3
    assert first[1].startswith(f"ssm get-parameter {s.parameter_path}: Could not connect to the endpoint URL"), first
    assert read()[0] == 1  # known out of reach in this process: one try
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answered = read()
        assert answered[0] == 1 and "AccessDeniedException" in answered[1], answered
    finally:
        server.shutdown()
        server.server_close()
    assert read()[0] == 3  # it answered since: out of reach again, three tries
    awsapi.clients._unreachable(attempts=1, endpoint=client(s, "ssm")._endpoint)  # an answer: forget the port


def test_a_wait_rides_out_aws_out_of_reach_until_its_deadline_and_says_so_once():
    """The waits of minutes (health before and after a network switch, a move's proof) read again
    while AWS is out of reach, until their deadline; any other AWS error ends them at once."""
    clock, notes, pauses = [0.0], [], []
    answers: list = [awsapi.clients.AwsUnreachable("ssm get-parameter p: Could not connect"),
                     awsapi.clients.AwsUnreachable("again"), "read"]

    def read():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def pause():
        pauses.append(clock[0])
        clock[0] += 5

    assert reading(read, 100, pause, notes.append, lambda: clock[0]) == "read"
    assert pauses == [0, 5] and notes == ["AWS is out of reach; trying again until the wait ends: "
                                          "ssm get-parameter p: Could not connect"]
    answers[:] = [awsapi.clients.AwsUnreachable("still")] * 30
    with pytest.raises(awsapi.clients.AwsUnreachable):  # past the deadline: the wait's own failure
        reading(read, 12, pause, notes.append, lambda: clock[0])
    answers[:] = [awsapi.clients.AwsError("ssm get-parameter p: AccessDenied")]
    with pytest.raises(awsapi.clients.AwsError, match="AccessDenied"):
        reading(read, 1000, pause, notes.append, lambda: clock[0])


# --- throttling ----------------------------------------------------------------------------------

def test_a_throttled_call_is_retried_with_backoff_and_the_task_says_so(aws, capsys):
    """AWS answers Throttling three times, then the call reaches the endpoint: botocore's own retry
    logic runs (adaptive: backoff and a slower client-side rate), the read returns the load
    balancer, and the task layer prints the note."""
    from botocore.awsrequest import AWSResponse

    from remote.tasks import _reported

    s = settings_from("lab", **{"aws:endpoints": endpoints(aws.url)})
    elb = client(s, "elb")
    elb.create_load_balancer(LoadBalancerName=s.load_balancer.name, AvailabilityZones=["us-east-1a"],
                             Listeners=[{"Protocol": "TCP", "LoadBalancerPort": 80, "InstancePort": 80}])
    sent = []

    class Body:
        def stream(self, **_):
            yield (b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded"
                   b"</Message></Error><RequestId>1</RequestId></ErrorResponse>")

    def throttle(request, **_):
        sent.append(request.url)
        return AWSResponse(request.url, 400, {}, Body()) if len(sent) <= 3 else None  # None: really sent

    elb.meta.events.register("before-send.elastic-load-balancing.DescribeLoadBalancers", throttle,
                             unique_id="test-awsapi-throttle")
    try:
        found = _reported(lambda: classic.describe(s))()
    finally:
        elb.meta.events.unregister("before-send.elastic-load-balancing.DescribeLoadBalancers",
                                   unique_id="test-awsapi-throttle")
    assert elb.meta.config.retries == {"total_max_attempts": awsapi.clients.ATTEMPTS, "mode": "adaptive"}
    assert found is not None and found["LoadBalancerName"] == s.load_balancer.name
    assert len(sent) == 4
    note = "AWS throttled 1 call; retried with backoff (docs/troubleshooting.md#aws-throttled)"
    assert note in capsys.readouterr().err
    assert awsapi.clients.throttled_calls() >= 1


def test_a_task_ending_while_a_background_read_still_imports_botocore_ends_with_its_own_error(monkeypatch):
    """A run whose hosts all fail at connect can end before the background AWS read has finished
    importing awsapi.clients: the module is then in sys.modules, half made, without its throttle
    counter. The task ends with its own message and exit code (it was an AttributeError)."""
    import types

    from invoke.exceptions import Exit

    from core.errors import KitError
    from remote.tasks import _reported

    def fails():
        monkeypatch.setitem(sys.modules, "awsapi.clients", types.ModuleType("awsapi.clients"))  # half imported
        raise KitError("every host failed at connect")

    with pytest.raises(Exit) as ended:
        _reported(fails)()
    assert ended.value.code == 1 and "error: every host failed at connect" in str(ended.value.message)


def test_an_aws_profile_that_does_not_exist_is_named_not_a_traceback(monkeypatch):
    """AWS_PROFILE naming no profile fails when botocore builds a client, outside any call: the
    error names the client and the profile (it was a ProfileNotFound traceback from `fab status`)."""
    from awsapi.clients import AwsError

    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    s = settings_from("lab", **{"aws:endpoints": endpoints("http://127.0.0.1:9")})  # never reached
    with pytest.raises(AwsError, match=r"ssm client for region us-east-1 at http://127.0.0.1:9: .*no-such-profile"):
        client(s, "ssm")
