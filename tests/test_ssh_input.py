"""The SSH edge's bad input and its fleet-size costs, without a host: the known_hosts matcher
(core/knownhosts.py), keys built only for the hosts that connect, an ssh config or known_hosts that
cannot be used (named with file and line, before anything connects), the file-descriptor need of
a run, and the nginx root's trailing slash."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from core.knownhosts import KnownHosts, KnownHostsError, hash_name
from core.session import Remote
from remote.ssh import DESCRIPTOR_MARGIN, Ssh, SshError
from tests.conftest import PROJECT_DIR, settings_from


def public_line(kind: str = "ed25519") -> str:
    """`type base64` of a new key, as OpenSSH writes it."""
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(65537, 2048)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


KEY_A, KEY_B = public_line(), public_line()


def known(*lines: str) -> KnownHosts:
    return KnownHosts.parse("\n".join(lines) + "\n", "kh")


# --- the matcher -------------------------------------------------------------------------------

def test_a_hashed_entry_matches_its_name_and_port_only():
    index = known(f"{hash_name('[web-1.example]:2222', b'0123456789abcdefghij')} {KEY_A}",
                  f"{hash_name('web-2.example', os.urandom(20))} {KEY_B}")
    assert [e.number for e in index.entries("web-1.example", 2222)] == [1]
    assert [e.number for e in index.entries("WEB-1.example", 2222)] == [1]  # names are case-insensitive
    assert index.entries("web-1.example", 22) == []
    assert [e.number for e in index.entries("web-2.example", 22)] == [2]
    assert [e.number for e in index.entries("web-2.example", None)] == [2]  # no port: 22


@given(salt=st.binary(min_size=1, max_size=100), name=st.text(min_size=1, max_size=40).filter(str.isprintable))
def test_a_hashed_entry_matches_as_hmac_sha1_says_whatever_its_salt(salt, name):
    """The index's precomputed HMAC agrees with the standard one for any salt (ssh-keygen writes 20
    bytes; a salt longer than SHA-1's block is hashed first, as HMAC defines)."""
    name = name.replace(" ", "_").replace(",", "_").lower()
    index = known(f"{hash_name(name, salt)} {KEY_A}")
    assert [e.number for e in index.entries(name, None)] == [1]
    assert index.entries(name + "x", None) == []


def test_plain_entries_by_name_bracketed_port_and_comma_list():
    index = known(f"web-1,10.0.0.1 {KEY_A}", f"[10.0.0.2]:2200,[web-2]:2200 {KEY_B}", "# a comment", "")
    assert [e.key for e in index.keys("10.0.0.1")] == [KEY_A.split()[1]]
    assert [e.number for e in index.entries("web-1", 22)] == [1]
    assert [e.number for e in index.entries("web-2", 2200)] == [2]
    assert index.entries("10.0.0.2", 22) == [] and index.entries("10.0.0.1", 2200) == []


def test_wildcards_and_negation():
    index = known(f"*.prod.example,!db.prod.example {KEY_A}", f"10.1.?.7 {KEY_B}", f"[*.stage]:2222 {KEY_B}")
    assert [e.number for e in index.entries("web.prod.example")] == [1]
    assert index.entries("db.prod.example") == []
    assert [e.number for e in index.entries("10.1.3.7")] == [2]
    assert index.entries("10.1.33.7") == []
    assert [e.number for e in index.entries("a.stage", 2222)] == [3]


def test_no_match_is_no_key():
    index = known(f"web-1 {KEY_A}")
    assert index.keys("web-9") == [] and index.keys("web-1", 2222) == []


def test_a_revoked_key_is_never_offered_and_a_ca_only_host_is_refused_by_line():
    index = known(f"web-1 {KEY_A}", f"web-1 {KEY_B}", f"@revoked * {KEY_B}", f"@cert-authority *.ca {KEY_A}")
    assert [e.number for e in index.keys("web-1")] == [1]
    assert index.revoked("web-1", 22, *KEY_B.split()).number == 3  # type: ignore[union-attr]
    with pytest.raises(KnownHostsError, match="kh line 4: host.ca is known only through @cert-authority"):
        index.keys("host.ca")


