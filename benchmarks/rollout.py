"""Rollout time and memory as the fleet grows: ours, a bare paramiko floor, and Ansible.

For each fleet size K, real local hosts (sshd + nginx each, as in the test suite) and, in
the same run and alternating, with a changed config every time:
  - `fab rollout` (upload, nginx -t, swap, reload, probe on every host) and its no-op rerun;
  - the bare floor (benchmarks/floor.py: paramiko alone, the same per-host steps);
  - Ansible (benchmarks/ansible/playbook.yml: template + validate + reload handler + probe,
    forks = K, pipelining on, the same hosts and keys).
Each tool runs its own nginx under its own root on each host, started (untimed) before its
timed run and stopped after, since they share the listen addresses.

Run: make bench   (or: .venv/bin/python -m benchmarks.rollout --sizes 1,10,50 --runs 5)
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.render import render_hosts
from core.settings import load
from tests.support.fleet import Fleet
from tests.support.moto import MotoServer
from tests.support.nginx import Nginx
from tests.support.procs import free_port, start_app, stop

PROJECT_DIR = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def run(argv: list[str], log: Path, env: dict | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) of the process, exit code."""
    with log.open("ab") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def flatten(files: dict[str, str], token: str) -> str:
    """Our rendered tree as one file (includes inlined), naming `token` as its digest."""
    text = files["nginx.conf"]
    http = "\n".join(files[n] for n in sorted(files) if n.startswith("http.d/"))
    text = text.replace("    include digest.conf;", f'    map $nginx_version $config_digest {{ default "{token}"; }}')
    return text.replace("    include http.d/*.conf;", http)


