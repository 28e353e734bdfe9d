"""A host left as a lost controller leaves it: `current` names another release than the one nginx
runs. A restore reloads what `current` names, so such a host is refused before any change, with
the commands that reconcile it; asserted on the end state of every host (what nginx serves, both
links, the lock, the record)."""

from __future__ import annotations

import os

import pytest

from tests.test_faults import assert_back, snapshot, two_releases
from tests.test_rollout import fab, tls_port_taken_on

pytestmark = pytest.mark.integration
FLEET_SIZE = 3


def test_a_host_running_another_release_than_current_is_refused_before_any_change(fleet):
    two_releases(fleet)
    h2 = fleet.hosts[1]
    running, _, previous = snapshot(fleet)["hosts"]["h2"]
    # cut short between its swap and its reload: `current` moved, nginx still runs the old release
    os.symlink(previous, h2.root / "current.tmp")
    os.replace(h2.root / "current.tmp", h2.root / "current")
    before = snapshot(fleet)
    assert before["hosts"]["h2"] == (running, previous, previous)

    with tls_port_taken_on(fleet, fleet.hosts[2]):  # a run that got going would fail on h3 and restore
        result = fab(fleet, "rollout")
    assert result.returncode == 1, result.stdout + result.stderr
    assert_back(fleet, before)  # every host as it was, h2 still serving what it served
    err = " ".join(result.stderr.split())
    assert f"h2: failed at lock: nginx runs {running[:12]} but `current` names {previous}" in err, err
    assert f"ln -sfn releases/{running} {h2.root}/current" in err
    assert "Traceback" not in result.stderr

    os.symlink(f"releases/{running}", h2.root / "current.tmp")  # the reconcile command, in effect
    os.replace(h2.root / "current.tmp", h2.root / "current")
    again = fab(fleet, "rollout")
    assert again.returncode == 0, again.stdout + again.stderr
