"""Which hosts a task takes (--hosts), how many go live in each canary batch (--batch) and how many are
worked on at once (--parallel)."""

import pytest

from core.batches import PARALLEL, at_once, batches, split
from core.errors import PlanError


def test_batches_grow_to_every_host_and_a_percentage_rounds_up():
    assert batches(None, 10) == [10]
    assert batches("1,25%,100%", 10) == [1, 3, 10]
    assert batches("2,2,5", 10) == [2, 5, 10]  # a repeated size is one batch; the rest always follows
    assert batches("50%", 3) == [2, 3]
    assert batches("1,25%", 0) == []
    assert split(list("abcdefghij"), "1,25%,100%") == [["a"], ["b", "c"], list("defghij")]


@pytest.mark.parametrize("spec, why", [("0", "not a host count"), ("101%", "not a host count"),
                                       ("x", "not a host count"), ("5,2", "must not shrink"),
                                       ("", "names no batch"), (" ", "names no batch")])
def test_a_bad_batch_spec_is_named(spec, why):
    with pytest.raises(PlanError, match=why) as refused:
        batches(spec, 10)
    assert f"--batch {spec!r}" in str(refused.value)


def test_parallel_is_a_whole_number_of_hosts_from_one():
    assert at_once(None) == PARALLEL == 10
    assert at_once("3") == at_once(3) == 3 and at_once(" 500 ") == 500
    for given in ("abc", "0", "-3", "2.5", "", "²"):
        with pytest.raises(PlanError, match=r"--parallel .*: not a number of hosts \(a whole number, 1 or more\)"):
            at_once(given)


def test_hosts_names_a_subset_and_never_none_of_them():
    """`fab check --hosts`: the named hosts; an unknown name is refused, and so is a value that
    names none (`--hosts=` or `--hosts ,`), which ran on no host and said "passes"."""
    from remote.hosts import resolve
    from tests.conftest import settings_from

    s = settings_from("lab")
    assert [h.name for h in resolve(s, "lab2, lab1")] == ["lab1", "lab2"]
    assert len(resolve(s, None)) == len(s.hosts)
    with pytest.raises(PlanError, match="unknown host"):
        resolve(s, "lab1,nosuch")
    for given in ("", ",", " , "):
        with pytest.raises(PlanError, match=f"--hosts {given!r} names no host"):
            resolve(s, given)


def test_two_hosts_on_one_instance_id_are_refused():
    """The record names each instance's digest: two hosts given one ID would stand for each other."""
    from core.errors import SettingsError
    from tests.conftest import settings_from

    hosts = [{"name": "a", "address": "127.0.1.1", "instanceId": "i-0123456789abcdef0"},
             {"name": "b", "address": "127.0.1.2", "instanceId": "i-0123456789abcdef0"}]
    with pytest.raises(SettingsError, match="hosts\\[\\]\\.instanceId must be unique: i-0123456789abcdef0 is given"):
        settings_from("lab", hosts=hosts)


def test_every_task_refuses_a_bad_parallel_before_it_reads_anything():
    """Refused by name before the settings' hosts or AWS are touched (the lab's hosts and endpoint
    are not running here: nothing is there to reach, and nothing is tried)."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_DIR

    for task, given in (("rollout", "abc"), ("check", "2.5"), ("rollback", "0"), ("move", "-3")):
        result = subprocess.run([sys.executable, "-m", "fabric", task, "--env", "lab", f"--parallel={given}"],
                                cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"error: --parallel '{given}': not a number of hosts" in result.stderr
        assert "Traceback" not in result.stderr and "connect" not in result.stdout + result.stderr
