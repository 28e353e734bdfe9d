"""Rollout time and memory as the fleet grows: ours, a bare paramiko floor, and Ansible.

For each fleet size K, real local hosts (sshd + nginx each, as in the test suite) and, in
the same run and alternating, with a changed config every time:
  - `fab rollout` (upload, nginx -t, swap, reload, probe on every host) and its no-op rerun;
  - the bare floor (benchmarks/floor.py: paramiko alone, the same per-host steps);
  - Ansible (benchmarks/ansible/playbook.yml: template + validate + reload handler + probe,
    forks = K, pipelining on, the same hosts and keys).
Each tool runs its own nginx under its own root on each host, started (untimed) before its
timed run and stopped after, since they share the listen addresses. Per run: wall, the process's
CPU (user + system from its rusage) per host, peak RSS, and the peak threads and open descriptors.
Ansible runs up to --ansible-up-to hosts (it takes minutes beyond). Beside the sizes, a known_hosts
variant: ours at K = 20 with the fleet's known_hosts against a 5,000-line one that holds it.
Writes the figures as JSON and a plot (wall and CPU per host against K) into --out.

Run: make bench   (or: .venv/bin/python -m benchmarks.rollout --sizes 1,10 --runs 3 --no-ansible)
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import knownhosts, measure, report
from benchmarks.measure import Sample
from core.render import render_hosts
from core.settings import load
from tests.support.fleet import Fleet
from tests.support.moto import MotoServer
from tests.support.nginx import Nginx
from tests.support.procs import free_port, start_app, stop

PROJECT_DIR = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
KNOWN_HOSTS_LINES = 5000
START_WORKERS = 16  # fleet start-up and nginx starts/stops in parallel: hundreds of hosts one by one take minutes


def each(action: Callable, items: Iterable) -> None:
    """`action` on every item, START_WORKERS at a time (untimed set-up), re-raising the first failure."""
    with ThreadPoolExecutor(START_WORKERS) as pool:
        for _ in pool.map(action, items):
            pass


def run(argv: list[str], log: Path, env: dict | None = None) -> tuple[Sample, int]:
    return measure.run(argv, log, PROJECT_DIR, env)


def flatten(files: dict[str, str], token: str) -> str:
    """Our rendered tree as one file (includes inlined), naming `token` as its digest."""
    text = files["nginx.conf"]
    http = "\n".join(files[n] for n in sorted(files) if n.startswith("http.d/"))
    text = text.replace("    include digest.conf;", f'    map $nginx_version $config_digest {{ default "{token}"; }}')
    return text.replace("    include http.d/*.conf;", http)


def bare_home(host_dir: Path) -> None:
    """Sessions on this host get an empty HOME, as a server's would be: the controller machine's own
    ~/.bashrc (here `pyenv init`, which rehashes under one lock) would otherwise run in every remote
    shell of every host, serialised across hosts; at K = 200 it timed out the lock step."""
    home = host_dir / "home"
    home.mkdir(exist_ok=True)
    with (host_dir / "sshd_config").open("a") as f:
        f.write(f"SetEnv HOME={home}\n")


class Bench:
    def __init__(self, k: int, workdir: Path, app: tuple[str, int], aws_url: str, net: int, parallel: int = 0):
        self.k, self.dir = k, workdir
        self.parallel = parallel or k  # ours' --parallel (the floor and Ansible always take every host at once)
        self.fleet = Fleet(workdir / "fleet", k, net, app, aws_url, env=f"bench{k}")
        for h in self.fleet.hosts:
            bare_home(h.dir)
        try:
            each(lambda h: h.start(), self.fleet.hosts)
        except BaseException:
            each(lambda h: h.stop(), self.fleet.hosts)  # no sshd left behind on a shared machine
            raise
        self.fleet.set("wsgate:ssh", {"commandTimeout": 120, "connectTimeout": 30})
        self.log = workdir / "bench.log"
        self.gen = 0
        self.rolled = False  # whether ours has rolled out once (then its nginx restarts from `current`)
        for h in self.fleet.hosts:
            for tool in ("floor", "ansible"):
                for sub in ("logs", "tmp"):
                    (h.dir / tool / sub).mkdir(parents=True, exist_ok=True)

    def stop_nginx(self) -> None:
        each(lambda root: Nginx(root).stop(),
             [root for h in self.fleet.hosts for root in (h.root, h.dir / "floor", h.dir / "ansible")])

    def _next(self) -> str:
        self.gen += 1
        self.fleet.set("wsgate:nginx", {"workerShutdownTimeout": 100 + self.gen})
        return f"gen-{self.gen}"

    def _fab(self) -> Sample:
        sample, rc = run([sys.executable, "-m", "fabric", "rollout", "--env", str(self.fleet.env_file),
                          "--parallel", str(min(self.k, self.parallel))], self.log)
        assert rc == 0, f"rollout failed, see {self.log}"
        return sample

    # -- ours ------------------------------------------------------------------------------

    def start_ours(self) -> None:
        """Untimed: ours' nginx runs an older config on every host (the first time through a rollout;
        then started from `current` the way the kit starts it, which is much quicker at K = 500)."""
        self.stop_nginx()
        if self.rolled:
            each(lambda h: h.nginx.start(), self.fleet.hosts)
        else:
            self._next()
            self._fab()
            self.rolled = True

    def ours(self) -> tuple[Sample, Sample]:
        """A changing rollout (nginx already running an older config), then the no-op rerun."""
        self.start_ours()
        self._next()
        changed = self._fab()
        noop = self._fab()
        self.stop_nginx()
        return changed, noop

    def known_hosts(self, runs: int) -> dict:
        """Ours with the fleet's known_hosts against a 5,000-line one holding it, changing rollouts in turn."""
        own = self.fleet.known_hosts
        big = self.dir / "known_hosts.big"
        knownhosts.write(big, own, KNOWN_HOSTS_LINES, self.dir / "filler-keys")
        self.start_ours()
        small_runs: list[Sample] = []
        big_runs: list[Sample] = []
        for r in range(runs):
            for path, into in ((own, small_runs), (big, big_runs)):
                self.fleet.set("wsgate:ssh", {"knownHosts": str(path)})
                self._next()
                into.append(self._fab())
            print(f"known_hosts K={self.k} run {r + 1}/{runs}: fleet's {small_runs[-1].wall:.2f}s, "
                  f"{KNOWN_HOSTS_LINES} lines {big_runs[-1].wall:.2f}s", flush=True)
        self.fleet.set("wsgate:ssh", {"knownHosts": str(own)})
        self.stop_nginx()
        lines = len(own.read_text().splitlines())
        return report.known_hosts_summary(self.k, small_runs, big_runs, lines, len(big.read_text().splitlines()))

    # -- the others: same config, one file ---------------------------------------------------

    def _configs(self, token: str) -> dict[str, str]:
        s = load(str(self.fleet.env_file))
        return {name: flatten(tree.files, token) for name, tree in render_hosts(s).items()}

    def _start(self, tool: str) -> None:
        """Untimed: the tool's nginx runs an older config on every host."""
        self.stop_nginx()
        configs = self._configs("start")
        def start(h) -> None:
            root = h.dir / tool
            (root / "nginx.conf").write_text(configs[h.name])
            subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-p", f"{root}/", "-c",
                            str(root / "nginx.conf")], check=True)

        each(start, self.fleet.hosts)

    def floor(self) -> Sample:
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
        sample, rc = run([sys.executable, str(HERE / "floor.py"), str(path)], self.log)
        assert rc == 0, f"floor failed, see {self.log}"
        self.stop_nginx()
        return sample

    def ansible(self) -> Sample:
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
        sample, rc = run([playbook, str(adir / "playbook.yml"), "-e",
                          json.dumps({"token": token, "nginx_binary": shutil.which("nginx") or "/usr/sbin/nginx",
                                      "health_port": self.fleet.ports["health"]})], self.log, env)
        assert rc == 0, f"ansible failed, see {self.log}"
        self.stop_nginx()
        return sample

    def close(self) -> None:
        self.stop_nginx()
        each(lambda h: h.stop(), self.fleet.hosts)


