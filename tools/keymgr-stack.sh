#!/bin/bash
# Local Keystone + Barbican for the functional tests (and for trying vtpm-driver by hand).
#
#   tools/keymgr-stack.sh start      install (once), configure, bootstrap, start, provision
#   tools/keymgr-stack.sh stop       stop both services
#   tools/keymgr-stack.sh status     exit 0 when both answer, 3 when not
#   tools/keymgr-stack.sh provision  (re)create projects, users, roles, catalog; write
#                                    clouds.yaml and openrc-<cloud>
#
# Everything lives in $VTPM_STACK_DIR (default /var/lib/vtpm-driver/stack): its own
# virtualenv, configuration, sqlite databases, keys, pid files, logs, credentials.
# Keystone listens on 127.0.0.1:5000, Barbican on 127.0.0.1:9311, both under gunicorn.
# Passwords and the Barbican KEK are generated once and never printed or put on a
# command line.
set -euo pipefail

STACK_DIR="${VTPM_STACK_DIR:-/var/lib/vtpm-driver/stack}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HELPERS="$HERE/keymgr"
VENV="$STACK_DIR/venv"
LOGS="$STACK_DIR/logs"
RUN="$STACK_DIR/run"
ETC="$STACK_DIR/etc"
KEYSTONE_BIND=127.0.0.1:5000
BARBICAN_BIND=127.0.0.1:9311
KEYSTONE_URL="http://$KEYSTONE_BIND/v3"
BARBICAN_URL="http://$BARBICAN_BIND"
START_TIMEOUT="${VTPM_STACK_START_TIMEOUT:-90}"
# What the venv holds, declared in one file; a change rebuilds the venv.
REQUIREMENTS="$HERE/../requirements/stack.txt"
# One request per line with method and path: tests count requests from these logs.
ACCESS_FORMAT='%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'

TAG=keymgr-stack
# shellcheck source=tools/lib.sh
. "$HERE/lib.sh"

usage() {
    echo "usage: $0 {start|stop|status|provision}" >&2
    exit 2
}

# --- virtualenv --------------------------------------------------------------------------

ensure_venv() {
    local py digest t0=$SECONDS
    py="$(find_python "${VTPM_STACK_PYTHON:-}")" || die "no Python >= 3.11 with the venv module found (Keystone 30 and Barbican 23 need it); set VTPM_STACK_PYTHON"
    digest="$(inputs_digest "$py" "$REQUIREMENTS")"
    venv_current "$VENV" "$digest" && return 0
    # Services running from the old venv must not outlive it.
    cmd_stop >/dev/null
    say "building virtualenv $VENV from requirements/stack.txt (about 30-60 s)"
    # --no-compile: byte-compiling all ~115 packages costs ~20 s; the services write
    # .pyc files for the modules they really import on their first start instead.
    build_venv "$VENV" "$py" "$digest" "$LOGS/pip-install.log" --no-compile -r "$REQUIREMENTS"
    say "virtualenv ready in $((SECONDS - t0)) s ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("keystone", m.version("keystone"), "barbican", m.version("barbican"), "gunicorn", m.version("gunicorn"))'))"
}

# --- processes ---------------------------------------------------------------------------

# pid of a running gunicorn master from its pid file, or nothing.
service_pid() {
    pid_if_matches "$RUN/$1.pid" "gunicorn: master \[vtpm-$1\]|gunicorn.*${1}_wsgi:"
}

keystone_healthy() { [ "$(http_code "$KEYSTONE_URL")" = 200 ]; }
barbican_healthy() {
    local c
    c="$(http_code "$BARBICAN_URL/")"
    [ "$c" = 200 ] || [ "$c" = 300 ]
}

