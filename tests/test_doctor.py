"""`fab status` verdicts, pure: facts in, problems out."""

from __future__ import annotations

from core.doctor import BalancerFacts, HostFacts, balancer_problems, host_problems
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
