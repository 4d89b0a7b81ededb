#!/usr/bin/env bash
# Failure detection and recovery, end to end, with short timings (interval 200 ms,
# timeout 1000 ms):
#   1. kill -9 workflow 3    -> replaced at once (the master's pidfd sees the exit)
#   2. kill -STOP workflow 2 -> the watchdogs report it silent, the master kills and
#                               replaces it after about timeout_ms
#   3. kill -9 watchdog 2    -> replaced, heartbeat_2.sock bound again
# then checks the ledger holds exactly one "respawned" event per killed pid.
#
#   scripts/test_heartbeat.sh                          # in a fresh private temp dir
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test_heartbeat.sh # in that dir (refused if in use)
#
# Prints PASS/FAIL per check and a final "N passed, M failed" line; exits 1 if any failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/release/nexus"
if [[ ! -x "$bin" ]]; then
    echo "building nexus (release)..." >&2
    # The repo's build recipe (as ./start uses) if there is one, else plain cargo.
    if [[ -x "$repo/scripts/build-release" ]]; then
        "$repo/scripts/build-release" >&2
    else
        cargo build --release --manifest-path "$repo/Cargo.toml" >&2
    fi
fi

interval_ms=200
timeout_ms=1000

# --- the runtime directory ----------------------------------------------------------
made_dir=0
if [[ -n "${NEXUS_RUNTIME_DIR:-}" ]]; then
    # nexus makes the path absolute and normalises it lexically; so must we, since the
    # daemons' command lines (matched by pgrep below) carry the normalised form.
    DIR=$(realpath -m -s -- "$NEXUS_RUNTIME_DIR")
else
    DIR=$(mktemp -d /tmp/nexus-test.XXXXXXXX) # mode 0700, never a user's cluster
    made_dir=1
fi
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG

# --- helpers ------------------------------------------------------------------------
passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }

now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((t / 1000)); }

# The directory as an extended regex: pgrep -f takes a pattern, not a string.
dir_re=$(printf '%s' "$DIR" | sed 's/[][\.*^$+?(){}|]/\\&/g')
# pgrep pattern for daemons of this directory; the runtime dir is the last argument, so
# anchoring with $ keeps /tmp/a from matching /tmp/ab.
daemon_re() { # [role] [id]
    local role="${1:-(communicator|watchdog|workflow)}" id="${2:-[0-9]+}"
    printf '%s' "/nexus daemon --role $role --id $id --runtime-dir $dir_re\$"
}
count_all() { pgrep -u "$EUID" -c -f -- "$(daemon_re)" || true; }
pids_of() { pgrep -u "$EUID" -f -- "$(daemon_re "$@")" || true; }

# wait_for TIMEOUT_MS CMD...: polls CMD every 10 ms until it succeeds or the deadline
# passes (bounded by both the clock and an iteration count).
wait_for() {
    local timeout_ms=$1 i deadline
    shift
    deadline=$(($(now_ms) + timeout_ms))
    for ((i = 0; i <= timeout_ms / 10; i++)); do
        if "$@"; then return 0; fi
        (($(now_ms) < deadline)) || break
        sleep 0.01
    done
    "$@"
}

# A pid is gone once it no longer exists or is a zombie waiting to be reaped.
gone() {
    local state
    kill -0 "$1" 2>/dev/null || return 0
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
    [[ -z "$state" || "$state" == Z ]]
}

# replaced ROLE ID OLD_PID: the slot has exactly one process, not OLD_PID, OLD_PID is
# gone, and the cluster has its full count again.
replaced() {
    local p
    p=$(pids_of "$1" "$2")
    [[ -n "$p" && "$p" != *$'\n'* && "$p" != "$3" ]] && gone "$3" && (($(count_all) == exp_total))
}

# The kernel's socket inode bound to PATH, from /proc/net/unix (empty if none): a new
# bind gives a new one even where the file system reuses the file's inode number.
sock_inode() {
    awk -v p="$1" '$8 == p { print $7; exit }' /proc/net/unix
}
sock_rebound() { # PATH OLD_INODE
    local ino
    ino=$(sock_inode "$1")
    [[ -S "$1" && -n "$ino" && "$ino" != "$2" ]]
}
status_whole() { "$bin" status --runtime-dir "$DIR" >/dev/null 2>&1; }

