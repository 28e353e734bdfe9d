"""Bad input is refused with a message that names the file, the key or the line, before anything is
read from AWS or connected to, and never with a traceback: environment files that cannot be read,
YAML that says a key twice, keys the kit does not read, values of the wrong kind, and the lab's
command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from core.errors import SettingsError
from core.settings import from_config, load
from lab.__main__ import main as lab_main
from tests.conftest import PROJECT_DIR, settings_from, stack_config

LAB = (PROJECT_DIR / "Pulumi.lab.yaml").read_text()


def refused(path) -> str:
    with pytest.raises(SettingsError) as info:
        load(str(path))
    return str(info.value)


def test_an_environment_file_that_cannot_be_read_is_named(tmp_path):
    (tmp_path / "Pulumi.dir.yaml").mkdir()
    assert refused(tmp_path / "Pulumi.dir.yaml") == \
        f"Pulumi.dir.yaml: file = '{tmp_path}/Pulumi.dir.yaml': is a directory, not an environment file"
    latin = tmp_path / "Pulumi.latin.yaml"
    latin.write_bytes(LAB.replace("ws.lab.test", "caf\xe9.test", 1).encode("latin-1"))
    line = LAB[:LAB.index("ws.lab.test")].count("\n") + 1
    assert refused(latin) == f"Pulumi.latin.yaml: file = '{latin}': line {line}: not UTF-8 text (byte 0xe9)"
    assert refused(latin / "Pulumi.x.yaml").endswith("cannot read it: Not a directory")
    assert refused(tmp_path / ("Pulumi." + "a" * 300 + ".yaml")).endswith("cannot read it: File name too long")
    (tmp_path / "lab.yaml").write_text(LAB)
    assert "lab.yaml: file = " in refused(tmp_path / "lab.yaml")
    assert "not a Pulumi.<env>.yaml file" in refused(tmp_path / "lab.yaml")


def test_a_neighbour_that_cannot_be_read_does_not_stop_this_environment(tmp_path):
    (tmp_path / "Pulumi.lab.yaml").write_text(LAB)
    (tmp_path / "Pulumi.other.yaml").write_bytes(b"config:\n  wsgate:serverName: \xff\n")
    (tmp_path / "Pulumi.dup.yaml").write_text("config:\n  a: 1\n  a: 2\n")
    (tmp_path / "Pulumi.gone.yaml").mkdir()
    assert load(str(tmp_path / "Pulumi.lab.yaml")).env == "lab"


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text(LAB + "  wsgate:serverName: other.test\n")
    first = LAB[:LAB.index("wsgate:serverName")].count("\n") + 1
    assert refused(path) == (f"Pulumi.x.yaml: file = '{path}': line {LAB.count(chr(10)) + 1}: wsgate:serverName "
                             f"is given twice (first on line {first}): YAML would keep only the last; keep one")
    path.write_text(LAB.replace("    http: 18080\n", "    http: 18080\n    http: 18090\n"))
    assert "http is given twice" in refused(path)


@pytest.mark.parametrize("key, value, line", [
    ("wsgate:env", "staging", "wsgate:env = 'staging': unknown key"),  # the file's name names it
    ("wsgate:aws", {"region": "us-east-1"}, "wsgate:aws = {'region': 'us-east-1'}: unknown key"),
    ("serverName", "x.test", "serverName = 'x.test': not a namespaced key"),
    (5, "x", "5 = 'x': not a namespaced key"),
    ("wsgate:", 1, "wsgate: = 1: not a namespaced key"),
    ("aws:endpoints", ["http://127.0.0.1:1"], "aws:endpoints = ['http://127.0.0.1:1']: a list of maps"),
])
def test_keys_the_kit_does_not_read_are_refused(key, value, line):
    with pytest.raises(SettingsError) as info:
        from_config("lab", {**stack_config("lab"), key: value}, "Pulumi.lab.yaml")
    assert f"Pulumi.lab.yaml: {line}" in str(info.value), str(info.value)


def test_a_misspelt_namespace_is_named_beside_the_key_it_misses():
    config = yaml.safe_load(LAB.replace("wsgate:serverName:", "wsgte:serverName:"))["config"]
    with pytest.raises(SettingsError, match=r"wsgate:serverName: required \(wsgte:serverName is not read"):
        from_config("lab", config, "Pulumi.lab.yaml")


@pytest.mark.parametrize("changes, line", [
    ({"ports": {"http": True}}, "wsgate:ports.http = True: true is a boolean: give a number"),
    ({"ssh": {"connectTimeout": False}}, "wsgate:ssh.connectTimeout = False: false is a boolean"),
    ({"nginx": {"workerProcesses": True}}, "wsgate:nginx.workerProcesses = True: not auto or a number"),
    ({"nginx": {"workerProcesses": "four"}},
     "wsgate:nginx.workerProcesses = 'four': not auto or a number of processes from 1 to 1024"),
])
def test_a_value_of_the_wrong_kind_is_refused_with_its_key(changes, line):
    with pytest.raises(SettingsError) as info:
        settings_from("lab", **changes)
    assert str(info.value).startswith(f"Pulumi.lab.yaml: {line}"), str(info.value)


def test_numbers_as_pulumi_config_set_writes_them_still_load():
    s = settings_from("lab", nginx={"workerProcesses": "2"}, ports={"http": "18090"}, proxy_protocol="true")
    assert (s.nginx.worker_processes, s.ports.http, s.proxy_protocol) == (2, 18090, True)


def test_a_huge_value_is_shown_cut(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    levels = ["a: &a [" + ",".join(["x"] * 9) + "]"]
    for name, below in zip("bcd", "abc", strict=False):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{below}"] * 9) + "]")
    path.write_text("\n".join(levels) + "\nconfig: {wsgate:serverName: [*d, *d], wsgate:bogus: " + "y" * 5000 + "}\n")
    text = refused(path)
    assert "wsgate:serverName = [[[" in text and "wsgate:bogus = 'yyy" in text and len(text) < 3000, len(text)


def test_fab_names_an_unreadable_environment_file_without_a_traceback(tmp_path):
    (tmp_path / "Pulumi.dir.yaml").mkdir()
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_bytes(b"config:\n  wsgate:serverName: \xff\n")
    for path, said in [(tmp_path / "Pulumi.dir.yaml", "is a directory"), (bad, "line 2: not UTF-8 text")]:
        result = subprocess.run([sys.executable, "-m", "fabric", "render", "--env", str(path)], cwd=PROJECT_DIR,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"error: {path.name}: file = '{path}': {said}" in result.stderr, result.stderr


@pytest.mark.parametrize("argv, said", [
    (["prove", "--listen", '{"a": 1}'], "argument --listen: '{\"a\": 1}' is not a JSON map of listener port"),
    (["prove", "--listen", "[1]"], "argument --listen: '[1]' is not a JSON map"),
    (["follow", "--env", "lab"], "follow needs --dir"),
    (["dns", "--env", "lab"], "dns needs --dir"),
    (["moto"], "moto needs --port"),
    (["moto", "--port", "abc"], "argument --port: 'abc' is not a port (1-65535)"),  # refused before moto starts
])
def test_the_labs_command_line_is_refused_before_anything_starts(argv, said, capsys):
    with pytest.raises(SystemExit) as ended:
        lab_main(argv)
    assert ended.value.code == 2 and said in capsys.readouterr().err


def test_the_labs_follower_names_an_environment_file_that_is_not_there(tmp_path, capsys):
    missing = tmp_path / "Pulumi.gone.yaml"
    assert lab_main(["follow", "--env", str(missing), "--dir", str(tmp_path)]) == 1
    assert f"lab: error: Pulumi.gone.yaml: file = '{missing}': no such environment file" in capsys.readouterr().err
