#!/usr/bin/env bash
# The chunk store on a real distributed object store: a three-node Garage
# cluster on loopback (replication factor 3, one zone per node), one bucket
# and one key, then two backup servers writing to the same bucket through
# different Garage nodes, backups from both, a prune, and a verify.
#
# Garage is not installed by .ci/run (building it takes far too long for
# CI); without the `garage` binary this script says how to get it and
# exits 0, skipped.
#
#   scripts/garage-demo.sh            # run, then stop the cluster
#   KEEP=1 scripts/garage-demo.sh     # leave the cluster running
#   GARAGE_DEMO_PORT=4900 scripts/garage-demo.sh   # another port range
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE=${GARAGE:-garage}
if ! command -v "$GARAGE" >/dev/null 2>&1; then
  cat <<'EOF'
garage-demo: skipped: the `garage` binary is not installed.
Install it (Garage 2.5.0; the build compiles the bundled LMDB and SQLite,
so it needs a C compiler and takes a long while):
    cargo install garage --version 2.5.0 --locked
or download a static binary from https://garagehq.deuxfleurs.fr/download/
and put it on PATH (or set GARAGE=/path/to/garage).
EOF
  exit 0
fi

BASE_PORT=${GARAGE_DEMO_PORT:-3900}
BUCKET=splitmirror-backups
KEY_NAME=splitmirror-demo
REGION=garage
WORK=$(mktemp -d "${TMPDIR:-/tmp}/garage-demo.XXXXXX")
# Shared by the three nodes: it authenticates the cluster's RPC.
RPC_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
PIDS=()

cleanup() {
  local status=$?
  if [ "${KEEP:-0}" = 1 ] && [ "$status" -eq 0 ]; then
    echo "KEEP=1: the cluster keeps running (pids ${PIDS[*]}); data in $WORK"
    return
  fi
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    echo "garage-demo FAILED (status $status); node logs kept in $WORK/node*/garage.log"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# Node N (1..3) listens on BASE+10(N-1): +0 S3 API, +1 RPC, +3 admin API.
s3_port() { echo $((BASE_PORT + 10 * ($1 - 1))); }
rpc_port() { echo $((BASE_PORT + 10 * ($1 - 1) + 1)); }
admin_port() { echo $((BASE_PORT + 10 * ($1 - 1) + 3)); }
g() { local node=$1; shift; "$GARAGE" -c "$WORK/node$node/garage.toml" "$@"; }

echo "== garage: $("$GARAGE" --version 2>&1 | head -n1); three nodes in $WORK"
for n in 1 2 3; do
  mkdir -p "$WORK/node$n/meta" "$WORK/node$n/data"
  cat >"$WORK/node$n/garage.toml" <<EOF
metadata_dir = "$WORK/node$n/meta"
data_dir = "$WORK/node$n/data"
db_engine = "lmdb"
replication_factor = 3
consistency_mode = "consistent"

rpc_bind_addr = "127.0.0.1:$(rpc_port "$n")"
rpc_public_addr = "127.0.0.1:$(rpc_port "$n")"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$(s3_port "$n")"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$(admin_port "$n")"
EOF
  RUST_LOG=${RUST_LOG:-garage=info} "$GARAGE" -c "$WORK/node$n/garage.toml" server \
    >"$WORK/node$n/garage.log" 2>&1 &
  PIDS+=($!)
done

# Waits until COMMAND succeeds (up to SECONDS), showing its last output on
# failure.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >"$WORK/last.out" 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "gave up waiting for $what after ${seconds}s:"
      cat "$WORK/last.out"
      return 1
    fi
    sleep 1
  done
}

echo "== the nodes answer"
for n in 1 2 3; do
  wait_for "node $n" 30 g "$n" status
done

echo "== node 1 connects to nodes 2 and 3"
declare -A NODE_ID
for n in 1 2 3; do
  NODE_ID[$n]=$(g "$n" node id -q)
done
g 1 node connect "${NODE_ID[2]}"
g 1 node connect "${NODE_ID[3]}"

echo "== layout: one zone per node, 1 GB each, replication factor 3"
for n in 1 2 3; do
  g 1 layout assign -z "dc$n" -c 1G "${NODE_ID[$n]%@*}"
done
g 1 layout apply --version 1
g 1 status

echo "== bucket $BUCKET and key $KEY_NAME"
# The new layout reaches every node within seconds; until then bucket
# creation can be refused.
wait_for "the layout" 60 g 1 bucket create "$BUCKET"
g 1 key create "$KEY_NAME" >/dev/null
g 1 bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME"
KEY_ID=$(g 1 key info "$KEY_NAME" --key-id)
KEY_SECRET=$(g 1 key info "$KEY_NAME" --secret-key)
g 1 bucket info "$BUCKET"

