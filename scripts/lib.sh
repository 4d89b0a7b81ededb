# shellcheck shell=bash
# What the scripts in this folder share, in one place so that they cannot drift apart:
# where the binary is, which runtime directory, how to find that directory's daemons,
# timing, the PASS/FAIL tally of the test scripts, and the cleanup at exit. Sourced (after
# `set -euo pipefail`), never run: it only sets repo, bin and defaults and defines
# functions; nothing is built, made or started until a script calls one.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where `cargo build --release` puts it: .cargo/config.toml builds for the host's own
# triple explicitly (see there why).
bin="$repo/target/$(uname -m)-unknown-linux-gnu/release/nexus"

# The release binary, built if missing (as ./start does). Build output goes to stderr:
# stdout is the script's report.
build_if_missing() {
    [[ ! -x "$bin" ]] || return 0
    echo "building nexus (release)..." >&2
    "$repo/scripts/build-release" >/dev/null
}

# --- the runtime directory ------------------------------------------------------------
# set_dir PATH: DIR is PATH the way nexus writes it, absolute and normalised lexically
# (symlinks kept), because the daemons' command lines, which pgrep matches, carry that
# form; dir_re is DIR as an extended regex, since pgrep -f takes a pattern, not a string.
set_dir() {
    DIR=$(realpath -m -s -- "$1")
    dir_re=$(printf '%s' "$DIR" | sed 's/[][\.*^$+?(){}|]/\\&/g')
}

# set_dir_or_temp TEMPLATE: $NEXUS_RUNTIME_DIR if set, else a fresh `mktemp -d TEMPLATE`
# (mode 0700, never a user's cluster) that made_dir=1 marks for cleanup to remove.
made_dir=0
set_dir_or_temp() {
    if [[ -n "${NEXUS_RUNTIME_DIR:-}" ]]; then
        set_dir "$NEXUS_RUNTIME_DIR"
    else
        local tmp
        tmp=$(mktemp -d "$1")
        set_dir "$tmp"
        made_dir=1
    fi
}

# --- this directory's daemons -----------------------------------------------------------
# daemon_re [ROLE] [ID]: the pgrep pattern for daemons of DIR (ROLE and ID are regexes).
# The runtime dir is the last argument, so anchoring with $ keeps /tmp/a from matching
# /tmp/ab. Only these pids are ever counted or killed, never anything by name: other
# clusters, and a user's own, must not be touched.
daemon_re() {
    local role="${1:-(communicator|watchdog|workflow|http)}" id="${2:-[0-9]+}"
    printf '%s' "/nexus daemon --role $role --id $id --runtime-dir $dir_re\$"
}
# count_of [ROLE] [ID]: how many there are; pids_of [ROLE] [ID]: their pids, one a line.
# (SC2120: within lib.sh they are called without arguments; the scripts pass them.)
# shellcheck disable=SC2120
count_of() { pgrep -u "$EUID" -c -f -- "$(daemon_re "$@")" || true; }
# shellcheck disable=SC2120
pids_of() { pgrep -u "$EUID" -f -- "$(daemon_re "$@")" || true; }

# config_value KEY DEFAULT: a number from DIR/config.json (the running config, written
# by nexus start), or DEFAULT, the built-in default, if it is not there.
config_value() {
    local v=""
    if [[ -r "$DIR/config.json" ]]; then
        v=$(sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p" "$DIR/config.json" | head -n 1)
    fi
    echo "${v:-$2}"
}

# --- time -------------------------------------------------------------------------------
now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((t / 1000)); }

# wait_for TIMEOUT_MS CMD...: polls CMD every poll_ms until it succeeds or the deadline
# passes, bounded by both the clock and an iteration count (a stalled clock cannot make
# it spin forever); then CMD once more, whose status is the answer.
poll_ms=20
wait_for() {
    local limit_ms=$1 i deadline nap
    shift
    printf -v nap '%d.%03d' $((poll_ms / 1000)) $((poll_ms % 1000))
    deadline=$(($(now_ms) + limit_ms))
    for ((i = 0; i <= limit_ms / poll_ms; i++)); do
        if "$@"; then return 0; fi
        (($(now_ms) < deadline)) || break
        sleep "$nap"
    done
    "$@"
}

# --- the test scripts' tally --------------------------------------------------------------
passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
summary() { echo "$passed passed, $failed failed"; }

# claim_dir: refuses (exit 1) a DIR where a cluster answers or daemons of it run, since
# a test must not touch a cluster it did not start; then makes DIR (mode 0700) if needed.
claim_dir() {
    local rc=0
    "$bin" status --runtime-dir "$DIR" >/dev/null 2>&1 || rc=$?
    if ((rc != 3)) || (($(count_of) > 0)); then
        echo "FAIL: $DIR is in use (nexus status exited $rc, $(count_of) daemons found); refusing to test there (unset NEXUS_RUNTIME_DIR to use a temp dir)"
        exit 1
    fi
    echo "runtime dir: $DIR"
    if [[ ! -d "$DIR" ]]; then
        mkdir -p -- "$(dirname -- "$DIR")"
        mkdir -m 700 -- "$DIR"
    fi
}

# check_nothing_left: after a stop, which returns once every daemon has ended, no daemon
# of DIR and no socket may remain; checked at once, with no grace.
check_nothing_left() {
    local n left
    n=$(count_of)
    if ((n == 0)); then
        pass "no daemon of $DIR remains"
    else
        fail "$n daemons of $DIR remain after stop: $(pids_of | tr '\n' ' ')"
    fi
    left=$(find "$DIR" -maxdepth 1 -name '*.sock' -printf '%f ')
    if [[ -z "$left" ]]; then pass "sockets removed"; else fail "sockets left after stop: $left"; fi
}

# --- cleanup at exit --------------------------------------------------------------------
# Whatever way a script ends (a failed check, set -e, ^C), a cluster it started must not
# outlive it, nor its temp dirs pile up. cleanup does what the script has set:
#   started=1              a cluster it started may run in DIR: stop it, then kill by pid
#                          any daemon of DIR that survived the stop
#   cfg=FILE               a file of its own: removed, also from a user's directory
#   made_dir=1             (set_dir_or_temp) DIR is its temp dir: removed on success or an
#                          interrupt, kept for its logs on a failure, saying keep_note
#   kill_leftovers=0       leave the survivors of the stop alone (chaos_test: CI's
#                          leftover check is there to see them)
#   keep_if_interrupted=1  keep the temp dir after an interrupt too
# and passes the exit status on unchanged.
started=0
cfg=""
kill_leftovers=1
keep_if_interrupted=0
keep_note=""
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    if ((started)); then
        "$bin" stop --runtime-dir "$DIR" >/dev/null 2>&1 || true
        if ((kill_leftovers)); then
            for pid in $(pids_of); do
                echo "cleanup: killing leftover pid $pid of $DIR" >&2
                kill -KILL "$pid" 2>/dev/null || true
            done
        fi
    fi
    [[ -z "$cfg" ]] || rm -f -- "$cfg"
    if ((made_dir)); then
        if ((rc == 0)) || ((!keep_if_interrupted && (rc == 130 || rc == 143))); then
            rm -rf -- "$DIR"
        else
            echo "${keep_note:-runtime dir kept for inspection: $DIR (logs in $DIR/logs)}" >&2
        fi
    fi
    exit "$rc"
}
# cleanup at any exit; INT and TERM exit 128+signal, which cleanup passes on.
trap_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