started=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((started)); then
        "$bin" stop --runtime-dir "$DIR" >/dev/null 2>&1 || true
        # Anything of this directory that survived the stop: by pid, never by name.
        local pid
        for pid in $(pids_of); do
            echo "cleanup: killing leftover pid $pid of $DIR" >&2
            kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    # Our config file, also when the directory is the user's.
    [[ -z "${cfg:-}" ]] || rm -f -- "$cfg"
    if ((made_dir)); then
        # Kept when a check failed, for its logs; not on success or an interrupt.
        if ((rc == 0 || rc == 130 || rc == 143)); then
            rm -rf -- "$DIR"
        else
            echo "runtime dir kept for inspection: $DIR (logs in $DIR/logs)" >&2
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

summary() { echo "$passed passed, $failed failed"; }
abort() {
    fail "$@"
    summary
    exit 1
}

# --- refuse to touch a cluster we did not start ---------------------------------------
rc=0
"$bin" status --runtime-dir "$DIR" >/dev/null 2>&1 || rc=$?
if ((rc != 3)) || (($(count_all) > 0)); then
    echo "FAIL: $DIR is in use (nexus status exited $rc, $(count_all) daemons found); refusing to test there (unset NEXUS_RUNTIME_DIR to use a temp dir)"
    exit 1
fi

# --- start ----------------------------------------------------------------------------
echo "runtime dir: $DIR"
if [[ ! -d "$DIR" ]]; then
    mkdir -p -- "$(dirname -- "$DIR")"
    mkdir -m 700 -- "$DIR"
fi
cfg="$DIR/test-config.json"
printf '{"interval_ms": %d, "timeout_ms": %d}\n' "$interval_ms" "$timeout_ms" >"$cfg"
exp_total=10
events="$DIR/events.jsonl"
# Only this run's part of the ledger counts (a reused directory keeps older lines).
ev_offset=0
[[ -f "$events" ]] && ev_offset=$(stat -c %s -- "$events")

started=1
rc=0
"$bin" start --config "$cfg" --runtime-dir "$DIR" || rc=$?
if ((rc == 0)) && (($(count_all) == exp_total)); then
    pass "cluster started: $exp_total daemons"
else
    abort "cluster did not start (nexus start exited $rc, $(count_all) daemons)"
fi
t_all=$(now_ms)

# --- 1. crash: kill -9 workflow 3 -------------------------------------------------------
old_wf3=$(pids_of workflow 3)
if [[ -z "$old_wf3" || "$old_wf3" == *$'\n'* ]]; then
    abort "workflow 3: expected one pid, found '${old_wf3//$'\n'/ }'"
fi
t0=$(now_ms)
kill -KILL "$old_wf3"
if wait_for 10000 replaced workflow 3 "$old_wf3"; then
    pass "workflow 3 (pid $old_wf3, kill -9) replaced by pid $(pids_of workflow 3) in $(($(now_ms) - t0)) ms; $exp_total daemons again"
else
    fail "workflow 3 (pid $old_wf3, kill -9) not replaced within 10 s (now: '$(pids_of workflow 3 | tr '\n' ' ')', $(count_all) daemons)"
fi

# --- 2. hang: kill -STOP workflow 2 -----------------------------------------------------
old_wf2=$(pids_of workflow 2)
if [[ -z "$old_wf2" || "$old_wf2" == *$'\n'* ]]; then
    abort "workflow 2: expected one pid, found '${old_wf2//$'\n'/ }'"
fi
t0=$(now_ms)
kill -STOP "$old_wf2"
if wait_for $((timeout_ms + 5000)) replaced workflow 2 "$old_wf2"; then
    took=$(($(now_ms) - t0))
    pass "workflow 2 (pid $old_wf2, kill -STOP) replaced by pid $(pids_of workflow 2) in $took ms (timeout_ms $timeout_ms)"
    # A heartbeat may be up to one interval old when the process stops; sooner than
    # that would mean the watchdogs do not wait for the timeout.
    if ((took >= timeout_ms - interval_ms)); then
        pass "hung workflow 2 was not killed before the timeout ($took >= $((timeout_ms - interval_ms)) ms)"
    else
        fail "hung workflow 2 killed after $took ms, before timeout_ms - interval_ms = $((timeout_ms - interval_ms)) ms"
    fi
else
    fail "workflow 2 (pid $old_wf2, kill -STOP) not replaced within $((timeout_ms + 5000)) ms (now: '$(pids_of workflow 2 | tr '\n' ' ')', old pid gone: $(gone "$old_wf2" && echo yes || echo no))"
fi

# --- 3. crash of a watchdog: kill -9 watchdog 2 -----------------------------------------
hb2="$DIR/heartbeat_2.sock"
old_wd2=$(pids_of watchdog 2)
old_ino=$(sock_inode "$hb2")
if [[ -z "$old_wd2" || "$old_wd2" == *$'\n'* || -z "$old_ino" ]]; then
    abort "watchdog 2: expected one pid and a bound $hb2, found pid '${old_wd2//$'\n'/ }', socket inode '$old_ino'"
