#!/usr/bin/env bash
# The README's walkthrough of runtime/examples/, checked step by step as a user would run
# it: start the stack, ask the web server, crash it, hang it, kill its workflow and the
# master (the program must not notice), stop and start a service, ./stop, and nothing of
# the stack left running.
#
#   scripts/test_services.sh                          # in a fresh private temp dir (default)
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test_services.sh # in that dir (refused if a cluster runs there)
#
# The stack listens on 127.0.0.1:8080; the script refuses to run if that port is taken.
# Prints PASS/FAIL per check and a final "N passed, M failed" line; exits 1 if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
set_dir_or_temp /tmp/nexus-services.XXXXXXXX
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG
trap_cleanup
stack="$repo/runtime/examples/stack.json"

get() { # URL: the body, or nothing if it does not answer
    python3 -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().strip())
except Exception:
    pass' "$1"
}
field() { # INSTANCE EXPR: a value from the instance's record
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(eval(sys.argv[2], {"r": r}))' "$DIR/services/state/$1.json" "$2" 2>/dev/null || true
}
state_of() { field "$1" 'r["machine"]["phase"]["state"]'; }
pid_of() { "$bin" pid "$1" 2>/dev/null || true; }
events_of() { # SERVICE EVENT: how many such ledger lines
    grep -c "\"event\":\"$2\".*\"service\":\"$1\"" "$DIR/events.jsonl" || true
}
is_replaced() { local p; p=$(pid_of "$1"); [[ -n "$p" && "$p" != "$2" && $(state_of "$1") == ready ]]; }
is_state() { [[ $(state_of "$1") == "$2" ]]; }

if [[ -n "$(get http://127.0.0.1:8080/health)" ]]; then
    echo "FAIL: something already answers on 127.0.0.1:8080; the example stack needs that port"
    exit 1
fi

# --- start ------------------------------------------------------------------------------
claim_dir
started=1
rc=0
out=$("$bin" start --config "$stack" --runtime-dir "$DIR") || rc=$?
echo "$out"
if ((rc == 0)); then pass "the stack started"; else fail "nexus start exited $rc"; summary; exit 1; fi
if [[ "$out" == *"web-1 ready"*"migrate-1 completed"*"worker-1 ready"* ]]; then
    pass "start says web ready, migrate completed, worker ready"
else
    fail "start did not report the services: $out"
fi
body=$(get http://127.0.0.1:8080/)
if [[ "$body" == "hello from pid"* ]]; then pass "the web server answers: $body"; else fail "no answer from the web server ($body)"; fi
if wait_for 8000 grep -q "worker-1 out tick .*hello from pid" "$DIR/logs/worker-1.log"; then
    pass "the worker's lines reach logs/worker-1.log: $(tail -n 1 "$DIR/logs/worker-1.log")"
else
    fail "no worker output in logs/worker-1.log"
fi
if "$bin" status >/dev/null; then pass "nexus status exits 0"; else fail "nexus status exited non-zero"; fi

# --- a crash ----------------------------------------------------------------------------
web=$(pid_of web-1)
kill -9 "$web"
if wait_for 5000 is_replaced web-1 "$web"; then
    pass "kill -9 of web-1 (pid $web): restarted as pid $(pid_of web-1)"
else
    fail "web-1 was not restarted after kill -9"
fi
if [[ $(events_of web respawned) == 1 ]]; then pass "one respawned line in the ledger"; else fail "$(events_of web respawned) respawned lines for web"; fi

# --- a hang -----------------------------------------------------------------------------
web=$(pid_of web-1)
t0=$(now_ms)
kill -STOP "$web"
if wait_for 10000 is_replaced web-1 "$web"; then
    pass "kill -STOP of web-1: killed as hung and restarted after $(($(now_ms) - t0)) ms"
else
    fail "a stopped web-1 was not replaced within 10 s"
fi
if grep -q '"event":"respawned".*"cause":"hang".*"service":"web"' "$DIR/events.jsonl"; then
    pass "the ledger says cause=hang"
else
    fail "no respawned line with cause hang"
fi

# --- nexus's own failures ---------------------------------------------------------------
web=$(pid_of web-1)
wf=$(pid_of workflow-1)
kill -9 "$wf"
if wait_for 5000 bash -c "[[ \$('$bin' pid workflow-1 2>/dev/null) != $wf ]] && grep -q '\"event\":\"adopted\",\"pid\":$web' '$DIR/events.jsonl'"; then
    pass "kill -9 of workflow-1 (pid $wf): replaced, and web-1 adopted"
else
    fail "workflow-1 not replaced or web-1 not adopted"
fi
master=$(cat "$DIR/leader.lock")
kill -9 "$master"
if wait_for 5000 bash -c "[[ \$(cat '$DIR/leader.lock') != $master ]]" && wait_for 5000 "$bin" status --runtime-dir "$DIR" >/dev/null 2>&1; then
    pass "kill -9 of the master (pid $master): a standby took over"
else
    fail "no new master after killing pid $master"
fi
if [[ $(pid_of web-1) == "$web" ]]; then pass "web-1 kept its pid $web through both"; else fail "web-1 changed pid: $web -> $(pid_of web-1)"; fi
body=$(get http://127.0.0.1:8080/)
if [[ "$body" == "hello from pid $web "* ]]; then pass "and still answers: $body"; else fail "web did not answer as pid $web: $body"; fi

# --- the user's stop and start ----------------------------------------------------------
if "$bin" service stop worker >/dev/null && is_state worker-1 stopped; then pass "service stop worker: stopped"; else fail "service stop worker"; fi
if "$bin" service start worker >/dev/null && is_state worker-1 ready; then pass "service start worker: ready again"; else fail "service start worker"; fi

# --- ./stop -----------------------------------------------------------------------------
pids=$(python3 -c 'import json, glob
for f in glob.glob("'"$DIR"'/services/state/*-[0-9]*.json"):
    r = json.load(open(f))
    if r.get("run"): print(r["run"]["pid"])')
out=$("$repo/stop")
echo "$out"
started=0
check_nothing_left
left=""
for p in $pids; do if wait_for 2000 bash -c "! { st=\$(ps -o stat= -p $p 2>/dev/null); [[ -n \$st && \$st != Z* ]]; }"; then :; else left+=" $p"; fi; done
if [[ -z "$left" ]]; then pass "no program of the stack is left (pids $(echo "$pids" | tr '\n' ' '))"; else fail "programs left after ./stop:$left"; fi
if [[ -z "$(get http://127.0.0.1:8080/health)" ]]; then pass "port 8080 is free again"; else fail "something still answers on 8080"; fi

summary
((failed == 0))
