#!/bin/bash
# All-in-one OpenStack on this machine, for end-to-end tests that drive it like users do.
#
#   tools/openstack-aio.sh venv     build (or keep, while its inputs match) the virtualenv only;
#                                   tools/run-tests.sh runs it next to the Keystone start
#   tools/openstack-aio.sh start    install (once), configure, sync databases, start, wait
#   tools/openstack-aio.sh stop     stop this cloud's services (not Keystone/Barbican/libvirtd)
#   tools/openstack-aio.sh status   exit 0 when every service answers, 3 when not
#   tools/openstack-aio.sh restart-compute HOST
#                                   stop one running nova-compute (vtpm-aio, host-a ... host-d)
#                                   and start it again with this environment (the fault
#                                   table's Nova rows start it with VTPM_FAULT_AT=<step>)
#
# Services (all on 127.0.0.1, one worker each):
#   MariaDB :3306 (Debian package, own server and data directory, as a real deployment's
#     database: sqlite's "database is locked" made overlapping creates hang in BUILD)
#   RabbitMQ :5672 (Debian package, own node "vtpm-aio", vhost "nova")
#   placement-api :8778, nova-api :8774 (with vtpm-driver's nova-api component),
#     nova-api-plain :8764 (Nova's API as shipped), glance-api :9292 (file store), under gunicorn
#   nova-conductor, nova-scheduler, nova-compute (host "vtpm-aio": libvirt qemu:///system,
#     QEMU TCG, swtpm; availability zone "vtpm-aio", the default for new servers)
#   nova-compute-host-a ... nova-compute-host-d (hosts "host-a" ... "host-d": one per
#     private libvirt test host of tools/test-hosts.sh, which 'start' starts first; each runs
#     in its host's mount namespace; availability zones "vtpm-multihost" (host-a, host-b)
#     and "vtpm-multihost-2" (host-c, host-d); the two of a pair migrate to each other)
#   neutron stand-in :9696 (answers "no ports"; see tools/aio/neutron_stub.py)
# Keystone and Barbican are the keymgr stack's (tools/keymgr-stack.sh): this script starts
# it when needed and registers users, services and endpoints in it.
#
# Everything lives in $VTPM_AIO_DIR (default /var/lib/vtpm-driver/aio): its own virtualenv
# (nova 34, placement, glance, python-openstackclient + osc-placement, gunicorn, and this
# checkout installed editable), configuration, databases, instances, pid files, logs, and
# clouds.yaml / openrc-<cloud> for the clouds owner, member, other and admin.
#
# Environment: VTPM_AIO_DIR, VTPM_STACK_DIR, VTPM_GUEST_DIR, VTPM_AIO_COMPUTE_DRIVER (force
# a compute driver; default: vtpm.VTPMLibvirtDriver when this checkout ships
# nova/virt/vtpm, else libvirt.LibvirtDriver), VTPM_AIO_DEBUG=1 (debug logs).
set -euo pipefail

AIO_DIR="${VTPM_AIO_DIR:-/var/lib/vtpm-driver/aio}"
STACK_DIR="${VTPM_STACK_DIR:-/var/lib/vtpm-driver/stack}"
GUEST_DIR="${VTPM_GUEST_DIR:-/var/cache/vtpm-driver/guest}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
HELPERS="$HERE/aio"
VENV="$AIO_DIR/venv"
LOGS="$AIO_DIR/logs"
RUN="$AIO_DIR/run"
ETC="$AIO_DIR/etc"
DATA="$AIO_DIR/data"
RABBIT_DIR="$AIO_DIR/rabbitmq"
MARIADB_DIR="$AIO_DIR/mariadb"
START_TIMEOUT="${VTPM_AIO_START_TIMEOUT:-180}"
# What the venv holds, declared in one file (with what the tests run in it import); a
# change rebuilds the venv. This checkout is added editable.
REQUIREMENTS="$REPO/requirements/aio.txt"
APT_PACKAGES=(mariadb-server rabbitmq-server qemu-utils curl)
ACCESS_FORMAT='%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms'

# name -> bind address, WSGI module (gunicorn services)
declare -A BIND=([placement-api]=127.0.0.1:8778 [glance-api]=127.0.0.1:9292
                 [nova-api]=127.0.0.1:8774 [nova-api-plain]=127.0.0.1:8764
                 [neutron-stub]=127.0.0.1:9696)
