"""Backend hosts on one machine: per host an sshd on its own loopback address, with its own
host key; one client key and one known_hosts for all. nginx is what `fab rollout` starts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Subsystem sftp internal-sftp
MaxStartups 200:30:400
MaxSessions 100
LogLevel ERROR
"""


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path` (kept if it exists); returns the public key line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wsgate-lab", "-f", str(path)],
                       check=True)
    return Path(f"{path}.pub").read_text().strip()


def port_free(address: str, port: int) -> bool:
    """Nothing is bound to address:port now (a bind succeeds)."""
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def wait_port(address: str, port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address}:{port} after {timeout}s") from None
            time.sleep(0.05)


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout`."""
    terminate_all([pid], timeout)


def terminate_all(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM to each of `pids` at once, then SIGKILL to any still there after `timeout`."""
    left = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            left.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if alive(pid)]
        if left:
            time.sleep(0.05)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        alive(pid)


def alive(pid: int) -> bool:
    """Whether `pid` still runs (reaping it if it is our own child that exited)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: `make lab` started it from another process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: whoever adopted it may take a while to reap it
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class SshHost:
    name: str
    address: str
    ssh_port: int
    dir: Path

    def prepare(self, client_pub: str) -> str:
        """Host key, authorized key and sshd config; returns the known_hosts line."""
        self.dir.mkdir(parents=True, exist_ok=True)
        pub = keygen(self.dir / "ssh_host_ed25519_key")
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(port=self.ssh_port, address=self.address,
                                                                  dir=self.dir))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        return f"[{self.address}]:{self.ssh_port} {' '.join(pub.split()[:2])}"

    def start(self) -> int:
        """Start sshd in the background (it writes its pid file); returns its pid."""
        log = (self.dir / "sshd.log").open("ab")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        wait_port(self.address, self.ssh_port)
        return proc.pid

    def pid(self) -> int | None:
        try:
            return int((self.dir / "sshd.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the listener and every session it forked (a host that drops off the network)."""
        pid = self.pid()
        if pid is None:
            return
        subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        (self.dir / "sshd.pid").unlink(missing_ok=True)
