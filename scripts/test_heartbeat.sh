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
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
interval_ms=200
timeout_ms=1000

# A fresh private temp dir unless NEXUS_RUNTIME_DIR names one.
set_dir_or_temp /tmp/nexus-test.XXXXXXXX
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG

# wait_for polls every 10 ms, not 20: this script reports times to recovery in ms.
poll_ms=10

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
    [[ -n "$p" && "$p" != *$'\n'* && "$p" != "$3" ]] && gone "$3" && (($(count_of) == exp_total))
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

trap_cleanup

abort() {
    fail "$@"
    summary
    exit 1
}

# --- start ----------------------------------------------------------------------------
claim_dir
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
if ((rc == 0)) && (($(count_of) == exp_total)); then
    pass "cluster started: $exp_total daemons"
else
    abort "cluster did not start (nexus start exited $rc, $(count_of) daemons)"
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
    fail "workflow 3 (pid $old_wf3, kill -9) not replaced within 10 s (now: '$(pids_of workflow 3 | tr '\n' ' ')', $(count_of) daemons)"
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
check_nothing_left
started=0

echo "total time with the cluster up: $(($(now_ms) - t_all)) ms"
summary
((failed == 0))