declare -A WSGI=([placement-api]=placement.wsgi.api:application
                 [glance-api]=glance.wsgi.api:application
                 [nova-api]=nova_api_wsgi:application
                 [nova-api-plain]=nova_api_wsgi:application
                 [neutron-stub]=neutron_stub:application)
# nova-api-plain: Nova's API without vtpm-driver's component (as Nova ships it), for
# the tests that show Nova's own refusals stand without it.
GUNICORN_SERVICES=(neutron-stub placement-api glance-api nova-api nova-api-plain)
NOVA_SERVICES=(nova-conductor nova-scheduler nova-compute nova-compute-host-a nova-compute-host-b
               nova-compute-host-c nova-compute-host-d)
# nova-compute services on the test hosts (tools/test-hosts.sh): service -> host
declare -A TEST_HOST=([nova-compute-host-a]=host-a [nova-compute-host-b]=host-b
                      [nova-compute-host-c]=host-c [nova-compute-host-d]=host-d)
HOSTS_DIR="${VTPM_HOSTS_DIR:-/var/lib/vtpm-driver/hosts}"
COMPUTE_HOSTS=(vtpm-aio host-a host-b host-c host-d)

TAG=openstack-aio
# shellcheck source=tools/lib.sh
. "$HERE/lib.sh"

usage() {
    echo "usage: $0 {venv|start|stop|status|restart-compute HOST}" >&2
    exit 2
}

# --- host packages, prerequisites ---------------------------------------------------------

ensure_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    mkdir -p "$LOGS"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$LOGS/apt.log" 2>&1 \
        || die_with_log "apt-get install ${missing[*]} failed" "$LOGS/apt.log"
}

ensure_prereqs() {
    [ "$(id -u)" = 0 ] || die "must run as root (nova-compute drives qemu:///system and swtpm)"
    bash "$REPO/tools/setup-host.sh" | sed 's/^/  /' || die "tools/setup-host.sh failed"
    ensure_apt
    bash "$REPO/tools/build-guest.sh" | sed 's/^/  /' || die "tools/build-guest.sh failed"
    VTPM_STACK_DIR="$STACK_DIR" bash "$REPO/tools/keymgr-stack.sh" start | sed 's/^/  /' \
        || die "the Keystone + Barbican stack did not start (tools/keymgr-stack.sh start)"
}

# --- virtualenv ---------------------------------------------------------------------------

# The venv's inputs: requirements/aio.txt, this checkout's pyproject.toml and its path.
venv_digest() {
    local py
    py="$(find_python "${VTPM_AIO_PYTHON:-}")" || die "no Python >= 3.11 with the venv module found; set VTPM_AIO_PYTHON"
    inputs_digest "$py" "$REQUIREMENTS" "$REPO/pyproject.toml" -- "$REPO"
}

ensure_venv() {
    local digest py t0=$SECONDS
    digest="$(venv_digest)"
    venv_current "$VENV" "$digest" && return 0
    py="$(find_python "${VTPM_AIO_PYTHON:-}")"
    # Services running from the old venv must not outlive it.
    cmd_stop >/dev/null
    say "building virtualenv $VENV from requirements/aio.txt + this checkout (editable); about 1-2 min"
    # --no-compile: byte-compiling ~200 packages costs more than it saves; the services
    # cache the bytecode of what they import on their first start.
    build_venv "$VENV" "$py" "$digest" "$LOGS/pip-install.log" --no-compile -r "$REQUIREMENTS" -e "$REPO"
    "$VENV/bin/python" -c 'import nova, placement, glance, libvirt, vtpm_driver' \
        >>"$LOGS/pip-install.log" 2>&1 \
        || die_with_log "the AIO virtualenv cannot import what it needs" "$LOGS/pip-install.log"
    say "virtualenv ready in $((SECONDS - t0)) s ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("nova", "openstack-placement", "glance", "python-openstackclient")), sep=", ")'))"
}

# --- configuration ------------------------------------------------------------------------

compute_driver() {
    if [ -n "${VTPM_AIO_COMPUTE_DRIVER:-}" ]; then
        echo "$VTPM_AIO_COMPUTE_DRIVER"
    elif [ -f "$REPO/nova/virt/vtpm/__init__.py" ]; then
        # No silent fallback: a shim that does not load must fail nova-compute's start.
        echo vtpm.VTPMLibvirtDriver
    else
        echo libvirt.LibvirtDriver
    fi
}

helper() {
    VTPM_AIO_DIR="$AIO_DIR" VTPM_STACK_DIR="$STACK_DIR" "$VENV/bin/python" "$HELPERS/$1" "${@:2}"
}

