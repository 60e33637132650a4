#!/usr/bin/env bash
# Make sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database "test")
# are running, installing them from Debian's packages when missing. The integration
# tests use them; the embedded `classify`/`eval` path needs neither.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt() {
  [ -n "${APT_UPDATED:-}" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if ! (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG); then
  command -v redis-server >/dev/null || need_apt redis-server
  mkdir -p /tmp/difflabel-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/difflabel-redis --logfile /tmp/difflabel-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
fi

if ! (command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432); then
  command -v pg_ctlcluster >/dev/null || need_apt postgresql
  ver=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
  if [ -z "$ver" ]; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
    $SUDO pg_createcluster "$ver" main >/dev/null
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
# tests/faults start private servers of their own on free ports: the binaries must be here too.
command -v redis-server >/dev/null || need_apt redis-server
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt postgresql
# trust auth for local TCP connections is how our machines are set up; create the db.
if ! psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1; then
  $SUDO -u postgres psql -qc "create database test" 2>/dev/null \
    || su postgres -c "psql -qc 'create database test'" 2>/dev/null || true
fi
echo "services: redis $(redis-cli -h 127.0.0.1 ping 2>/dev/null), postgres $(pg_isready -h 127.0.0.1 -p 5432 | sed 's/.*- //')"
