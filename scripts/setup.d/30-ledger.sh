#!/usr/bin/env bash
# Ledger test services: PostgreSQL (trust auth, user postgres, database "test") and Redis on 127.0.0.1.
# Idempotent; works as root on a fresh Debian machine; does nothing when both already answer.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
if ((${#need_apt[@]})); then
  echo "[30-ledger] installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "[30-ledger] starting redis-server on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
  if [[ -z "$version" ]]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    pg_createcluster "$version" main >/dev/null
  fi
  conf=/etc/postgresql/$version/main
  # trust auth on loopback for the test user (CI and developers' machines only)
  if ! grep -q "nectar-ledger" "$conf/pg_hba.conf"; then
    sed -i '1i # nectar-ledger: trust on loopback for tests\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$conf/pg_hba.conf"
  fi
  echo "[30-ledger] starting PostgreSQL $version"
  pg_ctlcluster "$version" main start || pg_ctlcluster "$version" main reload
  for _ in $(seq 100); do psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
fi
for db in test root; do
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname='$db'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database \"$db\""
done

echo "[30-ledger] redis and postgresql ready"