render_args() {
    RENDER_ARGS=(--compute-driver "$COMPUTE_DRIVER")
    if [ "${VTPM_AIO_DEBUG:-0}" = 1 ]; then RENDER_ARGS+=(--debug); fi
}

# The deployment's EK CA of host-a and host-b ([vtpm] ek_ca_*, see tools/aio/render.py):
# a self-signed RSA CA (openssl adds the subject key identifier swtpm_localca needs).
ensure_ek_ca() {
    local ca="$DATA/ek-ca"
    [ -s "$ca/ca.pem" ] && [ -s "$ca/ca.key" ] && return 0
    mkdir -p "$ca"
    chmod 0700 "$ca"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout "$ca/ca.key.new" \
        -out "$ca/ca.pem.new" -subj "/CN=vtpm-driver all-in-one deployment EK CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" >"$LOGS/ek-ca.log" 2>&1 \
        || die_with_log "making the EK CA failed" "$LOGS/ek-ca.log"
    chmod 0600 "$ca/ca.key.new"
    mv -f "$ca/ca.key.new" "$ca/ca.key"
    mv -f "$ca/ca.pem.new" "$ca/ca.pem"
    say "made the deployment EK CA of host-a and host-b: $ca/ca.pem"
}

configure() {
    mkdir -p "$AIO_DIR" "$LOGS" "$RUN" "$DATA"
    chmod 0700 "$LOGS" "$RUN" "$DATA"
    ensure_ek_ca
    helper render.py "${RENDER_ARGS[@]}" || die "writing the configuration into $AIO_DIR failed"
    # QEMU runs as libvirt-qemu and must reach the instance files: make every directory
    # above the instances traversable (search only, no listing).
    mkdir -p "$AIO_DIR/instances"
    chmod 0755 "$AIO_DIR" "$AIO_DIR/instances"
    local d="$AIO_DIR"
    while [ "$d" != / ]; do
        d="$(dirname "$d")"
        if [ "$(( 0$(stat -c %a "$d") & 01 ))" = 0 ]; then
            say "making $d traversable for QEMU (chmod o+x)"
            chmod o+x "$d"
        fi
    done
}

# --- RabbitMQ -----------------------------------------------------------------------------

# RabbitMQ's environment: its own node, files and cookie under $RABBIT_DIR, loopback only.
rabbit_exports() {
    export HOME="$RABBIT_DIR/home" \
        RABBITMQ_NODENAME=vtpm-aio@localhost \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=5672 \
        RABBITMQ_DIST_PORT=25672 \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_MNESIA_BASE="$RABBIT_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$RABBIT_DIR/log" \
        RABBITMQ_PID_FILE="$RUN/rabbitmq.pid" \
        RABBITMQ_CONFIG_FILE="$RABBIT_DIR/rabbitmq" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_DIR/enabled_plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

rabbitmqctl() { (rabbit_exports && exec /usr/lib/rabbitmq/bin/rabbitmqctl -q "$@"); }

rabbit_pid() {
    local pid
    pid="$(cat "$RUN/rabbitmq.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] \
        && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "beam.* -home $RABBIT_DIR/home " \
        && echo "$pid"
}

rabbit_healthy() { rabbit_pid >/dev/null && rabbitmqctl await_startup --timeout 5 >/dev/null 2>&1; }

start_rabbitmq() {
    if ! rabbit_healthy; then
        port_in_use 127.0.0.1:5672 \
            && die "127.0.0.1:5672 is in use by a RabbitMQ that is not this cloud's (see: ss -ltnp)"
        mkdir -p "$RABBIT_DIR/home" "$RABBIT_DIR/mnesia" "$RABBIT_DIR/log"
        rm -f "$RUN/rabbitmq.pid"
        say "starting RabbitMQ on 127.0.0.1:5672"
        (rabbit_exports && cd "$RABBIT_DIR" && exec setsid /usr/lib/rabbitmq/bin/rabbitmq-server) \
            >"$LOGS/rabbitmq.log" 2>&1 </dev/null 9>&- &
        rabbitmqctl wait --timeout 60 "$RUN/rabbitmq.pid" >>"$LOGS/rabbitmq.log" 2>&1 \
            || die_with_log "RabbitMQ did not start" "$LOGS/rabbitmq.log"
    fi
    # User and vhost for Nova; the password goes through stdin, never argv.
    if ! rabbitmqctl list_vhosts | grep -qx nova; then
        rabbitmqctl add_vhost nova >/dev/null
    fi
    if ! rabbitmqctl list_users | grep -q '^nova\b'; then
        helper render.py --print-password rabbit | rabbitmqctl add_user nova >/dev/null \
            || die "rabbitmqctl add_user nova failed"
    else
        helper render.py --print-password rabbit | rabbitmqctl change_password nova >/dev/null \
            || die "rabbitmqctl change_password nova failed"
    fi
    rabbitmqctl set_permissions -p nova nova '.*' '.*' '.*' >/dev/null
    if rabbitmqctl list_users | grep -q '^guest\b'; then
        rabbitmqctl delete_user guest >/dev/null
    fi
}