fi
t0=$(now_ms)
kill -KILL "$old_wd2"
if wait_for 10000 replaced watchdog 2 "$old_wd2"; then
    pass "watchdog 2 (pid $old_wd2, kill -9) replaced by pid $(pids_of watchdog 2) in $(($(now_ms) - t0)) ms"
else
    fail "watchdog 2 (pid $old_wd2, kill -9) not replaced within 10 s"
fi
if wait_for 5000 sock_rebound "$hb2" "$old_ino"; then
    mode=$(stat -c %a -- "$hb2")
    if [[ "$mode" == 600 ]]; then
        pass "heartbeat_2.sock bound again (socket inode $old_ino -> $(sock_inode "$hb2")), mode 600, $(($(now_ms) - t0)) ms after the kill"
    else
        fail "heartbeat_2.sock bound again but mode $mode, expected 600"
    fi
else
    fail "heartbeat_2.sock not bound again within 5 s (exists: $([[ -S $hb2 ]] && echo yes || echo no), inode '$(sock_inode "$hb2")', was $old_ino)"
fi

# --- whole again ----------------------------------------------------------------------
t0=$(now_ms)
if wait_for $((timeout_ms + 5000)) status_whole; then
    pass "nexus status exits 0 again ($(($(now_ms) - t0)) ms after the last check)"
else
    rc=0
    "$bin" status --runtime-dir "$DIR" || rc=$?
    fail "cluster not whole within $((timeout_ms + 5000)) ms (nexus status exited $rc)"
fi

# --- the ledger: exactly one recovery per killed pid ------------------------------------
# Prints, per pid: pid, number of respawned events with that old_pid, their causes,
# recover_ms, detect_ms, and the number of "killed" events (hang kills) for it.
ledger=$(python3 - "$events" "$ev_offset" "$old_wf3" "$old_wf2" "$old_wd2" <<'PY'
import json, sys
path, offset, pids = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
with open(path, "rb") as f:
    f.seek(offset)
    evs = [json.loads(l) for l in f.read().decode().splitlines() if l.strip()]
for p in pids:
    rs = [e for e in evs if e.get("event") == "respawned" and e.get("old_pid") == p]
    ks = [e for e in evs if e.get("event") == "killed" and e.get("pid") == p]
    print(p, len(rs), ",".join(str(e.get("cause")) for e in rs) or "-",
          ",".join(str(e.get("recover_ms")) for e in rs) or "-",
          ",".join(str(e.get("detect_ms")) for e in rs) or "-", len(ks))
PY
) || fail "cannot read $events"
while read -r pid n causes recover detect nkilled; do
    case $pid in
        "$old_wf3") what="workflow 3 (kill -9)" want_cause=crash want_killed=0 ;;
        "$old_wf2") what="workflow 2 (kill -STOP)" want_cause=hang want_killed=1 ;;
        *) what="watchdog 2 (kill -9)" want_cause=crash want_killed=0 ;;
    esac
    if [[ "$n" == 1 && "$causes" == "$want_cause" ]]; then
        pass "events.jsonl: one respawned event for $what old_pid $pid, cause $causes, detect ${detect} ms, recover ${recover} ms"
    else
        fail "events.jsonl: $n respawned events for $what old_pid $pid (causes $causes), expected exactly 1 with cause $want_cause"
    fi
    if [[ "$nkilled" != "$want_killed" ]]; then
        fail "events.jsonl: $nkilled \"killed\" events for $what pid $pid, expected $want_killed"
    elif ((want_killed)); then
        pass "events.jsonl: one \"killed\" (hang) event for $what pid $pid"
    fi
done <<<"$ledger"

# --- stop -----------------------------------------------------------------------------
rc=0
"$bin" stop --runtime-dir "$DIR" || rc=$?
if ((rc == 0)); then pass "nexus stop exited 0"; else fail "nexus stop exited $rc"; fi
n=$(count_all)
if ((n == 0)); then pass "no daemon of $DIR remains"; else fail "$n daemons of $DIR remain after stop: $(pids_of | tr '\n' ' ')"; fi
left=$(find "$DIR" -maxdepth 1 -name '*.sock' -printf '%f ')
if [[ -z "$left" ]]; then pass "sockets removed"; else fail "sockets left after stop: $left"; fi
started=0

echo "total time with the cluster up: $(($(now_ms) - t_all)) ms"
summary
((failed == 0))
