#!/usr/bin/env bash
# Smoke test of a whole nexus cluster: start, process counts, sockets and their modes,
# status, stop, nothing left behind, a second stop.
#
#   scripts/test.sh                          # in a fresh private temp dir (default)
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test.sh # in that dir (refused if a cluster runs there)
#
# Prints PASS/FAIL per check and a final "N passed, M failed" line; exits 1 if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
# A fresh private temp dir unless NEXUS_RUNTIME_DIR names one.
set_dir_or_temp /tmp/nexus-test.XXXXXXXX
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG
trap_cleanup

# --- start ----------------------------------------------------------------------------
claim_dir
cfg="$DIR/test-config.json"
printf '{"interval_ms": 200, "timeout_ms": 1000}\n' >"$cfg"
exp_comm=2 exp_dog=3 exp_wf=5
exp_total=$((exp_comm + exp_dog + exp_wf))

started=1
t0=$(now_ms)
rc=0
"$bin" start --config "$cfg" --runtime-dir "$DIR" || rc=$?
t1=$(now_ms)
if ((rc == 0)); then
    pass "nexus start exited 0 ($((t1 - t0)) ms)"
else
    fail "nexus start exited $rc"
    summary
    exit 1
fi

# --- processes ------------------------------------------------------------------------
n=$(count_of)
if ((n == exp_total)); then pass "$n daemons running for $DIR"; else fail "$n daemons running for $DIR, expected $exp_total"; fi
for spec in "communicator:$exp_comm" "watchdog:$exp_dog" "workflow:$exp_wf"; do
    role=${spec%%:*} want=${spec##*:}
    n=$(count_of "$role")
    if ((n == want)); then pass "$n ${role}s"; else fail "$n ${role}s, expected $want"; fi
    bad=""
    for ((id = 1; id <= want; id++)); do
        k=$(count_of "$role" "$id")
        ((k == 1)) || bad+=" $role-$id($k)"
    done
    if [[ -z "$bad" ]]; then pass "each $role id 1..$want has exactly one process"; else fail "slots without exactly one process:$bad"; fi
done

master=$(cat "$DIR/leader.lock" 2>/dev/null || true)
if [[ -n "$master" ]] && pids_of communicator | grep -qx -- "$master"; then
    pass "leader.lock names a live communicator of this dir (pid $master)"
else
    fail "leader.lock names pid '${master}', not a communicator of this dir"
fi

# --- files and sockets ----------------------------------------------------------------
mode=$(stat -c %a -- "$DIR")
if [[ "$mode" == 700 ]]; then pass "runtime dir mode 700"; else fail "runtime dir mode $mode, expected 700"; fi
socks=(control.sock)
for ((id = 1; id <= exp_dog; id++)); do socks+=("heartbeat_$id.sock"); done
for s in "${socks[@]}"; do
    p="$DIR/$s"
    if [[ ! -e "$p" ]]; then
        fail "$s missing"
    elif [[ ! -S "$p" ]]; then
        fail "$s exists but is not a socket"
    else
        mode=$(stat -c %a -- "$p")
        if [[ "$mode" == 600 ]]; then pass "$s is a socket, mode 600"; else fail "$s is a socket with mode $mode, expected 600"; fi
    fi
done

# --- status ---------------------------------------------------------------------------
rc=0
"$bin" status --runtime-dir "$DIR" >/dev/null || rc=$?
if ((rc == 0)); then pass "nexus status exits 0 (whole)"; else fail "nexus status exited $rc, expected 0"; fi
rc=0
summary=$("$bin" status --json --runtime-dir "$DIR" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["whole"], len(s["daemons"]), sum(d["state"] == "running" for d in s["daemons"]))
') || rc=$?
if ((rc == 0)) && [[ "$summary" == "True $exp_total $exp_total" ]]; then
    pass "nexus status --json: whole, $exp_total daemons running"
else
    fail "nexus status --json gave '$summary' (whole, daemons, running), expected 'True $exp_total $exp_total'"
fi

# --- stop -----------------------------------------------------------------------------
t0=$(now_ms)
rc=0
"$bin" stop --runtime-dir "$DIR" || rc=$?
t1=$(now_ms)
if ((rc == 0)); then pass "nexus stop exited 0 ($((t1 - t0)) ms)"; else fail "nexus stop exited $rc"; fi
check_nothing_left
rc=0
"$bin" stop --runtime-dir "$DIR" >/dev/null || rc=$?
if ((rc == 0)); then pass "second nexus stop exits 0"; else fail "second nexus stop exited $rc"; fi
rc=0
"$bin" status --runtime-dir "$DIR" >/dev/null 2>&1 || rc=$?
if ((rc == 3)); then pass "nexus status exits 3 once stopped"; else fail "nexus status exited $rc after stop, expected 3"; fi
started=0

summary
((failed == 0))
