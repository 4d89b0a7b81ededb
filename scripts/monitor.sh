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

# nexus makes the path absolute and normalises it lexically; the daemons' command lines
# (matched by pgrep below) carry that form.
DIR=$(realpath -m -s -- "${NEXUS_RUNTIME_DIR:-/tmp/nexus}")

# The directory as an extended regex, anchored at the end of the command line (the
# runtime dir is the last argument) so that /tmp/a does not match /tmp/ab.
dir_re=$(printf '%s' "$DIR" | sed 's/[][\.*^$+?(){}|]/\\&/g')
count_role() { pgrep -u "$EUID" -c -f -- "/nexus daemon --role $1 --id [0-9]+ --runtime-dir $dir_re\$" || true; }
count_all() { count_role '(communicator|watchdog|workflow)'; }

# A count from the running config, or the built-in default.
config_count() { # KEY DEFAULT
    local v=""
    if [[ -r "$DIR/config.json" ]]; then
        v=$(sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$DIR/config.json" | head -n 1)
    fi
    echo "${v:-$2}"
}

ok=1
bad() { ok=0; }

# --- status ---------------------------------------------------------------------------
rc=0
"$bin" status --runtime-dir "$DIR" || rc=$?
if ((rc == 3)); then
    n=$(count_all)
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
n_comm=$(config_count communicators 2)
n_dog=$(config_count watchdogs 3)
n_wf=$(config_count workflows 5)

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
for spec in "communicator:$n_comm" "watchdog:$n_dog" "workflow:$n_wf"; do
    role=${spec%%:*} want=${spec##*:}
    n=$(count_role "$role")
    total=$((total + n))
    if ((n == want)); then
        printf '  %-14s %3d / %-3d ok\n' "$role" "$n" "$want"
    else
        printf '  %-14s %3d / %-3d WRONG\n' "$role" "$n" "$want"
        bad
    fi
done
want=$((n_comm + n_dog + n_wf))
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
