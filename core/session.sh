# shellcheck shell=sh
# shellcheck disable=SC2153,SC2154  # R, N, P and the rest are assigned by the head (below), not here
# The host side of wsgate, in POSIX sh (plus util-linux's `flock` and GNU coreutils: `mv -T`, `base64`).
#
# Not run as a file: core/session.py sends it as one `sh -c` command (without its comment and
# blank lines, so a heredoc here holds neither), after a head that sets `set -e` and the values
# below (each quoted), and before one entry point: `inspect` or `session`.
#
#   R      the root (nginx.root, or the host's root)      N     the nginx binary
#   P      nginx's pid file
# and for `session` only:
#   OWNER  this run's id (the owner file names it)        STAGE the stage's name under releases/
#   TARGET the digest `live` makes current                MODE  x (exclusive) or s (shared)
#   WAIT   seconds to wait for the lock (0: never)        T     ssh.commandTimeout, per nginx call
#   IDLE   ssh.idleTimeout                                KEEP  how many of the newest releases stay
#   LOCKED_EXIT  the exit code when another run holds the lock
#   LOCK_FAILED_EXIT  the exit code when `flock` itself fails (missing, or an error other than a held lock)
#   MARK_LOCKED, MARK_STAGED, MARK_SWAPPED, MARK_DONE  the lines the controller waits for
#
# Every value from settings arrives quoted in the head; every request is a fixed word.

# What the pid file names: NGX = no | ours (started from ROOT/current/nginx.conf) | foreign
# (anything else: the packaged nginx, another prefix); NPID = the pid file's live process,
# NCMD = its command line. The kit signals only `ours`. Builtins where they do: a process
# costs milliseconds on a busy host.
nginx_state() {
  NGX=no; NPID=""; NCMD=""
  { read -r NPID < "$P"; } 2>/dev/null || { NPID=""; return 0; }
  if [ -z "$NPID" ] || ! { kill -0 "$NPID" 2>/dev/null || [ -d "/proc/$NPID" ]; }; then NPID=""; return 0; fi
  NCMD=$({ tr '\0\n' '  ' < "/proc/$NPID/cmdline" || ps -o args= -p "$NPID"; } 2>/dev/null)
  case " $NCMD " in *" -c $R/current/nginx.conf "*) NGX=ours ;; *) NGX=foreign ;; esac
}

state_report() {
  nginx_state
  printf 'nginx\t%s\npid\t%s\ncmdline\t%s\n' "$NGX" "$NPID" "$NCMD"
}

# Both entry points start here: the binary exists. Only a session creates the layout's
# directories: `inspect` (a doctor) changes nothing.
prelude() {
  [ -x "$N" ] || { echo "nginx binary $N not found" >&2; exit 127; }
}

# Any command that touches the tree: without fd 9 (a child left hanging must not hold the lock)
# and bounded by T (a hung filesystem must not hold the lock past the idle limit). It runs as its
# own process, as any command does, named in the idle clock's file: the watchdog ends it after T
# seconds (no `timeout` process beside each one). Its stdin stays the caller's (fd 3 carries it:
# an asynchronous command's would be /dev/null).
bounded() {
  exec 3<&0
  "$@" 9>&- 0<&3 3<&- &
  B=$!
  echo "b $K $B" > "$F"
  wait "$B"; brc=$?
  echo "b $K" > "$F"
  return "$brc"
}

# try_lock FLOCK-ARGS...: flock on fd 9. Held by another run (flock's own exit 1: would block, or
# the wait ran out): 1. flock missing or failing otherwise: LOCK_FAILED_EXIT, with its exit code
# and words in LOCKERR.
try_lock() {
  LOCKERR=$(flock "$@" 9 2>&1) && return 0
  lrc=$?
  [ "$lrc" -eq 1 ] && return 1
  LOCKERR="flock failed on $R/.rollout.lock (exit $lrc: $(printf '%s' "${LOCKERR:-no output}" | tr '\n' ' '))"
  return "$LOCK_FAILED_EXIT"
}

# `fab status`: the live state, one `key<TAB>value` a line, without taking the lock and without
# creating anything (a missing root is reported as `root<TAB>missing`). `locked` names the run
# that holds it (a shared try never blocks a rollout for more than an instant).
inspect() {
  prelude
  if [ -d "$R" ]; then printf 'root\tpresent\n'; else printf 'root\tmissing\n'; fi
  printf 'current\t%s\nprevious\t%s\n' \
    "$(readlink "$R/current" 2>/dev/null || true)" "$(readlink "$R/previous" 2>/dev/null || true)"
  state_report
  if [ -e "$R/.rollout.lock" ]; then
    exec 9<"$R/.rollout.lock"
    if try_lock -n -s; then printf 'locked\t\n'
    elif [ "$lrc" -eq 1 ]; then printf 'locked\t%s\n' "$(cat "$R/.rollout.owner" 2>/dev/null || echo '?')"
    else echo "$LOCKERR (docs/troubleshooting.md#flock-failed)" >&2; exit "$LOCK_FAILED_EXIT"; fi
  fi
}