@pytest.mark.parametrize("line, why", [
    (f"@trusted web-1 {KEY_A}", "line 2: unknown marker '@trusted'"),
    ("web-1 ssh-ed25519", "line 2: not `\\[marker\\] hosts key-type base64-key"),
    ("web-1 ssh-ed25519 not-base64!!", "line 2: the ssh-ed25519 key is not base64"),
    (f"|1|bad!salt|x {KEY_A}", "line 2: a hashed host name is not"),
], ids=["marker", "fields", "base64", "hashed"])  # the keys are made at import: not ids (one per xdist worker)
def test_a_malformed_line_is_named(line, why):
    with pytest.raises(KnownHostsError, match=f"known_hosts kh {why}"):
        known(f"web-1 {KEY_A}", line)


# --- keys built only for hosts that connect --------------------------------------------------

def test_only_the_lines_of_a_connecting_host_are_decoded(tmp_path):
    lines = [f"{hash_name(f'[10.9.{i // 250}.{i % 250}]:22{i % 10}', os.urandom(20))} {(KEY_A, KEY_B)[i % 2]}"
             if i % 2 else f"unrelated-{i}.example {(KEY_A, KEY_B)[i % 3 == 0]}" for i in range(2000)]
    lines += [f"[127.0.1.1]:12201 {KEY_A}", f"{hash_name('[127.0.1.2]:12202', os.urandom(20))} {KEY_B}"]
    (tmp_path / "kh").write_text("\n".join(lines) + "\n")
    ssh = Ssh(settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh")}))
    assert [k.get_base64() for k in ssh.host_keys("127.0.1.1", 12201)] == [KEY_A.split()[1]]
    assert [k.get_base64() for k in ssh.host_keys("127.0.1.2", 12202)] == [KEY_B.split()[1]]
    assert ssh.host_keys("127.0.1.3", 12203) == []
    ssh.host_keys("127.0.1.1", 12201)  # once per run
    assert ssh.decoded == 2


def test_connections_built_in_many_threads_each_read_their_own_settings(tmp_path):
    """Fabric re-merges a Connection's Config when it is built and reads it when it opens: the hosts'
    connections are built and opened in parallel, so none may see another's half-merged config (a
    shared one failed a 50-host rollout with "No attribute or config key found for 'authentication'")."""
    (tmp_path / "kh").write_text("")
    ssh = Ssh(settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh")}))
    errors: list[BaseException] = []

    def build(n: int) -> None:
        try:
            for i in range(300):
                conn = ssh._connection(f"127.0.{n}.{i % 250 + 1}", None, 22, None)
                for _ in range(3):  # as open() reads it, while other threads build theirs
                    assert conn.authentication.strategy_class is None and conn.port == 22
        except BaseException as exc:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(n,)) for n in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the race shows every time
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]


# --- bad input, named before anything connects -----------------------------------------------

def lab_with_config(tmp_path, text: str, **ssh):
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return settings_from("lab", ssh={"configFile": str(path), **ssh}), path


@pytest.mark.parametrize("text, line, what", [
    ("Host *\n  User deploy\nPort\n", 3, "cannot parse it"),
    ("Host 127.0.1.*\n  Port twenty-two\n", 2, "Port twenty-two .*is not a number"),
    ("Host 127.0.1.2\n  ProxyJump first.last@jump\n", 2, "ProxyJump first.last@jump .*not a valid user name"),
    ("Host 127.0.1.2\n  ProxyJump ssh://deploy@jump:22\n", 2, "ProxyJump ssh://deploy@jump:22 "),
    ("Host 127.0.1.2\n  ProxyCommand ssh -W %h:%p jump\n", 2, "ProxyCommand .*is refused.*Use ProxyJump"),
])
def test_an_ssh_config_the_kit_cannot_use_is_named_with_its_line(tmp_path, text, line, what):
    s, path = lab_with_config(tmp_path, text)
    with pytest.raises(SshError, match=f"ssh config {path}{f' line {line}' if line else ''}.*{what}") as caught:
        Ssh.for_run(s, s.hosts)
    assert "#bad-ssh-config" in str(caught.value) or "#proxycommand-refused" in str(caught.value)


