"""Who is not healthy where, as AWS's health checks say it: the pure half of every wait for them
(after a network switch, before one, and a move's proof of its new load balancer)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # core.network words its own holds with `described`
    from core.network import NetworkState

NO_HEALTH = "no health reported"  # registered, and the API says nothing of it
NOT_REGISTERED = "not registered"  # expected (loadBalancer.instances), and not registered
NO_TARGET = {"(none)": "no target registered"}  # a group that holds no target proves nothing


def not_in_service(health: Mapping[str, str], registered: Iterable[str],
                   expected: Iterable[str] = ()) -> dict[str, str]:
    """Instance ID -> what AWS says of it, for every registered or expected instance that is not
    InService (`health`: instance -> InService or OutOfService (why), the words of a Classic ELB's
    instance health and of `core.network.target_health`)."""
    registered = set(registered)
    sick = {}
    for instance in sorted(registered | set(expected)):
        word = health.get(instance, "")
        if not word.startswith("InService"):
            sick[instance] = word or (NO_HEALTH if instance in registered else NOT_REGISTERED)
    return sick


def sick_groups(state: NetworkState, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Target group name -> instance -> its state, for each named group with a target that is not
    `healthy`, or with no target at all (or absent): `NO_TARGET`."""
    sick = {}
    for name in names:
        group = state.groups.get(name)
        states = ({i: word for i, word in group.states.items() if word != "healthy"}
                  if group is not None and group.targets else dict(NO_TARGET))
        if states:
            sick[name] = states
    return sick


def described(sick: Mapping[str, str]) -> str:
    """`instance: why; ...`, for a message."""
    return "; ".join(f"{instance}: {why}" for instance, why in sorted(sick.items()))
