#!/usr/bin/env bash
# The README's task walkthrough (runtime/examples/tasks.json), checked as a user would run
# it: a task needing a capability, one failing then succeeding, one timing out, one
# cancelled while running, one chained with --after, one nobody can serve; `status` and
# `events` show them; then SIGKILL of every nexus process mid-queue, `start`, and every
# task finishes; ./stop leaves nothing running.
#
#   scripts/test_tasks.sh                           # in a fresh private temp dir (default)
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test_tasks.sh  # in that dir (refused if a cluster runs there)
#   NEXUS_QUEUE_URL=postgres://u:pw@127.0.0.1/db scripts/test_tasks.sh
#                                                   # the same, the queue in that (empty) database
#
# The queue lives in the run's own state dir (DIR/state). Prints PASS/FAIL per check and
# a final "N passed, M failed" line; exits 1 if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
set_dir_or_temp /tmp/nexus-tasks.XXXXXXXX
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG
trap_cleanup
claim_dir
cfg="$DIR/tasks-config.json"
# The example, with the queue in this run's directory.
python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); c["state_dir"] = sys.argv[2]
if sys.argv[4]: c["queue_url"] = sys.argv[4]
json.dump(c, open(sys.argv[3], "w"))' "$repo/runtime/examples/tasks.json" "$DIR/state" "$cfg" "${NEXUS_QUEUE_URL:-}"
# The config's actions run in its directory: the example's scripts live there.
cp "$repo"/runtime/examples/{train.sh,flaky.sh} "$DIR/"

field() { "$bin" task status "$1" --json 2>/dev/null | python3 -c 'import json, sys
t = json.load(sys.stdin); v = eval(sys.argv[1], {"t": t}); print("" if v is None else v)' "$2" 2>/dev/null || true; }
is_state() { [[ $(field "$1" 't["state"]') == "$2" ]]; }
submit() { "$bin" task submit "$@"; }

started=1
out=$("$bin" start --config "$cfg" --runtime-dir "$DIR")
echo "$out"
pass "the cluster started"

train=$(submit '{"action": "train", "data": "img.dat"}' --priority 15)
flaky=$(submit '{"action": "flaky"}')
slow=$(submit '{"command": ["sleep", "60"]}' --timeout-ms 500 --max-attempts 1)
long=$(submit '{"command": ["sleep", "600"]}')
report=$(submit '{"action": "report", "rows": 21}')
chained=$(submit '{"command": ["echo", "after the report"]}' --after "$report")
tpu=$(submit '{"command": ["true"], "required_capabilities": ["tpu"]}')
if [[ "$train $flaky $slow $long $report $chained $tpu" =~ ^[0-9\ ]+$ ]]; then pass "submit printed ids alone: $train $flaky $slow $long $report $chained $tpu"; else fail "submit printed something else"; fi

if wait_for 10000 is_state "$long" running; then pass "task $long runs"; else fail "task $long never ran"; fi
lpid=$(field "$long" 't["pid"]')
if "$bin" task cancel "$long" >/dev/null && wait_for 5000 bash -c "! kill -0 $lpid 2>/dev/null || [[ \$(ps -o stat= -p $lpid) == Z* ]]"; then
    pass "cancel killed the running task's program (pid $lpid)"
else
    fail "cancel did not kill pid $lpid"
fi
rc=0
"$bin" task wait "$train" "$flaky" "$report" "$chained" >/dev/null 2>&1 || rc=$?
if ((rc == 0)); then pass "train, flaky, report and the chained task succeeded"; else fail "task wait exited $rc"; fi
if [[ $(field "$train" 't["worker"]') == workflow-1 ]]; then pass "train (needs gpu) ran on workflow-1"; else fail "train ran on $(field "$train" 't["worker"]')"; fi
if [[ $(field "$flaky" 't["attempts"]') == 2 && $(field "$flaky" 't["history"][0]["exit_code"]') == 75 ]]; then pass "flaky failed once (exit 75), then succeeded"; else fail "flaky: $(field "$flaky" 't')"; fi
if [[ $(field "$report" 't["result"]["rows"]') == 42 ]]; then pass "report's result is JSON: rows 42"; else fail "report's result: $(field "$report" 't["result"]')"; fi
if [[ $(field "$chained" 't["result"]') == "after the report" ]]; then pass "the chained task ran after its parent"; else fail "chained: $(field "$chained" 't')"; fi
if wait_for 5000 is_state "$slow" failed && [[ $(field "$slow" 't["error"]') == "timed out after 500 ms"* ]]; then pass "the slow task timed out and failed"; else fail "slow: $(field "$slow" 't')"; fi
if is_state "$tpu" queued && [[ $(field "$tpu" 't["waiting"]') == *"no worker has the capabilities"* ]]; then pass "the tpu task waits and says why"; else fail "tpu: $(field "$tpu" 't')"; fi
st=$("$bin" status || true)
if [[ "$st" == *"tasks:"*"queued 1"* && "$st" == *"workflow-1 0/2 [gpu]"* ]]; then pass "status shows the queue and the workers"; else fail "status: $st"; fi
n=$("$bin" events --event task_retry -n 100 | grep -c "task $flaky " || true)
if ((n == 1)); then pass "events --event task_retry: flaky's retry"; else fail "task_retry events for $flaky: $n"; fi

# --- SIGKILL of everything mid-queue, then start ---------------------------------------
ids=()
for _ in 1 2 3 4 5 6 7 8; do ids+=("$(submit '{"command": ["sh", "-c", "sleep 0.5; echo done"]}')"); done
wait_for 10000 is_state "${ids[0]}" running || true
# Pass after pass (bounded), as a user would: a daemon forked while the first pass ran
# is not in its list.
for _ in $(seq 1 20); do
    victims=$(pids_of)
    [[ -z "$victims" ]] && break
    for pid in $victims; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.05
done
if wait_for 5000 bash -c "(( \$(pgrep -c -f -- '--runtime-dir $DIR\$' || true) == 0 ))"; then pass "every nexus process SIGKILLed"; else fail "daemons survived SIGKILL"; fi
"$bin" start --config "$cfg" --runtime-dir "$DIR" >/dev/null
rc=0
"$bin" task wait "${ids[@]}" >/dev/null 2>&1 || rc=$?
if ((rc == 0)); then pass "after start, all 8 tasks submitted before the SIGKILL succeeded"; else fail "task wait after restart exited $rc"; fi
requeued=0
for id in "${ids[@]}"; do [[ $(field "$id" 't["attempts"]') == 2 ]] && requeued=$((requeued + 1)); done
if ((requeued >= 1)); then pass "$requeued that were running were re-queued with the attempt counted"; else fail "none was counted as re-queued"; fi

# --- ./stop -----------------------------------------------------------------------------
submit '{"command": ["sleep", "600"]}' >/dev/null
wait_for 10000 bash -c "pgrep -f 'sleep 600' >/dev/null" || true
out=$("$repo/stop")
echo "$out"
started=0
check_nothing_left
left=$(grep -l "NEXUS_TASK_QUEUE=$DIR/state" /proc/[0-9]*/environ 2>/dev/null || true)
if [[ -z "$left" ]]; then pass "no task's process is left after ./stop"; else fail "task processes left: $left"; fi
if "$bin" task status "$report" >/dev/null 2>&1; then pass "task status still answers from the state dir with the cluster stopped"; else fail "task status after stop"; fi

summary
((failed == 0))
