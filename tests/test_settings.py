"""Settings: every shipped environment loads; every bad value is refused with the key named."""

from __future__ import annotations

import pytest

from core.errors import SettingsError
from core.settings import load
from tests.conftest import PROJECT_DIR, _camel, settings_from, stack_config


@pytest.mark.parametrize("env", ["lab", "staging"])
def test_shipped_environments_load(env):
    s = load(env, PROJECT_DIR)
    assert s.env == env
    assert s.proxy_protocol is True
    assert s.read_timeout >= s.load_balancer.idle_timeout


def refused(**changes) -> str:
    with pytest.raises(SettingsError) as info:
        settings_from("staging", **changes)
    return str(info.value)


BAD = [
    # (changes, exact error line)
    ({"server_name": "ws.example.com; include /etc/passwd"},
     "Pulumi.staging.yaml: wsgate:serverName = 'ws.example.com; include /etc/passwd': "
     "not a valid DNS name (letters, digits, hyphens and dots only)"),
    ({"server_name": "ws.example.com {"}, None),
    ({"server_name": 'ws"example.com'}, None),
    ({"server_name": "ws.example.com\nreturn 200"}, None),
    ({"server_name": "-bad.example.com"}, None),
    ({"server_name": "*.example.com"}, None),
    ({"ports": {"http": 0}},
     "Pulumi.staging.yaml: wsgate:ports.http = 0: Input should be greater than or equal to 1"),
    ({"ports": {"tls": 65536}},
     "Pulumi.staging.yaml: wsgate:ports.tls = 65536: Input should be less than or equal to 65535"),
    ({"ports": {"tls": 80}},
     "Pulumi.staging.yaml: wsgate:ports: port 80 is used by both ports.http and ports.tls"),
    ({"ports": {"health": 81}},
     "Pulumi.staging.yaml: wsgate:ports: port 81 is used by both ports.tls and ports.health"),
    ({"load_balancer": {"subnetCidrs": ["10.0.0.0/33"]}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.subnetCidrs[0] = '10.0.0.0/33': "
     "not a CIDR ('10.0.0.0/33' does not appear to be an IPv4 or IPv6 network)"),
    ({"load_balancer": {"subnetCidrs": ["10.0.0.1/24"]}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.subnetCidrs[0] = '10.0.0.1/24': "
     "not a CIDR (10.0.0.1/24 has host bits set)"),
    ({"load_balancer": {"subnetCidrs": []}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.subnetCidrs = []: "
     "List should have at least 1 item after validation, not 0"),
    ({"load_balancer": {"allowedCidrs": ["anywhere"]}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.allowedCidrs[0] = 'anywhere': "
     "not a CIDR ('anywhere' does not appear to be an IPv4 or IPv6 network)"),
    ({"load_balancer": {"idleTimeout": 0}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.idleTimeout = 0: Input should be greater than or equal to 1"),
    ({"load_balancer": {"idleTimeout": 3601}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.idleTimeout = 3601: Input should be less than or equal to 3600"),
    ({"nginx": {"proxyReadTimeout": 299}},
     "Pulumi.staging.yaml: nginx.proxyReadTimeout (299) must be >= loadBalancer.idleTimeout (300),"
     " or nginx closes idle WebSockets the load balancer still holds open"),
    ({"nginx": {"proxySendTimeout": 10}},
     "Pulumi.staging.yaml: nginx.proxySendTimeout (10) must be >= loadBalancer.idleTimeout (300),"
     " or nginx closes idle WebSockets the load balancer still holds open"),
    ({"nginx": {"proxyReadTimeout": 0}},
     "Pulumi.staging.yaml: wsgate:nginx.proxyReadTimeout = 0: Input should be greater than 0"),
    ({"nginx": {"workerShutdownTimeout": -5}},
     "Pulumi.staging.yaml: wsgate:nginx.workerShutdownTimeout = -5: Input should be greater than 0"),
    ({"nginx": {"logDir": "/var/log/nginx; error_log /tmp/x"}},
     "Pulumi.staging.yaml: wsgate:nginx.logDir = '/var/log/nginx; error_log /tmp/x': "
     "not a plain path (letters, digits, . _ / + - only)"),
    ({"nginx": {"root": "relative/dir"}},
     "Pulumi.staging.yaml: wsgate:nginx.root = 'relative/dir': must be an absolute path"),
    ({"nginx": {"user": "www-data;"}},
     "Pulumi.staging.yaml: wsgate:nginx.user = 'www-data;': not a valid user name"),
    ({"nginx": {"bind": "0.0.0.0:80"}},
     "Pulumi.staging.yaml: wsgate:nginx.bind = '0.0.0.0:80': not an IP address"),
    ({"app": {"upstreams": ["127.0.0.1:8000; }"]}},
     "Pulumi.staging.yaml: wsgate:app.upstreams[0] = '127.0.0.1:8000; }': "
     "not host:port, [ipv6]:port or unix:/path"),
    ({"app": {"upstreams": ["127.0.0.1:70000"]}}, None),
    ({"app": {"upstreams": []}}, None),
    ({"load_balancer": {"certificateArn": "not-an-arn"}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.certificateArn = 'not-an-arn': "
     "not a valid ACM or IAM certificate ARN"),
    ({"load_balancer": {"instances": ["i-123"]}},
     "Pulumi.staging.yaml: wsgate:loadBalancer.instances[0] = 'i-123': "
     "not a valid EC2 instance ID (i-0123456789abcdef0)"),
    ({"load_balancer": {"name": "has_underscore"}}, None),
    ({"load_balancer": {"availabilityZones": ["eu-west-1a"]}},
     "Pulumi.staging.yaml: wsgate:loadBalancer: set exactly one of subnets (in a VPC) or availabilityZones"),
    ({"load_balancer": {"certificateArn": None}}, None),
    ({"hosts": [{"name": "a", "address": "192.0.2.1"}, {"name": "a", "address": "192.0.2.2"}]},
     "Pulumi.staging.yaml: host names must be unique: a"),
    ({"hosts": [{"name": "a", "address": "192.0.2.1", "sshPort": 99999}]},
     "Pulumi.staging.yaml: wsgate:hosts[0].sshPort = 99999: Input should be less than or equal to 65535"),
    ({"colour": "blue"}, "Pulumi.staging.yaml: wsgate:colour = 'blue': unknown key"),
    ({"aws:region": "mars"}, "Pulumi.staging.yaml: aws:region = 'mars': not a valid AWS region"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[str(c) for c, _ in BAD])
def test_bad_value_is_refused_with_key_and_value(changes, message):
    text = refused(**changes)
    if message is not None:
        assert text == message
    else:  # same rule as a case above: the error names the key
        (name, value), = changes.items()
        key = f"wsgate:{_camel(name)}" + (f".{next(iter(value))}" if isinstance(value, dict) else "")
        assert text.startswith(f"Pulumi.staging.yaml: {key}"), text


def test_missing_required_key_is_named():
    with pytest.raises(SettingsError) as info:
        settings_from("staging", **{"wsgate:app": None})
    assert "wsgate:app" in str(info.value)


def test_missing_environment_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="no such environment file"):
        load("nowhere", tmp_path)


def test_invalid_environment_name_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="not a valid environment name"):
        load("../etc", tmp_path)


def test_environment_may_be_given_as_a_file(tmp_path):
    path = tmp_path / "Pulumi.other.yaml"
    path.write_text((PROJECT_DIR / "Pulumi.lab.yaml").read_text())
    assert load(str(path)).env == "other"


def test_errors_list_every_problem_at_once():
    text = refused(ports={"http": 0}, server_name="a b")
    assert "wsgate:ports.http" in text and "wsgate:serverName" in text


@pytest.mark.parametrize("gateway, why", [
    ("bastion:ssh", "the port must be a number from 1 to 65535"),
    ("2001:db8::1", "is not [user@]host[:port] (an IPv6 address goes in brackets)"),
    ("[198.51.100.1]:22", "brackets are for IPv6 addresses"),
    ("ops@bastion;rm:22", "not a valid DNS name"),
])
def test_malformed_gateway_is_refused_when_the_settings_load(gateway, why):
    assert why in refused(ssh={"gateway": gateway})


@pytest.mark.parametrize("gateway, hops", [
    ("[2001:db8::1]:22", [(None, "2001:db8::1", 22)]),
    ("ops@bastion.example.com", [("ops", "bastion.example.com", None)]),
    ("a.example.com:2222,ops@198.51.100.7", [(None, "a.example.com", 2222), ("ops", "198.51.100.7", None)]),
])
def test_gateways_and_chains_parse(gateway, hops):
    from core.settings import target

    s = settings_from("staging", ssh={"gateway": gateway})
    assert [target(h) for h in s.ssh.gateway.split(",")] == hops


def _twin(tmp_path, env: str, edit) -> None:
    """An environment file beside the lab's, made from it and edited."""
    import yaml

    doc = yaml.safe_load((PROJECT_DIR / "Pulumi.lab.yaml").read_text())
    edit(doc["config"])
    (tmp_path / f"Pulumi.{env}.yaml").write_text(yaml.safe_dump(doc))


def test_two_environments_sharing_a_record_or_a_load_balancer_are_refused(tmp_path):
    """One environment would read, overwrite or detach the other's: refused when either loads."""
    def same_record(c):
        c["wsgate:record"] = {"parameterPath": "/shared/readiness"}

    _twin(tmp_path, "blue", lambda c: (same_record(c), c["wsgate:loadBalancer"].update(name="blue")))
    _twin(tmp_path, "green", same_record)  # and the lab's load balancer name
    _twin(tmp_path, "lab", lambda c: None)
    with pytest.raises(SettingsError) as caught:
        load("green", tmp_path)
    message = str(caught.value)
    assert ("wsgate:record.parameterPath = '/shared/readiness': environment 'blue' (Pulumi.blue.yaml) uses the same"
            in message)
    assert ("wsgate:loadBalancer.name = 'wsgate-lab': environment 'lab' (Pulumi.lab.yaml) manages a load balancer"
            in message)
    with pytest.raises(SettingsError, match="environment 'green'"):
        load("blue", tmp_path)


def test_environments_in_other_regions_or_with_their_own_names_load(tmp_path):
    _twin(tmp_path, "lab", lambda c: None)
    _twin(tmp_path, "west", lambda c: c.update({"aws:region": "us-west-2"}))  # same names, another region
    _twin(tmp_path, "own", lambda c: c["wsgate:loadBalancer"].update(name="wsgate-own"))  # default record path
    for env in ("lab", "west", "own"):
        assert load(env, tmp_path).env == env


@pytest.mark.parametrize("delay, floor, drained", [(0, 75, 75), (30, 75, 75), (120, 75, 120), (0, 5, 5)])
def test_a_network_turn_off_drains_at_least_switch_drain_whatever_the_deregistration_delay(delay, floor, drained):
    from core.listeners import drain_seconds

    lb = {**stack_config("staging")["wsgate:loadBalancer"], "type": "network", "availabilityZones": [],
          "subnets": ["subnet-0123456789abcdef0"], "vpcId": "vpc-0123456789abcdef0",
          "deregistrationDelay": delay, "switchDrain": floor}
    assert drain_seconds(settings_from("staging", load_balancer=lb)) == drained
    assert drain_seconds(settings_from("staging")) == 0  # a Classic ELB's policy goes off in place
