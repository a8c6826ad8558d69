#!/usr/bin/env bash
# The container scenario end to end: build the image, `up -d`, wait until
# every node is healthy and the console's first report says verified, run
# one more backup by hand, kill and restart db-server and check that the
# next run still verifies, then `down -v`. Cleans up even when it fails.
# Prints the image size and the time from `up` to the first verified report.
set -euo pipefail
cd "$(dirname "$0")/.."
project="splitmirror-test-$$"

if docker compose version >/dev/null 2>&1; then
  compose() { docker compose -p "$project" "$@"; }
  flavour="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then
  compose() { docker-compose -p "$project" "$@"; }
  flavour="docker-compose"
else
  echo "FAIL: neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
echo "using $flavour"

cleanup() {
  local status=$?
  if [ $status -ne 0 ]; then
    echo "--- logs (failure) ---"
    compose logs --tail 60 2>&1 || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  exit $status
}
trap cleanup EXIT

# Waits up to $2 seconds for a command to succeed.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "FAIL: timed out after ${seconds}s waiting for $what" >&2
      return 1
    fi
    sleep 1
  done
}

healthy() {
  local service=$1 id
  id=$(compose ps -q "$service")
  [ -n "$id" ] && [ "$(docker inspect --format '{{.State.Health.Status}}' "$id")" = healthy ]
}

verified_reports() {
  compose logs --no-color console 2>/dev/null | grep -cE 'verified +yes' || true
}

first_report() { [ "$(verified_reports)" -ge 1 ]; }

docker/build-image.sh 2>/dev/null
echo "image size: $(docker image inspect splitmirror:latest --format '{{.Size}}') bytes"

# One scheduled run, then the console service exits: the runs by hand
# below must not meet a scheduled run holding the snapshot (a second run of
# the same volume is refused while one holds it; since #18 paces the
# backup, a scheduled run held it for half of every 5 s and CI's run by
# hand was refused).
export SPLITMIRROR_RUN_INTERVAL=5s SPLITMIRROR_RUNS=1 SPLITMIRROR_LU_SIZE=64MiB
# Publish on ephemeral host ports, so the test never collides with nodes
# already running here.
export SPLITMIRROR_ARRAY_PUBLISH=127.0.0.1: SPLITMIRROR_DB_PUBLISH=127.0.0.1: SPLITMIRROR_BACKUP_PUBLISH=127.0.0.1:
started=$(date +%s.%N)
compose up -d
for service in array-node db-server backup-server; do
  wait_for "$service to be healthy" 120 healthy "$service"
done
wait_for "the console's first verified report" 180 first_report
echo "up → first verified report: $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
if compose logs --no-color console | grep -q 'backup run .* FAILED'; then
  echo "FAIL: a scheduled run failed" >&2
  exit 1
fi

run_by_hand() {
  local out err status=0
  err=$(mktemp)
  out=$(compose run --rm -T console run --volume 0 --json 2>"$err" | tail -n 1) || status=$?
  if [ "$status" -ne 0 ] || ! echo "$out" | grep -q '"verified":true'; then
    echo "FAIL: run by hand (exit $status): $out" >&2
    tail -n 20 "$err" >&2
    rm -f "$err"
    return 1
  fi
  rm -f "$err"
  echo "run by hand verified: $(echo "$out" | grep -o '"backup_id":"[^"]*"')"
}
run_by_hand

if command -v grpcurl >/dev/null 2>&1; then
  # Mutual TLS: the certificates the `certs` service made, as the README
  # shows; without one, the node refuses.
  certs=$(mktemp -d)
  docker cp "$(compose ps -q db-server):/certs/." "$certs" >/dev/null
  tls=(-cacert "$certs/ca.pem" -cert "$certs/console.pem" -key "$certs/console.key")
  db_port=$(compose port db-server 50052)
  grpcurl "${tls[@]}" "$db_port" list | grep -q splitmirror.db.v1.DbService
  grpcurl "${tls[@]}" "$db_port" splitmirror.db.v1.DbService/Status | grep -q '"dataMode"'
  if grpcurl -cacert "$certs/ca.pem" "$db_port" list >/dev/null 2>&1; then
    echo "FAIL: grpcurl without a certificate was answered" >&2
    exit 1
  fi
  rm -rf "$certs"
  echo "grpcurl with the console's certificate through the published port $db_port: OK (refused without one)"
else
  echo "grpcurl not installed: skipping the grpcurl check"
fi

compose kill db-server
compose start db-server
wait_for "db-server to be healthy again" 120 healthy db-server
run_by_hand

backups=$(compose run --rm -T --entrypoint /usr/local/bin/backup-server backup-server list --store /data/backups 2>/dev/null | wc -l)
echo "backups in the backup volume: $backups"
[ "$backups" -ge 3 ] || { echo "FAIL: expected at least 3 backups in the volume" >&2; exit 1; }
echo "compose scenario: OK"