# The per-host session: take the host's rollout lock, report the live state, then serve one
# request a line. The lock (an flock on fd 9) lasts exactly as long as the session, and the
# session ends on its own when its stdin closes or when no request (or heartbeat `ping`) came
# for IDLE seconds (a watchdog ends it; a payload that stops halfway counts as waiting): a
# controller that dies or loses the network leaves the lock behind for at most IDLE seconds
# plus a third of them, plus the request then running, bounded by T. MODE `x` (rollout) cleans
# stale stages and names itself in the owner file; `s` (check) writes nothing but its own stage.
session() {
  prelude
  [ -d "$R/releases" ] && [ -d "$R/logs" ] && [ -d "$R/tmp" ] || mkdir -p "$R/releases" "$R/logs" "$R/tmp"
  exec 9>>"$R/.rollout.lock"
  lrc=0
  if [ "$WAIT" -gt 0 ]; then try_lock "-$MODE" -w "$WAIT"; else try_lock "-$MODE" -n; fi || lrc=$?
  if [ "$lrc" -eq 1 ]; then printf 'locked\t%s\n' "$(cat "$R/.rollout.owner" 2>/dev/null)"; exit "$LOCKED_EXIT"; fi
  if [ "$lrc" -ne 0 ]; then echo "$LOCKERR" >&2; exit "$LOCK_FAILED_EXIT"; fi
  K=0
  watchdog
  STALE=0
  if [ "$MODE" = x ]; then
    printf '%s\n' "$OWNER" > "$R/.rollout.owner"
    for d in "$R"/releases/.stage-*; do if [ -e "$d" ]; then bounded rm -rf "$d"; STALE=$((STALE + 1)); fi; done
    for f in "$R"/.session.*; do  # left by sessions that were killed (none runs beside an exclusive lock)
      [ ! -e "$f" ] || bounded rm -f "$f"
    done
  fi
  BEFORE=$(readlink "$R/current" 2>/dev/null || true)
  PREVIOUS=$(readlink "$R/previous" 2>/dev/null || true)
  CUR=$BEFORE; PRE=$PREVIOUS  # what the links name now: only this session changes them while it holds the lock
  printf 'current\t%s\nprevious\t%s\nstale\t%s\n' "$BEFORE" "$PREVIOUS" "$STALE"
  state_report
  M=""
  if [ -r "$R/current/release.json" ]; then
    while IFS= read -r l || [ -n "$l" ]; do M="$M$l"; done < "$R/current/release.json"
  fi
  printf 'manifest\t%s\n' "$M"
  M=""  # and the previous release's: what nginx runs when a run was cut short between swap and reload
  if [ -r "$R/previous/release.json" ]; then
    while IFS= read -r l || [ -n "$l" ]; do M="$M$l"; done < "$R/previous/release.json"
  fi
  printf 'pmanifest\t%s\n' "$M"
  echo "$MARK_LOCKED"
  set +e
  exec 2>&1  # from here on, every answer carries its errors
  S="$R/releases/$STAGE"
  serve
}

ngx() { bounded "$N" -p "$R/" -c "$@"; }

reload() {
  nginx_state
  case $NGX in
    ours) ngx "$R/current/nginx.conf" -s reload ;;
    no) ngx "$R/current/nginx.conf" ;;
    *) echo "the pid file $P names an nginx wsgate did not start (pid $NPID): not signalling it"; return 1 ;;
  esac
}

put() {  # put NAME TARGET: the link ROOT/NAME -> TARGET, atomically; an empty TARGET removes it
  if [ -n "$2" ]; then bounded ln -sfn "$2" "$R/$1.new" && bounded mv -T "$R/$1.new" "$R/$1"
  else bounded rm -f "$R/$1"; fi || return
  if [ "$1" = current ]; then CUR=$2; else PRE=$2; fi
}

switch() {  # switch TARGET: `current` -> TARGET, `previous` -> what `current` was
  old=$CUR; { [ -z "$old" ] || put previous "$old"; } && put current "$1"
}

