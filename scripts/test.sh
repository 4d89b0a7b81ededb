#!/usr/bin/env bash
# Smoke test of a whole nexus cluster: start, process counts, sockets and their modes,
# status, stop, nothing left behind, a second stop.
#
#   scripts/test.sh                          # in a fresh private temp dir (default)
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test.sh # in that dir (refused if a cluster runs there)
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
count_of() { pgrep -u "$EUID" -c -f -- "$(daemon_re "$@")" || true; }
pids_of() { pgrep -u "$EUID" -f -- "$(daemon_re "$@")" || true; }

# wait_for TIMEOUT_MS CMD...: polls CMD every 20 ms until it succeeds or the deadline
# passes (bounded by both the clock and an iteration count).
wait_for() {
    local timeout_ms=$1 i deadline
    shift
    deadline=$(($(now_ms) + timeout_ms))
    for ((i = 0; i <= timeout_ms / 20; i++)); do
        if "$@"; then return 0; fi
        (($(now_ms) < deadline)) || break
        sleep 0.02
    done
    "$@"
}

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

# --- refuse to touch a cluster we did not start ---------------------------------------
rc=0
"$bin" status --runtime-dir "$DIR" >/dev/null 2>&1 || rc=$?
if ((rc != 3)) || (($(count_of) > 0)); then
    echo "FAIL: $DIR is in use (nexus status exited $rc, $(count_of) daemons found); refusing to test there (unset NEXUS_RUNTIME_DIR to use a temp dir)"
    exit 1
fi

# --- start ----------------------------------------------------------------------------
echo "runtime dir: $DIR"
if [[ ! -d "$DIR" ]]; then
    mkdir -p -- "$(dirname -- "$DIR")"
    mkdir -m 700 -- "$DIR"
fi
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
    echo "$passed passed, $failed failed"
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
# stop returns once every daemon has ended: check at once, no grace.
n=$(count_of)
if ((n == 0)); then
    pass "no daemon of $DIR remains"
else
    fail "$n daemons of $DIR remain after stop: $(pids_of | tr '\n' ' ')"
fi
left=$(find "$DIR" -maxdepth 1 -name '*.sock' -printf '%f ')
if [[ -z "$left" ]]; then pass "sockets removed"; else fail "sockets left after stop: $left"; fi
rc=0
"$bin" stop --runtime-dir "$DIR" >/dev/null || rc=$?
if ((rc == 0)); then pass "second nexus stop exits 0"; else fail "second nexus stop exited $rc"; fi
rc=0
"$bin" status --runtime-dir "$DIR" >/dev/null 2>&1 || rc=$?
if ((rc == 3)); then pass "nexus status exits 3 once stopped"; else fail "nexus status exited $rc after stop, expected 3"; fi
started=0

echo "$passed passed, $failed failed"
((failed == 0))