stop_rabbitmq() {
    local pid
    if ! pid="$(rabbit_pid)"; then
        say "rabbitmq: not running"
        rm -f "$RUN/rabbitmq.pid"
        return 0
    fi
    say "stopping rabbitmq (pid $pid)"
    rabbitmqctl stop "$RUN/rabbitmq.pid" >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" rabbitmq
    rm -f "$RUN/rabbitmq.pid"
    # Erlang's port mapper, started by our node: stop it when no other node uses it.
    if command -v epmd >/dev/null && epmd -names 2>/dev/null | grep -q '^epmd: up' \
        && ! epmd -names 2>/dev/null | grep -q '^name '; then
        epmd -kill >/dev/null 2>&1 || true
    fi
}

# --- databases ----------------------------------------------------------------------------

# MariaDB: this cloud's own server (data, socket and pid file in $MARIADB_DIR, owned by
# mysql), TCP on 127.0.0.1:3306 only; root logs in through the socket, the services as
# user "aio".
mysql_socket() { echo "$MARIADB_DIR/run/mysqld.sock"; }
mariadb_pid() { pid_if_matches "$MARIADB_DIR/run/mariadb.pid" "mariadbd .*--datadir=$MARIADB_DIR/data"; }
mariadb_healthy() {
    mariadb_pid >/dev/null && mariadb-admin --no-defaults --socket="$(mysql_socket)" -u root \
        --connect-timeout=2 ping >/dev/null 2>&1
}
mariadb_sql() { mariadb --no-defaults --socket="$(mysql_socket)" -u root --batch "$@"; }

start_mariadb() {
    if ! mariadb_healthy; then
        port_in_use 127.0.0.1:3306 \
            && die "127.0.0.1:3306 is in use by a database that is not this cloud's (see: ss -ltnp)"
        mkdir -p "$MARIADB_DIR/run"
        chown mysql:mysql "$MARIADB_DIR" "$MARIADB_DIR/run"
        chmod 0700 "$MARIADB_DIR" "$MARIADB_DIR/run"
        if [ ! -d "$MARIADB_DIR/data/mysql" ]; then
            say "initialising MariaDB in $MARIADB_DIR/data"
            mariadb-install-db --no-defaults --user=mysql --datadir="$MARIADB_DIR/data" \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$LOGS/mariadb-install.log" 2>&1 \
                || die_with_log "mariadb-install-db failed" "$LOGS/mariadb-install.log"
        fi
        rm -f "$MARIADB_DIR/run/mariadb.pid"
        say "starting MariaDB on 127.0.0.1:3306"
        setsid mariadbd --no-defaults --user=mysql --datadir="$MARIADB_DIR/data" \
            --socket="$(mysql_socket)" --pid-file="$MARIADB_DIR/run/mariadb.pid" --port=3306 \
            --bind-address=127.0.0.1 --skip-name-resolve --max-connections=500 \
            --innodb-buffer-pool-size=128M --innodb-flush-log-at-trx-commit=2 \
            --log-error="$LOGS/mariadb.log" >/dev/null 2>&1 </dev/null 9>&- &
        local deadline=$((SECONDS + 60))
        until mariadb_healthy; do
            [ "$SECONDS" -lt "$deadline" ] || die_with_log "MariaDB did not start" "$LOGS/mariadb.log"
            sleep 0.5
        done
    fi
    # Databases and the services' user; the password goes through stdin, never argv.
    local db sql="" pw
    pw="$(helper render.py --print-password mariadb)"
    for db in nova_api nova nova_cell0 placement glance; do
        sql+="CREATE DATABASE IF NOT EXISTS $db CHARACTER SET utf8;"
        sql+="GRANT ALL PRIVILEGES ON $db.* TO 'aio'@'127.0.0.1';"
    done
    printf "CREATE USER IF NOT EXISTS 'aio'@'127.0.0.1' IDENTIFIED BY '%s';
ALTER USER 'aio'@'127.0.0.1' IDENTIFIED BY '%s';%s FLUSH PRIVILEGES;\n" "$pw" "$pw" "$sql" \
        | mariadb_sql || die_with_log "creating the MariaDB databases failed" "$LOGS/mariadb.log"
}

