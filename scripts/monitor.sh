#!/usr/bin/env bash
# One-shot health check of a running nexus cluster: the status table, the sockets, and
# the process count per role against the running config.
#
#   scripts/monitor.sh                            # the cluster in /tmp/nexus
#   NEXUS_RUNTIME_DIR=/tmp/other scripts/monitor.sh
#
# Exit: 0 all good, 1 something is wrong, 3 nexus is not running in the directory (no
# master answering and no daemon of the directory found).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_if_missing
set_dir "${NEXUS_RUNTIME_DIR:-/tmp/nexus}"

ok=1
bad() { ok=0; }

# --- status ---------------------------------------------------------------------------
rc=0
"$bin" status --runtime-dir "$DIR" || rc=$?
if ((rc == 3)); then
    n=$(count_of)
    if ((n == 0)); then
        echo "FAIL: nexus is not running in $DIR"
        exit 3
    fi
    # Daemons without a master answering: a hung or dying master, not "not running".
    echo "FAIL: the master does not answer on $DIR/control.sock, but $n daemons of $DIR are running"
    bad
elif ((rc == 0)); then
    echo
    echo "PASS: nexus status: whole"
else
    echo
    echo "FAIL: nexus status exited $rc (degraded)"
    bad
fi

if [[ ! -r "$DIR/config.json" ]]; then
    echo "FAIL: $DIR/config.json is missing; expecting the default counts"
    bad
fi
n_comm=$(config_value communicators 2)
n_dog=$(config_value watchdogs 3)
n_wf=$(config_value workflows 5)
# The http daemon runs when the config has an `http` section.
n_http=0
grep -q '"http"' "$DIR/config.json" 2>/dev/null && n_http=1

# --- sockets --------------------------------------------------------------------------
echo
echo "sockets in $DIR:"
socks=(control.sock)
for ((id = 1; id <= n_dog; id++)); do socks+=("heartbeat_$id.sock"); done
for s in "${socks[@]}"; do
    p="$DIR/$s"
    if [[ -S "$p" ]]; then
        printf '  %-22s ok       socket\n' "$s"
    elif [[ -e "$p" ]]; then
        printf '  %-22s ok       NOT a socket\n' "$s"
        bad
    else
        printf '  %-22s MISSING\n' "$s"
        bad
    fi
done

# --- processes ------------------------------------------------------------------------
echo
echo "processes of $DIR (pgrep) vs config.json:"
total=0
for spec in "communicator:$n_comm" "watchdog:$n_dog" "workflow:$n_wf" "http:$n_http"; do
    role=${spec%%:*} want=${spec##*:}
    n=$(count_of "$role")
    total=$((total + n))
    if ((n == want)); then
        printf '  %-14s %3d / %-3d ok\n' "$role" "$n" "$want"
    else
        printf '  %-14s %3d / %-3d WRONG\n' "$role" "$n" "$want"
        bad
    fi
done
want=$((n_comm + n_dog + n_wf + n_http))
if ((total == want)); then
    printf '  %-14s %3d / %-3d ok\n' total "$total" "$want"
else
    printf '  %-14s %3d / %-3d WRONG\n' total "$total" "$want"
fi

echo
if ((ok)); then
    echo "PASS: nexus in $DIR is healthy"
    exit 0
fi
echo "FAIL: nexus in $DIR is not healthy"
exit 1