def measure_size(bench: Bench, runs: int, with_ansible: bool) -> dict[str, dict]:
    """Every tool `runs` times in turn on one fleet of K hosts; the fleet is stopped after."""
    k = bench.k
    results: dict[str, list[Sample]] = {"ours": [], "no-op": [], "floor": [], "ansible": []}
    try:
        for r in range(runs):
            changed, noop = bench.ours()
            results["ours"].append(changed)
            results["no-op"].append(noop)
            results["floor"].append(bench.floor())
            if with_ansible:
                results["ansible"].append(bench.ansible())
            print(f"K={k} run {r + 1}/{runs}: ours {changed.wall:.2f}s, no-op {noop.wall:.2f}s, "
                  f"floor {results['floor'][-1].wall:.2f}s"
                  + (f", ansible {results['ansible'][-1].wall:.2f}s" if with_ansible else ""), flush=True)
    finally:
        bench.close()
    return {name: report.summary(v, k) for name, v in results.items() if v}


def raise_open_files() -> None:
    """K = 500 holds a thousand sockets and pipes in the controller alone: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants hosts counts like 1,10,50, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants counts of at least 1, not {text!r}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=sizes_arg, default=[1, 10, 50, 200, 500],
                        help="fleet sizes K (1,10,50,200,500)")
    parser.add_argument("--runs", type=int, default=2, help="runs of every tool at every K (2)")
    parser.add_argument("--known-hosts-variant", type=int, default=20, metavar="K",
                        help=f"K for ours with the fleet's known_hosts vs a {KNOWN_HOSTS_LINES}-line one (20; 0: skip)")
    parser.add_argument("--no-ansible", action="store_true", help="no Ansible at any K")
    parser.add_argument("--ansible-up-to", type=int, default=50, metavar="K",
                        help="Ansible only up to this K (50: it takes minutes at 50 and far more beyond)")
    parser.add_argument("--parallel", type=int, default=0, metavar="N",
                        help="ours' --parallel at most N (default: K, every host at once, as the floor)")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs",
                        help="where bench.json and bench.png go (docs/)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs wants at least 1")
    have_ansible = not args.no_ansible and shutil.which(
        "ansible-playbook", path=str(Path(sys.executable).parent)) is not None
    raise_open_files()
    work = Path(tempfile.mkdtemp(prefix="wsgate-bench-"))
    work.chmod(0o711)  # nginx's workers must reach each root, as on a real host (mkdtemp makes it 0700)
    moto = MotoServer(work / "moto.log")
    app_port = free_port()
    app = start_app("127.0.0.1", app_port, work / "app.log")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    started = datetime.datetime.now(datetime.UTC)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"{platform.platform()}; hosts local (their sshd and nginx share these cores)")
    meta: dict = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine, "runs": args.runs,
                  "parallel": args.parallel or "K", "ansible_skipped": [], "failed": {}}
    sizes: dict[int, dict[str, dict]] = {}
    variant = None
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """After every stage, so a size that fails or runs out of time leaves the others' figures."""
        report.write_json(args.out / "bench.json", meta, sizes, variant)
        subprocess.run([sys.executable, "-m", "benchmarks.report", str(args.out / "bench.json"),
                        str(args.out / "bench.png")], cwd=PROJECT_DIR, check=True)

    try:
        if args.known_hosts_variant:  # first: it is short, and its figure must not wait on K = 500
            k = args.known_hosts_variant
            bench = Bench(k, work / f"kh{k}", ("127.0.0.1", app_port), moto.url, net=100)
            try:
                variant = bench.known_hosts(args.runs)
            except Exception as exc:  # the sizes still run
                meta["failed"][f"known_hosts K={k}"] = f"{type(exc).__name__}: {exc}"
                print(f"known_hosts K={k} FAILED: {exc}", flush=True)
            finally:
                bench.close()
            save()
        for i, k in enumerate(args.sizes):
            with_ansible = have_ansible and k <= args.ansible_up_to
            if have_ansible and not with_ansible:
                meta["ansible_skipped"].append(k)
                print(f"K={k}: Ansible skipped (above --ansible-up-to {args.ansible_up_to})", flush=True)
            try:
                # Each fleet its own network, two /24s apart (K > 254 spills onto the next one).
                sizes[k] = measure_size(Bench(k, work / f"k{k}", ("127.0.0.1", app_port), moto.url,
                                              net=102 + 2 * i, parallel=args.parallel), args.runs, with_ansible)
            except Exception as exc:  # one size failing must not lose the others: say so, go on
                meta["failed"][str(k)] = f"{type(exc).__name__}: {exc}"
                print(f"K={k} FAILED: {exc}", flush=True)
            save()
    finally:
        stop(app)
        moto.stop()
    print()
    print(report.table(sizes, variant, meta["ansible_skipped"], f"{meta['date']}; machine: {machine}"))
    for k, why in meta["failed"].items():
        print(f"K={k} not measured: {why}")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