stop_mariadb() {
    local pid
    if ! pid="$(mariadb_pid)"; then
        say "mariadb: not running"
        return 0
    fi
    say "stopping mariadb (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" mariadb 60
}

sync_databases() {
    local versions marker
    versions="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("nova"), m.version("openstack-placement"), m.version("glance"), sep="-")')"
    marker="$MARIADB_DIR/.synced-$versions"
    [ -f "$marker" ] && return 0
    local t0=$SECONDS log="$LOGS/db-sync.log"
    local nm=("$VENV/bin/nova-manage" --config-file "$ETC/nova/nova.conf")
    say "syncing databases (placement, glance, nova_api, cell0, cell1)"
    "$VENV/bin/placement-manage" --config-file "$ETC/placement/placement.conf" db sync \
        >>"$log" 2>&1 || die_with_log "placement-manage db sync failed" "$log"
    "$VENV/bin/glance-manage" --config-file "$ETC/glance/glance-api.conf" db_sync \
        >>"$log" 2>&1 || die_with_log "glance-manage db_sync failed" "$log"
    "${nm[@]}" api_db sync >>"$log" 2>&1 || die_with_log "nova-manage api_db sync failed" "$log"
    # cell0's URL is derived from [database] connection (nova -> nova_cell0).
    "${nm[@]}" cell_v2 map_cell0 >>"$log" 2>&1 || die_with_log "nova-manage cell_v2 map_cell0 failed" "$log"
    "${nm[@]}" db sync --local_cell >>"$log" 2>&1 || die_with_log "nova-manage db sync (cell1) failed" "$log"
    # cell0's schema too (db sync without --local_cell syncs cell0 and the default cell).
    "${nm[@]}" db sync >>"$log" 2>&1 || die_with_log "nova-manage db sync failed" "$log"
    if ! "${nm[@]}" cell_v2 list_cells 2>>"$log" | grep -q ' cell1 '; then
        "${nm[@]}" cell_v2 create_cell --name cell1 >>"$log" 2>&1 \
            || die_with_log "nova-manage cell_v2 create_cell failed" "$log"
    fi
    touch "$marker"
    say "databases ready in $((SECONDS - t0)) s"
}

# --- processes ----------------------------------------------------------------------------

# pid of one of this cloud's services from its pid file, or nothing (a stale pid file may
# point at a reused pid: check the command line).
service_pid() {
    local name="$1" pattern
    case "$name" in
        nova-conductor | nova-scheduler | nova-compute) pattern="bin/$name .*$ETC/nova/nova.conf( |$)" ;;
        nova-compute-*) pattern="nova_compute_multihost.py .*$ETC/nova/compute-${TEST_HOST[$name]}.conf" ;;
        *) pattern="gunicorn: master \[vtpm-aio-$name\]|gunicorn.*${WSGI[$name]}" ;;
    esac
    pid_if_matches "$RUN/$name.pid" "$pattern"
}

healthy() {
    local name="$1" code
    service_pid "$name" >/dev/null || return 1
    case "$name" in
        nova-conductor | nova-scheduler | nova-compute*) return 0 ;;
    esac
    code="$(http_code "http://${BIND[$name]}/")"
    case "$code" in 200 | 300) return 0 ;; *) return 1 ;; esac
}

