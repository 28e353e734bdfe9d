"""Which hosts a task works on: the environment's static list, or the instances registered
with the load balancer (found through the AWS API)."""

from __future__ import annotations

from core.errors import PlanError
from core.settings import Host, Settings


def resolve(settings: Settings, only: str | None = None) -> list[Host]:
    """The hosts of the environment; `only` is a comma-separated subset of host names."""
    if settings.discover:
        from awsapi.balancer import registered_instances

        found = registered_instances(settings)
        if not found:
            raise PlanError(f"no instances are registered with load balancer {settings.load_balancer.name}, "
                            "and loadBalancer.instances names none")
        missing = sorted(i for i, ip in found.items() if not ip)
        if missing:
            raise PlanError(f"registered instances without a private address: {', '.join(missing)}")
        hosts = [Host(name=i, address=ip, instance_id=i) for i, ip in sorted(found.items())]
    else:
        hosts = list(settings.hosts)
    if not hosts:
        raise PlanError(f"environment {settings.env} has no hosts (set wsgate:hosts, or wsgate:discover: true)")
    if only is not None:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        if not wanted:  # `--hosts=` or `--hosts ,`: never "every host", nor a check that passes on none
            raise PlanError(f"--hosts {only!r} names no host: give comma-separated host names, or leave it out "
                            "for every host")
        unknown = sorted(set(wanted) - {h.name for h in hosts})
        if unknown:
            raise PlanError(f"unknown host(s): {', '.join(unknown)}")
        hosts = [h for h in hosts if h.name in wanted]
    return hosts


def require_instance_ids(hosts: list[Host]) -> None:
    """The readiness record names instances: every host needs its instance ID."""
    missing = [h.name for h in hosts if not h.instance_id]
    if missing:
        raise PlanError(f"host(s) without instanceId: {', '.join(missing)}; the readiness record names "
                        "instances, so set hosts[].instanceId (or use discover: true)")