def test_an_unparsable_line_is_found_by_number(tmp_path):
    s, path = lab_with_config(tmp_path, "Host *\n  User deploy\n\n  Port\n")
    with pytest.raises(SshError, match=f"ssh config {path} line 4: cannot parse it"):
        Ssh(s)


def test_the_kits_own_gateway_overrides_a_proxycommand(tmp_path):
    s, _ = lab_with_config(tmp_path, "Host *\n  ProxyCommand ssh -W %h:%p jump\n", gateway="127.0.1.1:12201",
                           identityFile=None)
    Ssh.for_run(s, s.hosts)  # not refused: the config's hop is not used


def test_a_known_hosts_that_is_not_utf8_or_is_a_directory_is_named(tmp_path):
    bad = tmp_path / "kh"
    bad.write_bytes(f"web-1 {KEY_A}\nweb-2 {KEY_B} caf\xe9\n".encode("latin-1"))
    s = settings_from("lab", ssh={"knownHosts": str(bad)})
    with pytest.raises(SshError, match=f"known_hosts {bad} line 2: not UTF-8 text"):
        Ssh.for_run(s, s.hosts)
    s = settings_from("lab", ssh={"knownHosts": str(tmp_path)})
    with pytest.raises(SshError, match=f"known_hosts {tmp_path}: is a directory"):
        Ssh.for_run(s, s.hosts)


# --- file descriptors --------------------------------------------------------------------------

DESCRIPTORS = """
import resource, sys
from remote.ssh import ensure_descriptors, SshError
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
try:
    print(ensure_descriptors(int(sys.argv[3])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
except SshError as exc:
    print(exc)
"""


def descriptors(soft: int, hard: int, need: int) -> str:
    return subprocess.run([sys.executable, "-c", DESCRIPTORS, str(soft), str(hard), str(need)], cwd=PROJECT_DIR,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_soft_descriptor_limit_is_raised_to_the_runs_need_where_the_hard_limit_allows():
    assert descriptors(256, 4096, 1128) == "1128 1128"
    assert descriptors(2048, 4096, 1128) == "2048 2048"  # enough already: left alone


def test_a_run_needing_more_descriptors_than_the_hard_limit_is_refused_naming_both():
    out = descriptors(256, 512, 1128)
    assert "needs 1128 file descriptors; the limit is 256 (hard limit 512)" in out
    assert "`ulimit -n 1128`" in out and "#too-many-open-files" in out


def test_preflight_counts_a_socket_per_direct_host_and_per_bastion_hop(monkeypatch):
    needs = []
    monkeypatch.setattr("remote.ssh.ensure_descriptors", needs.append)
    s = settings_from("lab", ssh={"identityFile": None})  # the lab's key need not exist here
    Ssh.for_run(s, s.hosts)
    hosts = [h.model_copy(update={"gateway": "127.0.1.1:12201,127.0.1.2:12202"}) for h in s.hosts]
    Ssh.for_run(s, hosts)
    assert needs == [3 + DESCRIPTOR_MARGIN, 2 + DESCRIPTOR_MARGIN]


# --- the nginx root ----------------------------------------------------------------------------

def test_a_trailing_slash_in_the_nginx_root_is_dropped_so_the_drop_in_is_recognised(tmp_path):
    root = tmp_path / "wsgate"
    (root / "logs").mkdir(parents=True)
    s = settings_from("lab", nginx={"root": f"{root}/", "pidFile": "logs/nginx.pid", "binary": sys.executable},
                      hosts=[{"name": "a", "address": "127.0.1.1"},
                             {"name": "b", "address": "127.0.1.2", "root": f"{root}/"}])
    assert s.nginx.root == str(root) and s.hosts[1].root == str(root)
    # an nginx started as the docs' systemd drop-in starts it: `-c ROOT/current/nginx.conf`
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "-p", f"{root}/", "-c", f"{root}/current/nginx.conf"])
    try:
        (root / "logs" / "nginx.pid").write_text(f"{stand_in.pid}\n")
        for host in s.hosts:
            # the command as the host's login shell gets it
            out = subprocess.run(Remote.of(s, host).inspect(), shell=True, capture_output=True, text=True).stdout
            assert "nginx\tours\n" in out, out
    finally:
        stand_in.kill()
        stand_in.wait()