# What a running service was started from (configuration, and for nova-compute the
# driver code of this checkout, installed editable): a change restarts it on 'start'.
inputs_hash() {
    local name="$1" files=()
    case "$name" in
        nova-api)
            mapfile -t files < <(echo "$ETC/nova/nova.conf"; echo "$ETC/nova/api-paste.ini"
                echo "$HELPERS/nova_api_wsgi.py"; find "$REPO/nova" -name '*.py' | sort) ;;
        nova-api-plain) files=("$ETC/nova/nova.conf" "$ETC/nova/api-paste-plain.ini"
                               "$HELPERS/nova_api_wsgi.py") ;;
        nova-conductor | nova-scheduler) files=("$ETC/nova/nova.conf") ;;
        nova-compute)
            mapfile -t files < <(echo "$ETC/nova/nova.conf"
                find "$REPO/vtpm_driver" "$REPO/nova" -name '*.py' 2>/dev/null | sort) ;;
        nova-compute-*)
            # ... and the mount namespace of its test host: a restarted host is a new one.
            mapfile -t files < <(echo "$ETC/nova/nova.conf"
                echo "$ETC/nova/compute-${TEST_HOST[$name]}.conf"
                echo "$HELPERS/nova_compute_multihost.py"
                find "$REPO/vtpm_driver" "$REPO/nova" -name '*.py' 2>/dev/null | sort)
            { cat "${files[@]}" 2>/dev/null; test_host_mntns "${TEST_HOST[$name]}"; } \
                | sha256sum | cut -d' ' -f1
            return ;;
        placement-api) files=("$ETC/placement/placement.conf") ;;
        glance-api) files=("$ETC/glance/glance-api.conf" "$ETC/glance/glance-api-paste.ini") ;;
        neutron-stub) files=("$HELPERS/neutron_stub.py") ;;
    esac
    cat "${files[@]}" 2>/dev/null | sha256sum | cut -d' ' -f1
}

current() { [ "$(cat "$RUN/$1.inputs" 2>/dev/null)" = "$(inputs_hash "$1")" ]; }

# Stop a running service whose configuration or code changed since it started.
restart_if_changed() {
    local name="$1"
    if service_pid "$name" >/dev/null && ! current "$name"; then
        say "$name: configuration or code changed since it started; restarting it"
        stop_service "$name"
    fi
}

service_logs() {
    local name="$1"
    echo "$LOGS/$name.log" "$LOGS/$name.out"
}

wait_healthy() {
    local name="$1" deadline=$((SECONDS + START_TIMEOUT))
    # shellcheck disable=SC2046
    until healthy "$name"; do
        service_pid "$name" >/dev/null || die_with_log "$name exited during start-up" $(service_logs "$name")
        [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name did not answer within ${START_TIMEOUT}s" $(service_logs "$name")
        sleep 0.5
    done
}

start_gunicorn() {
    local name="$1" threads="$2"
    shift 2
    restart_if_changed "$name"
    if healthy "$name"; then
        return 0
    fi
    stop_service "$name" >/dev/null
    port_in_use "${BIND[$name]}" \
        && die "${BIND[$name]} is already in use by a process that is not this cloud's $name (see: ss -ltnp)"
    say "starting $name on ${BIND[$name]}"
    # 9>&-: the daemon must not inherit (and keep) this script's lock.
    env "$@" "$VENV/bin/gunicorn" \
        --daemon \
        --name "vtpm-aio-$name" \
        --bind "${BIND[$name]}" \
        --workers 1 \
        --threads "$threads" \
        --timeout 300 \
        --graceful-timeout 5 \
        --no-control-socket \
        --chdir "$HELPERS" \
        --pid "$RUN/$name.pid" \
        --error-logfile "$LOGS/$name.out" \
        --access-logfile "$LOGS/$name-access.log" \
        --access-logformat "$ACCESS_FORMAT" \
        "${WSGI[$name]}" 9>&- \
        || die_with_log "gunicorn for $name failed to start" "$LOGS/$name.out"
    local deadline=$((SECONDS + 15))
    until service_pid "$name" >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name: no gunicorn master came up" "$LOGS/$name.out"
        sleep 0.2
    done
    wait_healthy "$name"
    inputs_hash "$name" >"$RUN/$name.inputs"
}

# The namespace init of a test host (tools/test-hosts.sh), or nothing.
test_host_pid() {
    pid_if_matches "$HOSTS_DIR/$1/init.pid" "vtpm-test-host $1"
}

# The mount namespace of a test host ("none" when it is down).
test_host_mntns() {
    local pid
    pid="$(test_host_pid "$1")" && readlink "/proc/$pid/ns/mnt" || echo none
}

start_nova_service() {
    local name="$1" host pid cmd=()
    restart_if_changed "$name"
    if service_pid "$name" >/dev/null; then
        return 0
    fi
    say "starting $name"
    cmd=("$VENV/bin/$name" --config-file "$ETC/nova/nova.conf")
    host="${TEST_HOST[$name]:-}"
    if [ -n "$host" ]; then
        # Inside the test host's mount namespace: qemu:///system is that host's libvirtd,
        # and what Nova does to /var/lib/libvirt/swtpm (cold migration moves the TPM
        # state there through privsep) happens to that host's files.
        pid="$(test_host_pid "$host")" \
            || die "test host $host is not running (tools/test-hosts.sh start)"
        # tools/aio/nova_compute_multihost.py: nova-compute + libvirt's VIR_MIGRATE_UNSAFE
        # (the shared instances directory is a local one; see that file).
        cmd=(nsenter --target "$pid" --mount -- "$VENV/bin/python" "$HELPERS/nova_compute_multihost.py"
             --config-file "$ETC/nova/nova.conf" --config-file "$ETC/nova/compute-$host.conf")
    fi
    # nsenter (mount namespace only) and setsid exec: $! is nova-compute itself.
    setsid "${cmd[@]}" --log-file "$LOGS/$name.log" \
        >"$LOGS/$name.out" 2>&1 </dev/null 9>&- &
    echo $! >"$RUN/$name.pid"
    inputs_hash "$name" >"$RUN/$name.inputs"
    sleep 1
    # shellcheck disable=SC2046
    service_pid "$name" >/dev/null || die_with_log "$name exited at once" $(service_logs "$name")
}

# true while pid runs (a zombie, which nobody may reap here, counts as gone).
# --- Nova cells ---------------------------------------------------------------------------

compute_service() { case "$1" in vtpm-aio) echo nova-compute ;; *) echo "nova-compute-$1" ;; esac; }