echo "== the cluster is ready"
echo "   S3 endpoints: $(for n in 1 2 3; do printf 'http://127.0.0.1:%s ' "$(s3_port "$n")"; done)"
echo "   bucket $BUCKET, key $KEY_ID, region $REGION"

# Both backup servers use the same bucket and prefix (one chunk store),
# each through another Garage node. The secret goes in the environment,
# never on a command line.
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$KEY_SECRET
export AWS_REGION=$REGION
STORE="s3://$BUCKET/demo"
ENDPOINT_A="http://127.0.0.1:$(s3_port 1)"
ENDPOINT_B="http://127.0.0.1:$(s3_port 2)"
echo "   store $STORE: backup server A via $ENDPOINT_A, B via $ENDPOINT_B"

echo "== splitmirror: an array, a db-server with its ledger, two backup servers on one bucket"
cargo build --release -q -p splitmirror-array-node -p splitmirror-db-server \
  -p splitmirror-backup-server -p splitmirror-console
BIN=target/release
SM=$WORK/splitmirror
"$BIN/console" certs init "$SM/certs" >/dev/null
export SPLITMIRROR_TLS_DIR=$SM/certs
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_REGION=$REGION
STORE=s3://$BUCKET/demo
ARRAY=127.0.0.1:$((BASE_PORT + 51))
DB=127.0.0.1:$((BASE_PORT + 52))
BACKUP_A=127.0.0.1:$((BASE_PORT + 53))
BACKUP_B=127.0.0.1:$((BASE_PORT + 54))
"$BIN/array-node" --listen "$ARRAY" --data-dir "$SM/array" --lu-size "${LU_SIZE:-256MiB}" \
  >"$SM.array.log" 2>&1 &
PIDS+=($!)
"$BIN/db-server" --listen "$DB" --array "$ARRAY" --data-dir "$SM/db" --workload-tps 200 \
  >"$SM.db.log" 2>&1 &
PIDS+=($!)
# Each backup server talks to a different Garage node.
"$BIN/backup-server" --listen "$BACKUP_A" --array "$ARRAY" --db "$DB" --store "$STORE" \
  --s3-endpoint "http://127.0.0.1:$(s3_port 1)" --gc-grace 30s >"$SM.backup-a.log" 2>&1 &
PIDS+=($!)
"$BIN/backup-server" --listen "$BACKUP_B" --array "$ARRAY" --db "$DB" --store "$STORE" \
  --s3-endpoint "http://127.0.0.1:$(s3_port 2)" --gc-grace 30s >"$SM.backup-b.log" 2>&1 &
PIDS+=($!)
for addr in "$ARRAY" "$DB" "$BACKUP_A" "$BACKUP_B"; do
  wait_for "the node at $addr" 60 "$BIN/console" --array "$ARRAY" --db "$DB" --backup "$addr" status
done

run() { # run SERVER LABEL: one backup run through one backup server
  local server=$1 label=$2 t0=$SECONDS
  "$BIN/console" --array "$ARRAY" --db "$DB" --backup "$server" run --volume 0 --label "$label" \
    --json >"$SM/run-$label.json"
  python3 - "$SM/run-$label.json" "$label" "$((SECONDS - t0))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {sys.argv[2]:<10} {sys.argv[3]:>4} s  read {r['chunks_read']:>5}  reused {r['chunks_reused']:>5}"
      f"  zero {r['chunks_zero']:>5}  new bytes stored {r['new_bytes_stored']:>12}  backup {r['backup_id']}")
PY
}

echo "== backups from both servers into one bucket (the later ones store only what changed)"
run "$BACKUP_A" a-1
run "$BACKUP_B" b-1
run "$BACKUP_A" a-2
run "$BACKUP_B" b-2

echo "== prune to the newest backup while server B backs up again, then collect garbage"
run "$BACKUP_B" b-3 &
RUNNING=$!
"$BIN/console" --array "$ARRAY" --db "$DB" --backup "$BACKUP_A" backup prune --volume 0 --keep-last 1
wait "$RUNNING"

echo "== every kept backup verifies (each chunk re-read from Garage and re-hashed)"
"$BIN/console" --array "$ARRAY" --db "$DB" --backup "$BACKUP_A" backup list
for id in $("$BIN/backup-server" list --store "$STORE" --s3-endpoint "http://127.0.0.1:$(s3_port 3)" \
  | awk '{print $1}' | grep -v '^store$'); do
  "$BIN/backup-server" verify --store "$STORE" --s3-endpoint "http://127.0.0.1:$(s3_port 3)" "$id"
done

echo "== one Garage node stopped: a backup still goes through the other two"
kill "${PIDS[2]}"
run "$BACKUP_A" a-3
echo "garage-demo: OK"
