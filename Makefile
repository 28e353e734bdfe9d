# make test: everything the suite needs, then the suite. make unit: the pure tests alone. make lab: the whole system on loopback,
# with its DNS server (ws.lab.test on 127.0.0.1:15353, UDP; docs/lab.md#dns) (make lab LB=network: the same with a network
# load balancer; make lab-move TO=network: one move of the running lab to a new load balancer, docs/lab.md#moves).
# make bench: rollout figures for K = 1..500 hosts
# against the floor, into docs/bench.json and docs/bench.png (make bench BENCH_ARGS="--sizes 1,10 --runs 3").
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
LB ?= classic

.PHONY: test unit lab lab-move lab-down bench deps system-deps venv clean

test: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck core/session.sh scripts/*.sh .ci/run
	$(VENV)/bin/mypy
	@# with the bytecode cache on (PYTHONDONTWRITEBYTECODE off): the suite's hundreds of fab and lab processes
	@# and pytest's rewritten test modules are compiled once, not at each start
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n 3 --dist loadgroup --durations=15  # three workers on two cores: most tests wait on real processes (docs/testing.md)

unit: venv  # the pure tests only: no nginx, sshd, HAProxy or moto (under a minute)
	$(PY) -m pytest -n 2 -m "not integration"

lab: deps
	$(PY) -m lab up --lb $(LB)

lab-move:  # TO=classic-on|classic-off|network|classic: plan-move, the fab move it prints, promote
	@test -n "$(TO)" || { echo "make lab-move TO=classic-on|classic-off|network|classic"; exit 2; }
	command=$$($(PY) -m lab plan-move --to $(TO) | tee /dev/stderr | tail -n 1) && test -n "$$command" && $$command && $(PY) -m lab promote

bench: deps
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m benchmarks.rollout $(BENCH_ARGS)

lab-down:
	@if [ -x $(PY) ]; then $(PY) -m lab down; fi

deps: system-deps venv

system-deps:
	@scripts/system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
