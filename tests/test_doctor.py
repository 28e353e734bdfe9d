"""`fab status` verdicts, pure: facts in, problems out."""

from __future__ import annotations

from core.doctor import BalancerFacts, HostFacts, Ingress, balancer_problems, exposure_problems, host_problems
from tests.conftest import settings_from


def test_a_listener_whose_instance_protocol_is_not_tcp_is_a_problem_except_where_the_endpoint_cannot_keep_it():
    s = settings_from("staging")
    lb = BalancerFacts(exists=True, listeners=[("SSL", 443, "SSL", 81)], registered=list(s.load_balancer.instances),
                       health={i: "InService" for i in s.load_balancer.instances})
    problems, notes, _ = balancer_problems(s, lb, None, None)
    assert any("listener SSL:443 -> SSL:81: the instance protocol must be TCP" in p for p in problems)
    lab = BalancerFacts(**{**lb.__dict__, "lab_endpoint": True})
    problems, notes, _ = balancer_problems(s, lab, None, None)
    assert not any("instance protocol" in p for p in problems)
    assert any("instance protocol not checked" in n for n in notes)


def test_a_foreign_nginx_and_an_unhealthy_instance_are_named():
    s = settings_from("staging")
    host = HostFacts("web-1", "i-0123456789abcdef0", "d" * 64, nginx="foreign", pid="42",
                     cmdline="nginx: master process /usr/sbin/nginx -g daemon on;")
    assert any("did not start (pid 42" in p for p in host_problems(s, host, []))
    instances = list(s.load_balancer.instances)
    lb = BalancerFacts(exists=True, registered=instances,
                       health={instances[0]: "OutOfService (Instance has failed at least the UnhealthyThreshold)"})
    problems, _, _ = balancer_problems(s, lb, None, None)
    assert any(p.startswith(f"{instances[0]} is OutOfService") for p in problems)


def test_rules_that_open_a_proxied_port_beyond_the_load_balancer_are_named():
    lb_sg = "sg-0000000000000000a"
    ingress = {"i-0123456789abcdef0": [
        Ingress("sg-1 (wsgate)", "tcp", 80, 81, lb_sg),  # the kit's own rule: from the load balancer
        Ingress("sg-2 (ssh)", "tcp", 22, 22, "0.0.0.0/0"),  # another port
        Ingress("sg-3 (dns)", "udp", 0, 65535, "0.0.0.0/0"),  # not TCP
        Ingress("sg-4 (wide)", "tcp", 0, 1000, "10.0.0.0/8"),
        Ingress("sg-5 (all)", "-1", None, None, "sg-0000000000000000b"),
    ]}
    problems = exposure_problems([80, 81], [lb_sg], ingress)
    assert problems == [
        "i-0123456789abcdef0: security group sg-4 (wide) opens port(s) 80, 81 to 10.0.0.0/8, beyond the load "
        "balancer: anyone there can forge a PROXY header (remove the rule; the kit's instance group admits the "
        "load balancer only)",
        "i-0123456789abcdef0: security group sg-5 (all) opens port(s) 80, 81 to sg-0000000000000000b, beyond the "
        "load balancer: anyone there can forge a PROXY header (remove the rule; the kit's instance group admits "
        "the load balancer only)",
    ]


def test_security_groups_of_real_instances_are_read_and_judged(aws):
    """The read `fab status` makes, against a loopback AWS endpoint holding a real instance."""
    import boto3

    from remote import aws as remote_aws

    s = settings_from("staging", **{"aws:endpoints": [{x: aws.url for x in ("ec2", "elb", "ssm", "sts")}]})
    ec2 = boto3.client("ec2", region_name=s.aws.region, endpoint_url=aws.url)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    lb_sg, kit_sg, open_sg = (ec2.create_security_group(GroupName=n, Description=n, VpcId=vpc)["GroupId"]
                              for n in ("lb", "kit", "open"))
    ec2.authorize_security_group_ingress(GroupId=kit_sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 81, "UserIdGroupPairs": [{"GroupId": lb_sg}]}])
    ec2.authorize_security_group_ingress(GroupId=open_sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 81, "ToPort": 81, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet,
                                 SecurityGroupIds=[kit_sg, open_sg])["Instances"][0]["InstanceId"]
    ingress, unknown = remote_aws.instance_ingress(s, [instance, "i-0000000000000dead"])
    assert unknown == ["i-0000000000000dead"]
    problems = exposure_problems([80, 81], [lb_sg], ingress)
    assert len(problems) == 1 and problems[0].startswith(
        f"{instance}: security group {open_sg} (open) opens port(s) 81 to 0.0.0.0/0, beyond the load balancer")
    lb = BalancerFacts(exists=True, registered=[instance], health={instance: "InService"}, security_groups=[lb_sg],
                       ingress=ingress, unknown=unknown)
    judged, _, _ = balancer_problems(s, lb, None, None)
    assert problems[0] in judged
    assert "i-0000000000000dead: EC2 does not know this instance (its security groups cannot be checked)" in judged
