#!/usr/bin/env bash
# The README's HTTP API walkthrough, as a user runs it with curl: the shipped config (on a
# free port), a key from `nexus api-key create`, status/health/metrics (promtool-checked),
# the ledger as Server-Sent Events, refusals without a key or with a foreign Host, a
# killed workflow seen on the stream; ./stop closes the port and leaves nothing running.
#
#   scripts/test_http.sh                           # in a fresh private temp dir (default)
#   NEXUS_RUNTIME_DIR=/tmp/x scripts/test_http.sh  # in that dir (refused if a cluster runs there)
#
# Prints PASS/FAIL per check and a final "N passed, M failed" line; exits 1 if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
set_dir_or_temp /tmp/nexus-http.XXXXXXXX
export NEXUS_RUNTIME_DIR="$DIR"
unset NEXUS_CONFIG
trap_cleanup
claim_dir
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cfg="$DIR/http-config.json"
# The shipped config, on a free port, with fast heartbeats and the state in this run's dir.
python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); c["http"]["listen"] = "127.0.0.1:" + sys.argv[2]
c.update(state_dir=sys.argv[3], interval_ms=200, timeout_ms=1000)
json.dump(c, open(sys.argv[4], "w"))' "$repo/runtime/nexus_config.json" "$port" "$DIR/state" "$cfg"
url="http://127.0.0.1:$port"

started=1
out=$("$bin" start --config "$cfg" --runtime-dir "$DIR")
echo "$out"
if [[ "$out" == *"$url/"* && "$out" == *"api-key create"* ]]; then pass "start printed the URL and how to get a key"; else fail "start did not print $url/"; fi
if (($(count_of http) == 1)); then pass "the API runs in a daemon of its own"; else fail "$(count_of http) http daemons"; fi

control=$("$bin" api-key create --name ops --scope control)
viewer=$("$bin" api-key create --name viewer --scope read)
if [[ "$control" =~ ^nxk_[0-9a-f]{64}$ && "$viewer" =~ ^nxk_[0-9a-f]{64}$ ]]; then pass "api-key create printed the keys alone"; else fail "api-key create printed something else"; fi
mode=$(stat -c %a "$DIR/state/api-keys.json")
if [[ "$mode" == 600 ]] && ! grep -q "${viewer#nxk_}" "$DIR/state/api-keys.json"; then pass "api-keys.json is 0600 and holds no key"; else fail "api-keys.json: mode $mode, or it holds a key"; fi

code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true; }
auth=(-H "Authorization: Bearer $viewer")

n=$(curl -sf --max-time 5 "${auth[@]}" "$url/api/v1/status" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["daemons"]))' || echo 0)
if ((n == 11)); then pass "GET /api/v1/status: 11 daemons"; else fail "GET /api/v1/status: $n daemons"; fi
c=$(code "${auth[@]}" "$url/api/v1/health")
if [[ "$c" == 200 ]]; then pass "GET /api/v1/health: 200"; else fail "GET /api/v1/health: $c"; fi
if curl -sf --max-time 5 "${auth[@]}" "$url/metrics" >"$DIR/metrics.txt" && grep -q '^nexus_up 1' "$DIR/metrics.txt"; then
    pass "GET /metrics: nexus_up 1"
else
    fail "GET /metrics"
fi
if command -v promtool >/dev/null 2>&1; then
    if promtool check metrics <"$DIR/metrics.txt" >"$DIR/promtool.txt" 2>&1; then pass "promtool check metrics: clean"; else fail "promtool: $(head -3 "$DIR/promtool.txt")"; fi
fi

c=$(code "$url/api/v1/status")
if [[ "$c" == 401 ]]; then pass "no key: 401"; else fail "no key: $c"; fi
if curl -s --max-time 5 "$url/" | grep -q '<title>nexus</title>'; then pass "GET /: the dashboard's page (its login needs no key)"; else fail "GET / did not give the dashboard"; fi
n=$("$bin" --api "$url" --api-key "$viewer" status --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["daemons"]))' || echo 0)
if ((n == 11)); then pass "nexus --api $url status --json: 11 daemons, as locally"; else fail "nexus --api status: $n daemons"; fi
c=$(code -H "Authorization: Bearer nxk_$(printf '0%.0s' {1..64})" "$url/api/v1/status")
if [[ "$c" == 401 ]]; then pass "a wrong key: 401"; else fail "a wrong key: $c"; fi
c=$(code "${auth[@]}" -H "Host: rebind.example" "$url/api/v1/status")
if [[ "$c" == 400 ]]; then pass "a foreign Host (DNS rebinding): 400"; else fail "a foreign Host: $c"; fi
c=$(code "${auth[@]}" -H "Origin: http://evil.example" "$url/api/v1/status")
if [[ "$c" == 403 ]]; then pass "a foreign Origin: 403"; else fail "a foreign Origin: $c"; fi

# The ledger live: a stream opened, a workflow killed, its respawn read off the stream.
curl -sN --max-time 10 "${auth[@]}" "$url/api/v1/events?n=0" >"$DIR/stream.txt" &
curl_pid=$!
wait_for 5000 bash -c "grep -q '^retry:' '$DIR/stream.txt'" || true
victim=$(pids_of workflow 3)
kill -9 "$victim"
if wait_for 5000 bash -c "grep -q '\"old_pid\":$victim' '$DIR/stream.txt'"; then
    pass "the stream showed workflow-3 (pid $victim) respawned: $(grep -c '^id:' "$DIR/stream.txt") event(s)"
else
    fail "no respawn of pid $victim on the stream"
fi
kill "$curl_pid" 2>/dev/null || true
wait "$curl_pid" 2>/dev/null || true
# Resume: the last five events, then again after the first of them: the other four follow.
curl -s --max-time 5 "${auth[@]}" "$url/api/v1/events?n=5&follow=0" | grep '^id:' | cut -d' ' -f2 >"$DIR/ids.txt" || true
first=$(head -1 "$DIR/ids.txt")
curl -s --max-time 5 "${auth[@]}" -H "Last-Event-ID: $first" "$url/api/v1/events?follow=0" | grep '^id:' | cut -d' ' -f2 | head -4 >"$DIR/resumed.txt" || true
if (($(wc -l <"$DIR/ids.txt") == 5)) && diff -q <(tail -4 "$DIR/ids.txt") "$DIR/resumed.txt" >/dev/null; then
    pass "Last-Event-ID $first resumes right after it"
else
    fail "resume after $first: $(tr '\n' ' ' <"$DIR/resumed.txt"), wanted $(tail -4 "$DIR/ids.txt" | tr '\n' ' ')"
fi

"$bin" stop --runtime-dir "$DIR"
started=0
check_nothing_left
c=$(code "${auth[@]}" "$url/api/v1/health")
if [[ "$c" == 000 ]]; then pass "the port is closed after stop"; else fail "after stop the port answers $c"; fi
summary
((failed == 0))
