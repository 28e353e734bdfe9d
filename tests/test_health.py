"""Who is not healthy where (core/health.py): the words every wait for AWS's health checks reports."""

from core.health import NO_HEALTH, NO_TARGET, NOT_REGISTERED, described, not_in_service, sick_groups
from core.network import NetworkState, TargetGroupState


def group(name: str, states: dict[str, str]) -> TargetGroupState:
    return TargetGroupState(arn=f"arn:{name}", name=name, port=80, proxy_protocol_v2=False,
                            targets=tuple(sorted(states)), states=states)


def test_an_instance_counts_as_healthy_only_when_in_service():
    health = {"i-1": "InService", "i-2": "OutOfService (Instance has failed at least the UnhealthyThreshold)",
              "i-3": "InService (registered; the lab reports no health)"}
    sick = not_in_service(health, ["i-1", "i-2", "i-3", "i-4"], expected=["i-5"])
    assert sick == {"i-2": health["i-2"], "i-4": NO_HEALTH, "i-5": NOT_REGISTERED}
    assert described(sick).startswith("i-2: OutOfService") and "i-5: not registered" in described(sick)
    assert not_in_service(health, ["i-1", "i-3"], expected=["i-1"]) == {}


def test_a_group_with_no_target_proves_nothing_and_one_not_read_is_named():
    state = NetworkState(arn="arn:lb", listeners={}, groups={
        "plain": group("plain", {"i-1": "healthy", "i-2": "initial: Initial health checks in progress"}),
        "empty": group("empty", {}),
        "fine": group("fine", {"i-1": "healthy"})})
    assert sick_groups(state, ["plain", "empty", "fine", "gone"]) == {
        "plain": {"i-2": "initial: Initial health checks in progress"}, "empty": NO_TARGET, "gone": NO_TARGET}
    assert sick_groups(state, ["fine"]) == {}
