#!/usr/bin/env bash
# Makes sure the services the tests use are up: MariaDB on 127.0.0.1:3306
# (root, empty password) and Mosquitto on 127.0.0.1:1883. Starts what is not
# running; installs from Debian's packages what is absent. Idempotent.
#
# Also installs (never starts) what the cluster tests start for themselves
# (tests/src/clusters.rs): galera-4, rsync and iproute2 (ss) for a 3-node
# MariaDB Galera cluster, nats-server for a 3-node NATS cluster with MQTT,
# haproxy in front of Galera, mosquitto-clients for poking at brokers by hand.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
    log "nothing listens on 127.0.0.1:$1 after 30 s"; return 1
}

APT_UPDATED=
apt_install() {
    log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists are fetched once per run, and only when something is missing.
    if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
    apt-get install -y -qq "$@" >/dev/null
}

have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

# Installed only: each cluster test starts (and kills) its own nodes on free
# loopback ports below 32768. Debian's policy-rc.d, where present, keeps the
# packages' own services from starting at install.
ensure_cluster_tools() {
    local missing=()
    [ -e /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4)
    have rsync || missing+=(rsync)
    # wsrep_sst_rsync finds its rsync daemon's port with ss (or lsof, sockstat).
    have ss || missing+=(iproute2)
    have nats-server || missing+=(nats-server)
    have haproxy || missing+=(haproxy)
    have mosquitto_pub || missing+=(mosquitto-clients)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_mariadb() {
    if ! port_open 3306; then
        command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        log "starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
        wait_port 3306
    fi
    # A fresh Debian install lets root in through the unix socket only.
    if ! mysql -uroot -h127.0.0.1 -e 'SELECT 1' >/dev/null 2>&1; then
        log "allowing root@127.0.0.1 with an empty password"
        mysql -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
    fi
    mysql -uroot -h127.0.0.1 -e 'CREATE DATABASE IF NOT EXISTS test'
}

ensure_mosquitto() {
    if ! port_open 1883; then
        command -v mosquitto >/dev/null || apt_install mosquitto mosquitto-clients
        log "starting Mosquitto"
        mosquitto -d -c /etc/mosquitto/mosquitto.conf
        wait_port 1883
    fi
}

ensure_mariadb
ensure_mosquitto
ensure_cluster_tools
log "MariaDB and Mosquitto are up"
