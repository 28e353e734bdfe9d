#!/usr/bin/env bash
# Installs the system programs the tests and the lab run for real: nginx, sshd, haproxy
# (and sudo, for the test of `ssh.sudo`; iproute2's ss, which `fab move` runs on each host).
# On Debian/Ubuntu as root it uses apt-get; elsewhere it says what to install.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v sudo >/dev/null 2>&1 || missing+=(sudo)
command -v ss >/dev/null 2>&1 || [ -x /usr/sbin/ss ] || [ -x /usr/bin/ss ] || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged services; the kit runs its own, on its own ports.
  for svc in nginx ssh haproxy; do
    service "$svc" stop >/dev/null 2>&1 || true
  done
  exit 0
fi
echo "missing system packages: ${missing[*]}" >&2
echo "install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again" >&2
exit 1