discover_hosts() {
    local deadline=$((SECONDS + START_TIMEOUT)) log="$LOGS/discover-hosts.log" host svc hosts
    local nm=("$VENV/bin/nova-manage" --config-file "$ETC/nova/nova.conf")
    for host in "${COMPUTE_HOSTS[@]}"; do
        svc="$(compute_service "$host")"
        until hosts="$("${nm[@]}" cell_v2 list_hosts 2>>"$log")" && grep -q " $host " <<<"$hosts"; do
            "${nm[@]}" cell_v2 discover_hosts --verbose >>"$log" 2>&1 || true
            if ! service_pid "$svc" >/dev/null; then
                die_with_log "$svc exited during start-up" "$LOGS/$svc.log" "$LOGS/$svc.out"
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                die_with_log "$svc's host $host was not discovered within ${START_TIMEOUT}s" \
                    "$LOGS/$svc.log" "$log"
            fi
            sleep 2
        done
    done
}

# --- commands -----------------------------------------------------------------------------

all_up() {
    local name
    mariadb_healthy || return 1
    rabbit_healthy || return 1
    COMPUTE_DRIVER="$(compute_driver)"
    render_args
    helper render.py "${RENDER_ARGS[@]}" --check >/dev/null || return 1
    for name in "${GUNICORN_SERVICES[@]}" "${NOVA_SERVICES[@]}"; do
        healthy "$name" && current "$name" || return 1
    done
    [ -s "$AIO_DIR/clouds.yaml" ] && helper cloud.py status >/dev/null 2>&1
}

cmd_start() {
    local t0=$SECONDS
    command -v curl >/dev/null || ensure_apt
    if venv_current "$VENV" "$(venv_digest)" && all_up; then
        say "already running (compute driver $COMPUTE_DRIVER); credentials in $AIO_DIR/clouds.yaml"
        return 0
    fi
    ensure_prereqs
    bash "$REPO/tools/test-hosts.sh" start | sed 's/^/  /' \
        || die "the libvirt test hosts did not start (tools/test-hosts.sh start)"
    ensure_venv
    COMPUTE_DRIVER="$(compute_driver)"
    render_args
    say "compute driver: $COMPUTE_DRIVER"
    configure
    start_mariadb
    start_rabbitmq
    sync_databases
    say "registering users, services and endpoints in Keystone"
    helper provision.py || die "Keystone provisioning failed (see above)"
    start_gunicorn neutron-stub 1
    start_gunicorn placement-api 2 OS_PLACEMENT_CONFIG_DIR="$ETC/placement"
    start_gunicorn glance-api 2 OS_GLANCE_CONFIG_DIR="$ETC/glance"
    start_gunicorn nova-api 2 OS_NOVA_CONFIG_DIR="$ETC/nova" VTPM_AIO_NOVA_API_LOG="$LOGS/nova-api.log"
    start_gunicorn nova-api-plain 1 OS_NOVA_CONFIG_DIR="$ETC/nova" \
        OS_NOVA_CONFIG_FILES="api-paste-plain.ini;nova.conf" \
        VTPM_AIO_NOVA_API_LOG="$LOGS/nova-api-plain.log"
    local name
    for name in "${NOVA_SERVICES[@]}"; do
        start_nova_service "$name"
    done
    say "waiting for the nova-compute services to register and their hosts to be discovered"
    discover_hosts
    local pid host svc
    for host in "${COMPUTE_HOSTS[@]}"; do
        svc="$(compute_service "$host")"
        pid="$(service_pid "$svc")" \
            || die_with_log "$svc exited during start-up" "$LOGS/$svc.log" "$LOGS/$svc.out"
        helper cloud.py wait-compute --host "$host" --timeout "$START_TIMEOUT" --traits \
            --pid "$pid" --since "$(stat -c %Y "$RUN/$svc.pid")" \
            || die_with_log "the compute node of $host is not ready" "$LOGS/$svc.log" "$LOGS/$svc.out"
    done
    helper cloud.py zones || die "setting up the availability zones failed"
    helper cloud.py images --guest-dir "$GUEST_DIR" || die "uploading the test guest to Glance failed"
    say "up in $((SECONDS - t0)) s; credentials: $AIO_DIR/clouds.yaml (clouds owner, member, other, admin)"
    say "try: OS_CLIENT_CONFIG_FILE=$AIO_DIR/clouds.yaml $VENV/bin/openstack --os-cloud owner server list"
}