wait_healthy() {
    local name="$1" check="$2" deadline=$((SECONDS + START_TIMEOUT))
    while ! "$check"; do
        if ! service_pid "$name" >/dev/null; then
            die_with_log "$name exited during start-up" "$LOGS/$name-gunicorn.log" "$LOGS/$name.log"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            die_with_log "$name did not answer within ${START_TIMEOUT}s" "$LOGS/$name-gunicorn.log" "$LOGS/$name.log"
        fi
        sleep 0.5
    done
}

# start_gunicorn NAME BIND WORKERS THREADS [ENV=VALUE...]
start_gunicorn() {
    local name="$1" bind="$2" workers="$3" threads="$4"
    shift 4
    if port_in_use "$bind"; then
        die "$bind is already in use by a process that is not this stack's $name (see: ss -ltnp)"
    fi
    rm -f "$RUN/$name.pid"
    say "starting $name on $bind"
    # 9>&-: the daemon must not inherit (and keep) the lock of this script.
    env "$@" "$VENV/bin/gunicorn" \
        --daemon \
        --name "vtpm-$name" \
        --bind "$bind" \
        --workers "$workers" \
        --threads "$threads" \
        --timeout 60 \
        --no-control-socket \
        --chdir "$HELPERS" \
        --pid "$RUN/$name.pid" \
        --error-logfile "$LOGS/$name-gunicorn.log" \
        --access-logfile "$LOGS/$name-access.log" \
        --access-logformat "$ACCESS_FORMAT" \
        "${name}_wsgi:application" 9>&- \
        || die_with_log "gunicorn for $name failed to start" "$LOGS/$name-gunicorn.log"
    # The daemon writes its pid file once the master is up.
    local deadline=$((SECONDS + 15))
    until service_pid "$name" >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name: no gunicorn master came up" "$LOGS/$name-gunicorn.log" "$LOGS/$name.log"
        sleep 0.2
    done
}

# --- steps -------------------------------------------------------------------------------

helper() {
    VTPM_STACK_DIR="$STACK_DIR" "$VENV/bin/python" "$HELPERS/$1" "${@:2}"
}

configure() {
    mkdir -p "$STACK_DIR" "$LOGS" "$RUN" "$ETC"
    helper render.py || die "writing the configuration into $STACK_DIR failed"
}

bootstrap_keystone() {
    local marker="$STACK_DIR/data/keystone.bootstrapped" conf="$ETC/keystone.conf"
    [ -f "$marker" ] && return 0
    say "bootstrapping Keystone (db_sync, fernet/credential keys, admin, catalog)"
    local km=("$VENV/bin/keystone-manage" --config-file "$conf")
    "${km[@]}" db_sync >>"$LOGS/keystone-manage.log" 2>&1 \
        || die_with_log "keystone-manage db_sync failed" "$LOGS/keystone-manage.log"
    "${km[@]}" fernet_setup --keystone-user root --keystone-group root >>"$LOGS/keystone-manage.log" 2>&1 \
        || die_with_log "keystone-manage fernet_setup failed" "$LOGS/keystone-manage.log"
    "${km[@]}" credential_setup --keystone-user root --keystone-group root >>"$LOGS/keystone-manage.log" 2>&1 \
        || die_with_log "keystone-manage credential_setup failed" "$LOGS/keystone-manage.log"
    # The password travels in the environment, never on the command line.
    OS_BOOTSTRAP_PASSWORD="$(helper render.py --print-password admin)" \
        "${km[@]}" bootstrap \
        --bootstrap-username admin \
        --bootstrap-project-name admin \
        --bootstrap-role-name admin \
        --bootstrap-service-name keystone \
        --bootstrap-region-id RegionOne \
        --bootstrap-public-url "$KEYSTONE_URL/" \
        --bootstrap-internal-url "$KEYSTONE_URL/" \
        --bootstrap-admin-url "$KEYSTONE_URL/" >>"$LOGS/keystone-manage.log" 2>&1 \
        || die_with_log "keystone-manage bootstrap failed" "$LOGS/keystone-manage.log"
    touch "$marker"
}