class Bench:
    def __init__(self, k: int, workdir: Path, app: tuple[str, int], aws_url: str, net: int):
        self.k, self.dir = k, workdir
        self.fleet = Fleet(workdir / "fleet", k, net, app, aws_url, env=f"bench{k}").start()
        self.fleet.set("wsgate:ssh", {"commandTimeout": 60, "connectTimeout": 10})
        self.log = workdir / "bench.log"
        self.gen = 0
        for h in self.fleet.hosts:
            for tool in ("floor", "ansible"):
                for sub in ("logs", "tmp"):
                    (h.dir / tool / sub).mkdir(parents=True, exist_ok=True)

    def stop_nginx(self) -> None:
        for h in self.fleet.hosts:
            for root in (h.root, h.dir / "floor", h.dir / "ansible"):
                Nginx(root).stop()

    def _next(self) -> str:
        self.gen += 1
        self.fleet.set("wsgate:nginx", {"workerShutdownTimeout": 100 + self.gen})
        return f"gen-{self.gen}"

    def _fab(self) -> tuple[float, float, int]:
        return run([sys.executable, "-m", "fabric", "rollout", "--env", str(self.fleet.env_file),
                    "--parallel", str(self.k)], self.log)

    # -- ours ------------------------------------------------------------------------------

    def ours(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """A changing rollout (nginx already running an older config), then the no-op rerun."""
        self.stop_nginx()
        self._next()
        assert self._fab()[2] == 0, f"untimed setup rollout failed, see {self.log}"
        self._next()
        changed = self._fab()
        noop = self._fab()
        assert changed[2] == 0 and noop[2] == 0, f"rollout failed, see {self.log}"
        self.stop_nginx()
        return changed[:2], noop[:2]

    # -- the others: same config, one file ---------------------------------------------------

    def _configs(self, token: str) -> dict[str, str]:
        s = load(str(self.fleet.env_file))
        return {name: flatten(tree.files, token) for name, tree in render_hosts(s).items()}

    def _start(self, tool: str) -> None:
        """Untimed: the tool's nginx runs an older config on every host."""
        self.stop_nginx()
        configs = self._configs("start")
        for h in self.fleet.hosts:
            root = h.dir / tool
            (root / "nginx.conf").write_text(configs[h.name])
            subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-p", f"{root}/", "-c",
                            str(root / "nginx.conf")], check=True)

    def floor(self) -> tuple[float, float]:
        self._start("floor")
        token = self._next()
        configs = self._configs(token)
        job = {"key": str(self.fleet.key), "known_hosts": str(self.fleet.known_hosts),
               "nginx": shutil.which("nginx") or "/usr/sbin/nginx", "token": token,
               "health_port": self.fleet.ports["health"],
               "hosts": [{"address": h.address, "port": h.ssh_port, "root": str(h.dir / "floor"),
                          "bind": h.address, "config": configs[h.name]} for h in self.fleet.hosts]}
        path = self.dir / "floor.json"
        path.write_text(json.dumps(job))
        seconds, rss, rc = run([sys.executable, str(HERE / "floor.py"), str(path)], self.log)
        assert rc == 0, f"floor failed, see {self.log}"
        self.stop_nginx()
        return seconds, rss

    def ansible(self) -> tuple[float, float]:
        self._start("ansible")
        token = self._next()
        first = self.fleet.hosts[0]
        template = self._configs("{{ token }}")[first.name].replace(first.address, "{{ nginx_bind }}")
        adir = self.dir / "ansible"
        adir.mkdir(exist_ok=True)
        (adir / "nginx.conf.j2").write_text(template)
        shutil.copy(HERE / "ansible" / "playbook.yml", adir / "playbook.yml")
        user = getpass.getuser()
        (adir / "inventory.ini").write_text("[fleet]\n" + "".join(
            f"{h.name} ansible_host={h.address} ansible_port={h.ssh_port} ansible_user={user} "
            f"ansible_ssh_private_key_file={self.fleet.key} nginx_root={h.dir / 'ansible'} nginx_bind={h.address}\n"
            for h in self.fleet.hosts))
        (adir / "ansible.cfg").write_text(
            "[defaults]\ninventory = inventory.ini\n"
            f"forks = {self.k}\nhost_key_checking = True\ninterpreter_python = /usr/bin/python3\n"
            "timeout = 10\nretry_files_enabled = False\n\n[ssh_connection]\npipelining = True\n"
            f"ssh_args = -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile={self.fleet.known_hosts} "
            "-o StrictHostKeyChecking=yes\n"
            f"control_path_dir = {adir / 'cp'}\n")
        env = {**os.environ, "ANSIBLE_CONFIG": str(adir / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
        playbook = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or "ansible-playbook"
        seconds, rss, rc = run([playbook, str(adir / "playbook.yml"), "-e",
                                json.dumps({"token": token, "nginx_binary": shutil.which("nginx") or "/usr/sbin/nginx",
                                            "health_port": self.fleet.ports["health"]})], self.log, env)
        assert rc == 0, f"ansible failed, see {self.log}"
        self.stop_nginx()
        return seconds, rss

    def close(self) -> None:
        self.stop_nginx()
        self.fleet.stop()


def summary(samples: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    times = [s for s, _ in samples]
    return statistics.median(times), min(times), max(times), max(r for _, r in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-ansible", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    have_ansible = not args.no_ansible and shutil.which(
        "ansible-playbook", path=str(Path(sys.executable).parent)) is not None
    work = Path(tempfile.mkdtemp(prefix="wsgate-bench-"))
    work.chmod(0o711)  # nginx's workers must reach each root, as on a real host (mkdtemp makes it 0700)
    moto = MotoServer(work / "moto.log")
    app_port = free_port()
    app = start_app("127.0.0.1", app_port, work / "app.log")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    rows = []
    try:
        for i, k in enumerate(sizes):
            bench = Bench(k, work / f"k{k}", ("127.0.0.1", app_port), moto.url, net=100 + i)
            results: dict[str, list] = {"ours": [], "no-op": [], "floor": [], "ansible": []}
            try:
                for r in range(args.runs):
                    changed, noop = bench.ours()
                    results["ours"].append(changed)
                    results["no-op"].append(noop)
                    results["floor"].append(bench.floor())
                    if have_ansible:
                        results["ansible"].append(bench.ansible())
                    print(f"K={k} run {r + 1}/{args.runs}: ours {changed[0]:.2f}s, no-op {noop[0]:.2f}s, "
                          f"floor {results['floor'][-1][0]:.2f}s"
                          + (f", ansible {results['ansible'][-1][0]:.2f}s" if have_ansible else ""), flush=True)
            finally:
                bench.close()
            rows.append((k, {name: summary(v) for name, v in results.items() if v}))
    finally:
        stop(app)
        moto.stop()
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}; hosts local (their sshd and nginx share these cores)")
    print(f"{'K':>3} {'tool':<8} {'median s':>9} {'min-max s':>14} {'peak RSS MiB':>13}")
    for k, res in rows:
        for name, (med, lo, hi, rss) in res.items():
            print(f"{k:>3} {name:<8} {med:>9.2f} {f'{lo:.2f}-{hi:.2f}':>14} {rss:>13.1f}")
    print()
    print(f"{'K':>3} {'ours/floor':>11} {'ours/ansible':>13} {'ansible/ours':>13} {'no-op/ours':>11}")
    for k, res in rows:
        ours = res["ours"][0]
        fl = ours / res["floor"][0]
        an = f"{ours / res['ansible'][0]:.2f}" if "ansible" in res else "-"
        speed = f"{res['ansible'][0] / ours:.1f}x" if "ansible" in res else "-"
        print(f"{k:>3} {fl:>11.2f} {an:>13} {speed:>13} {res['no-op'][0] / ours:>11.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