cmd_stop() {
    stop_services "${NOVA_SERVICES[@]}" "${GUNICORN_SERVICES[@]}"
    stop_rabbitmq
    stop_mariadb
}

# One compute, stopped and started again with this script's environment; nothing else is
# checked or started (the cloud is up: 'start' brought it up).
cmd_restart_compute() {
    local host="$1" name
    name="$(compute_service "$host")"
    case " ${NOVA_SERVICES[*]} " in
        *" $name "*) ;;
        *) die "no nova-compute for host '$host' here (${COMPUTE_HOSTS[*]})" ;;
    esac
    stop_service "$name" >/dev/null
    start_nova_service "$name"
    say "$name: started (pid $(service_pid "$name"))${VTPM_FAULT_AT:+ with VTPM_FAULT_AT=$VTPM_FAULT_AT}"
}

cmd_status() {
    local rc=0 name pid
    if pid="$(mariadb_pid)" && mariadb_healthy; then
        say "mariadb: running (pid $pid), answers at 127.0.0.1:3306"
    else
        say "mariadb: not running"
        rc=3
    fi
    if pid="$(rabbit_pid)" && rabbit_healthy; then
        say "rabbitmq: running (pid $pid)"
    else
        say "rabbitmq: not running"
        rc=3
    fi
    for name in "${GUNICORN_SERVICES[@]}" "${NOVA_SERVICES[@]}"; do
        if ! pid="$(service_pid "$name")"; then
            say "$name: not running"
            rc=3
        elif ! current "$name"; then
            say "$name: running (pid $pid) but started from older configuration or code ('start' restarts it)"
            rc=3
        elif healthy "$name"; then
            say "$name: running (pid $pid)${BIND[$name]:+, answers at http://${BIND[$name]}}"
        else
            say "$name: running (pid $pid) but not answering at http://${BIND[$name]}"
            rc=3
        fi
    done
    if [ "$rc" = 0 ]; then
        COMPUTE_DRIVER="$(compute_driver)"
        render_args
        helper render.py "${RENDER_ARGS[@]}" --check || rc=3
        helper cloud.py status || rc=3
    fi
    if [ -f "$ETC/nova/nova.conf" ]; then
        say "compute driver: $(sed -n 's/^compute_driver = //p' "$ETC/nova/nova.conf")"
    fi
    if [ -s "$AIO_DIR/clouds.yaml" ]; then
        say "credentials: $AIO_DIR/clouds.yaml"
    else
        say "credentials: not written yet"
        rc=3
    fi
    say "logs: $LOGS"
    return "$rc"
}

lock() { lock_dir "$AIO_DIR" 1200; }

case "$1" in
    restart-compute) [ $# -eq 2 ] || usage ;;
    *) [ $# -eq 1 ] || usage ;;
esac
umask 022
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$AIO_DIR/pycache"
case "$1" in
    venv | start | stop | restart-compute) lock ;;
esac
case "$1" in
    venv) ensure_venv ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart-compute) cmd_restart_compute "$2" ;;
    *) usage ;;
esac