prune() {  # keep the KEEP newest releases, and any release a link names (now or at the start)
  set -- "$R"/releases/*
  [ "$#" -gt "$KEEP" ] || return 0  # a glob, no process: nothing to prune yet
  keep=" $BEFORE $PREVIOUS $CUR $PRE " n=0
  # newest first needs ls -t (it lists no stage: those start with a dot); the names are digests
  # shellcheck disable=SC2012  # (no newline, no space)
  ls -1t "$R/releases" | while read -r d; do
    n=$((n + 1)); [ "$n" -gt "$KEEP" ] || continue
    case "$keep" in *" releases/$d "*) ;; *) bounded rm -rf "$R/releases/$d";; esac
  done
}

# The idle clock: a watchdog that ends this shell (and so the lock) after IDLE seconds spent
# waiting for a request, and a command on the tree (`bounded`) after T seconds. The shell writes
# its state to a file with builtins (`w K` while waiting for the K-th request, `b K` while it
# runs, `b K PID` while its command PID runs): a request costs no process of its own.
watchdog() {
  F="$R/.session.$$"
  echo "b $K" > "$F"
  trap 'kill "$WD" 2>/dev/null; rm -f "$F" 9>&-' EXIT
  (
    tick=$IDLE; [ "$T" -ge "$tick" ] || tick=$T
    tick=$((tick / 3)); [ "$tick" -ge 1 ] || tick=1  # one wake-up per tick: a short run sees none
    n=0; last=""
    while kill -0 "$$" 2>/dev/null; do
      sleep "$tick"
      { read -r state < "$F"; } 2>/dev/null || exit 0
      if [ "$state" = "$last" ]; then n=$((n + tick)); else n=0; fi
      last=$state
      # shellcheck disable=SC2086  # the state's words: b|w, K, and PID
      set -- $state
      if [ "$1" = w ] && [ "$n" -ge "$IDLE" ]; then kill -TERM "$$" 2>/dev/null; exit 0; fi
      if [ "$1" = b ] && [ -n "${3:-}" ] && [ "$n" -ge "$T" ]; then kill -TERM "$3" 2>/dev/null; n=0; fi
    done
  ) 9>&- >/dev/null 2>&1 </dev/null &
  WD=$!
}

# a_link VALUE: empty, or `releases/` and 64 hex digits (what a restore may point a link at).
a_link() {
  case $1 in '') return 0 ;; releases/*) ;; *) return 1 ;; esac
  d=${1#releases/}
  [ "${#d}" -eq 64 ] || return 1
  case $d in *[!0-9a-f]*) return 1 ;; esac
}

# restore CURRENT|PREVIOUS|yes-or-no: both links as they were, and nginx running or not. The
# payload is split with parameter expansion (no here-document: a full /tmp cannot break it) and
# every field is checked before anything changes: a bad one is refused, untouched.
restore() {
  case $1 in *'|'*'|'*) ;; *) echo "restore refused: payload '$1' is not CURRENT|PREVIOUS|yes-or-no: nothing changed"; return 2 ;; esac
  WC=${1%%'|'*}; rest=${1#*'|'}; WP=${rest%%'|'*}; WR=${rest#*'|'}
  for v in "$WC" "$WP"; do
    a_link "$v" || { echo "restore refused: link '$v' is not empty or releases/<64 hex digits>: nothing changed"; return 2; }
  done
  case $WR in yes|no) ;; *) echo "restore refused: running '$WR' is not yes or no: nothing changed"; return 2 ;; esac
  nginx_state; st=$NGX; was_pid=$NPID
  if [ "$st" = foreign ]; then reload; return  # refuses, and says why
  elif [ -n "$WC" ] && [ ! -d "$R/$WC" ]; then echo "release $WC is gone"; return 1
  elif [ -n "$WP" ] && [ ! -d "$R/$WP" ]; then echo "release $WP is gone"; return 1
  fi
  put current "$WC" && put previous "$WP" && echo "$MARK_SWAPPED" || return
  if [ "$WR" = yes ]; then reload; elif [ "$st" = ours ]; then kill -QUIT "$was_pid"; fi
}

# One request a line, until stdin closes: ping, stage (+ a base64 tar line), discard, live,
# back, reload, restore (+ `current|previous|yes-or-no`), show. Each answer ends `MARK_DONE rc`.
serve() {
  K=0
  while K=$((K + 1)); echo "w $K" > "$F"; IFS= read -r cmd; do
    case "$cmd" in stage|restore) IFS= read -r payload || break ;; esac  # still on the idle clock
    echo "b $K" > "$F"
    case "$cmd" in
      ping) rc=0 ;;
      stage) { [ ! -e "$S" ] || bounded rm -rf "$S"; } && mkdir -p "$S" \
               && printf '%s' "$payload" | base64 -d | bounded tar -xf - -C "$S" \
               && echo "$MARK_STAGED" && ngx "$S/nginx.conf" -t; rc=$? ;;
      discard) bounded rm -rf "$S"; rc=$? ;;
      live) D="$R/releases/$TARGET"
            { [ ! -d "$S" ] || { [ -d "$D" ] && bounded rm -rf "$S"; } || bounded mv -T "$S" "$D"; } \
              && [ -d "$D" ] && switch "releases/$TARGET" && echo "$MARK_SWAPPED" && reload; rc=$?
            [ "$rc" -ne 0 ] || prune ;;  # after the reload: nginx loads while old releases go
      back) if [ -z "$PREVIOUS" ] || [ ! -d "$R/$PREVIOUS" ]; then echo "the previous release ${PREVIOUS:-(none)} is not on the host"; rc=1
            else switch "$PREVIOUS" && echo "$MARK_SWAPPED" && reload; rc=$?; fi ;;
      reload) reload; rc=$? ;;
      restore) restore "$payload"; rc=$? ;;
      show) if cd "$R/current" 2>/dev/null; then
              bounded find . -type f | sort | while read -r f; do printf '%s\0' "${f#./}"; cat "$f"; printf '\0'; done; cd /
            fi; echo; rc=0 ;;
      *) echo "unknown request: $cmd"; rc=2 ;;
    esac
    echo "$MARK_DONE $rc"
  done
}