def test_connections_built_from_many_threads_at_once_all_get_the_shared_config():
    """Fabric's Connection() re-merges the Config it is given; shared across a fleet's threads it
    read as empty in another (AttributeError 'forward_agent' at K = 50 in the benchmark)."""
    ssh = Ssh(settings_from("lab"))
    errors: list[str] = []

    def build(i: int) -> None:
        try:
            for _ in range(10):
                ssh._connection(f"127.0.1.{i % 250 + 1}", "deploy", 22, None)
        except Exception as exc:  # what the race raised, named in the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of 64 threads failed, first: {errors[0]}"


# --- identity files and key types, named before anything connects ------------------------------

def test_an_identity_file_paramiko_cannot_use_is_named_before_any_connection(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    (tmp_path / "id").write_bytes(private)
    (tmp_path / "id.pub").write_text(public_line() + "\n")
    (tmp_path / "junk").write_text("not a key\n")
    (tmp_path / "config").write_text(f"Host 127.0.1.*\n  User deploy\n  IdentityFile {tmp_path}/gone\n")
    cases = [
        ({"identityFile": str(tmp_path)}, f"identity file {tmp_path} (ssh.identityFile): is a directory"),
        ({"identityFile": str(tmp_path / "gone")}, f"identity file {tmp_path}/gone (ssh.identityFile) does not exist"),
        ({"identityFile": str(tmp_path / "junk")}, "(ssh.identityFile): not a key (no -----BEGIN ... PRIVATE KEY-----"
                                                   " line, nor a public key)"),
        ({"identityFile": None, "configFile": str(tmp_path / "config")},
         f"identity file {tmp_path}/gone (IdentityFile (for 127.0.1.1) of ssh config {tmp_path}/config line 3) "
         "does not exist"),
    ]
    for ssh, said in cases:
        s = settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh"), **ssh})
        with pytest.raises(SshError) as caught:
            Ssh.for_run(s, s.hosts)
        assert said in str(caught.value), str(caught.value)
    s = settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh"), "identityFile": None},
                      hosts=[{"name": "a", "address": "127.0.1.1", "identityFile": str(tmp_path / "junk")}])
    with pytest.raises(SshError, match=r"\(hosts\[a\]\.identityFile\): not a key"):
        Ssh.for_run(s, s.hosts)
    # a public key names which of the agent's keys to use (OpenSSH's IdentityFile does the same): not refused
    s = settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh"), "identityFile": str(tmp_path / "id.pub")})
    Ssh.for_run(s, s.hosts)
    s = settings_from("lab", ssh={"knownHosts": str(tmp_path / "kh"), "identityFile": str(tmp_path / "id"),
                                  "configFile": str(tmp_path / "config")})
    Ssh.for_run(s, s.hosts)  # the kit's own key: the config's IdentityFile is not what paramiko needs


def test_a_known_hosts_line_of_a_key_type_paramiko_cannot_build_is_passed_over_or_named(tmp_path):
    dss = "ssh-dss AAAAB3NzaC1kc3MAAAA="  # DSA: paramiko no longer builds it
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.1.1]:12201 {dss}\n[127.0.1.1]:12201 {KEY_A}\n[127.0.1.2]:12202 {dss}\n")
    ssh = Ssh(settings_from("lab", ssh={"knownHosts": str(kh)}))
    assert [k.get_base64() for k in ssh.host_keys("127.0.1.1", 12201)] == [KEY_A.split()[1]]
    with pytest.raises(SshError, match=f"known_hosts {kh} line 3: key type ssh-dss is not one the kit can check"):
        ssh.host_keys("127.0.1.2", 12202)
