"""The bare floor: the same per-host steps on paramiko alone, all hosts in parallel.

One connection per host: upload the config, `nginx -t`, move it in, reload, one probe of the
new config. No framework around it. Usage: python benchmarks/floor.py JOB.json
JOB: {"key": path, "known_hosts": path, "nginx": path, "token": str, "health_port": int,
      "hosts": [{"address", "port", "root", "bind", "config"}]}
"""

import json
import sys
import threading
import time

import paramiko


def roll(job, host, errors):
    client = paramiko.SSHClient()
    client.load_host_keys(job["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host["address"], port=host["port"], key_filename=job["key"], timeout=30,
                   banner_timeout=60, auth_timeout=60, look_for_keys=False, allow_agent=False)
    root, nginx = host["root"], job["nginx"]
    with client.open_sftp().open(f"{root}/nginx.conf.new", "w") as f:
        f.write(host["config"])
    cmd = (f"{nginx} -t -q -p {root}/ -c {root}/nginx.conf.new && mv {root}/nginx.conf.new {root}/nginx.conf && "
           f"{nginx} -p {root}/ -c {root}/nginx.conf -s reload")
    _, out, err = client.exec_command(cmd, timeout=60)
    if out.channel.recv_exit_status() != 0:
        errors.append(f"{host['address']}: {err.read().decode()}")
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # probe: the health port names the new config
        chan = client.get_transport().open_channel("direct-tcpip", (host["bind"], job["health_port"]), ("127.0.0.1", 0))
        chan.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while data := chan.recv(4096):
            reply += data
        chan.close()
        if job["token"].encode() in reply:
            client.close()
            return
        time.sleep(0.05)
    errors.append(f"{host['address']}: probe never saw {job['token']}")


def main(path):
    job = json.load(open(path))
    errors = []
    threads = [threading.Thread(target=roll, args=(job, h, errors)) for h in job["hosts"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
