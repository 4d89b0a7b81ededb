#!/usr/bin/env bash
# A compact live view of a nexus cluster, made for watch(1):
#
#   watch -n 1 scripts/monitor_live.sh
#   NEXUS_RUNTIME_DIR=/tmp/other watch -n 1 scripts/monitor_live.sh
#
# Shows the status table, one line of socket checks and the last 8 events. Every nexus
# call is bounded by `timeout`, so a wedged master cannot hang the screen; it always
# exits 0 (a non-zero exit would make watch stop refreshing with -e, and is noise here).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# No build here: a screen refreshed every second is no place for one.
if [[ ! -x "$bin" ]]; then
    echo "nexus is not built: run cargo build --release in $repo (or ./start)"
    exit 0
fi

set_dir "${NEXUS_RUNTIME_DIR:-/tmp/nexus}"

# `nexus status` gives up on the master after 2 s and on the watchdogs after 0.5 s;
# 4 s (then SIGKILL 1 s later) is a hard ceiling in case anything else blocks.
bounded() { timeout -k 1 4 "$@"; }

rc=0
bounded "$bin" status --runtime-dir "$DIR" 2>/dev/null || rc=$?
case $rc in
    0 | 1) ;;
    3)
        n=$(count_of '[a-z]+')
        if ((n > 0)); then
            echo "the master does not answer in $DIR, but $n of its daemons are running"
        else
            echo "nexus is not running in $DIR"
        fi
        ;;
    124 | 137) echo "nexus status did not answer within 4 s in $DIR" ;;
    *) echo "nexus status failed (exit $rc) in $DIR" ;;
esac

# Sockets on one line: control, then heartbeat_1..N for the configured watchdogs.
dogs=$(config_value watchdogs 3)
sock_state() {
    if [[ -S "$1" ]]; then
        echo ok
    elif [[ -e "$1" ]]; then
        echo NOT-SOCKET
    else
        echo MISSING
    fi
}
line="sockets: control=$(sock_state "$DIR/control.sock")"
for ((id = 1; id <= dogs; id++)); do
    line+=" hb$id=$(sock_state "$DIR/heartbeat_$id.sock")"
done
echo
echo "$line"

echo
if [[ -f "$DIR/events.jsonl" ]]; then
    echo "last events ($DIR/events.jsonl):"
    bounded "$bin" events -n 8 --runtime-dir "$DIR" 2>&1 || true
else
    echo "no events yet ($DIR/events.jsonl does not exist)"
fi
exit 0