start_keystone() {
    if service_pid keystone >/dev/null && keystone_healthy; then
        return 0
    fi
    stop_service keystone >/dev/null
    bootstrap_keystone
    start_gunicorn keystone "$KEYSTONE_BIND" 1 4 OS_KEYSTONE_CONFIG_DIR="$ETC"
    wait_healthy keystone keystone_healthy
    say "keystone answers at $KEYSTONE_URL"
}

start_barbican() {
    if service_pid barbican >/dev/null && barbican_healthy; then
        return 0
    fi
    stop_service barbican >/dev/null
    # sqlite: one worker, one thread, or concurrent writes fail with "database is locked".
    # Barbican reads its configuration from ~/.barbican/barbican.conf only.
    start_gunicorn barbican "$BARBICAN_BIND" 1 1 \
        HOME="$STACK_DIR/barbican-home" VTPM_BARBICAN_PASTE="$ETC/barbican-api-paste.ini"
    wait_healthy barbican barbican_healthy
    say "barbican answers at $BARBICAN_URL"
}

provision() {
    keystone_healthy || die "Keystone does not answer at $KEYSTONE_URL: run '$0 start' first"
    say "provisioning projects, users, roles and the key-manager endpoint"
    helper provision.py || die "provisioning failed (see the message above)"
    say "wrote $STACK_DIR/clouds.yaml and $STACK_DIR/openrc-{owner,member,other,admin,service}"
}

verify() {
    helper provision.py --verify || die_with_log "Barbican does not accept Keystone tokens" "$LOGS/barbican.log"
}

both_up() {
    local py
    py="$(find_python "${VTPM_STACK_PYTHON:-}")" && venv_current "$VENV" "$(inputs_digest "$py" "$REQUIREMENTS")" \
        && service_pid keystone >/dev/null && service_pid barbican >/dev/null \
        && keystone_healthy && barbican_healthy && [ -s "$STACK_DIR/clouds.yaml" ]
}

cmd_start() {
    command -v curl >/dev/null || die "curl is needed for health checks (apt-get install curl)"
    if both_up; then
        say "already running and healthy (keystone $KEYSTONE_URL, barbican $BARBICAN_URL)"
        return 0
    fi
    local t0=$SECONDS
    ensure_venv
    configure
    start_keystone
    provision
    start_barbican
    verify
    say "up in $((SECONDS - t0)) s: keystone $KEYSTONE_URL, barbican $BARBICAN_URL; credentials in $STACK_DIR/clouds.yaml"
}

cmd_stop() {
    stop_services barbican keystone
}

cmd_status() {
    local rc=0 name pid check url
    for name in keystone barbican; do
        check="${name}_healthy"
        if [ "$name" = keystone ]; then url="$KEYSTONE_URL"; else url="$BARBICAN_URL"; fi
        if pid="$(service_pid "$name")"; then
            if "$check"; then
                say "$name: running (pid $pid), healthy at $url"
            else
                say "$name: running (pid $pid) but not answering at $url"
                rc=3
            fi
        else
            say "$name: not running"
            rc=3
        fi
    done
    if [ -s "$STACK_DIR/clouds.yaml" ]; then
        say "credentials: $STACK_DIR/clouds.yaml"
    else
        say "credentials: not provisioned yet"
        rc=3
    fi
    say "logs: $LOGS"
    return "$rc"
}

cmd_provision() {
    [ -x "$VENV/bin/python" ] || die "no virtualenv at $VENV: run '$0 start' first"
    configure
    provision
    if barbican_healthy; then
        verify
    fi
}

# One start/stop/provision at a time (tests, CI and people may call this together).
lock() { lock_dir "$STACK_DIR" 900; }

[ $# -eq 1 ] || usage
umask 077
# Let the stack's processes cache bytecode (see ensure_venv), in the stack dir, not the repo.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$STACK_DIR/pycache"
case "$1" in
    start | stop | provision) lock ;;
esac
case "$1" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    provision) cmd_provision ;;
    *) usage ;;
esac
