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

# TODO(chunk store, issue #16): the backup-server and console flags land
# later today. What goes here, in this order:
#
# 1. Build: cargo build --release -p splitmirror-backup-server -p splitmirror-console
# 2. An array, a db-server and two backup servers sharing the store, e.g.
#      AWS_ENDPOINT_URL=$ENDPOINT_A target/release/backup-server --store "$STORE" ... &
#      AWS_ENDPOINT_URL=$ENDPOINT_B target/release/backup-server --store "$STORE" ... &
#    (or --s3-endpoint instead of AWS_ENDPOINT_URL), their PIDs added to
#    PIDS so that cleanup stops them.
# 3. Backups from both servers of the same volume (the second reads and
#    stores only changed chunks): console run ... --json, and record
#    chunks_read / chunks_reused / chunks_zero / new_bytes_stored and the
#    wall time of each run for BENCHMARKS.md.
# 4. console backup prune --volume V --keep-last 1 while a backup runs on
#    the other server; then the garbage collector.
# 5. backup-server verify --store "$STORE" ID for every kept backup, and
#    backup-server export + qemu-img compare against the frozen mate.
# 6. One node stopped (kill one of PIDS): backups still go through the
#    other two (replication factor 3, quorum 2).
echo "== TODO: backup servers, backups, prune and verify are not wired yet (see the TODO in $0)"
echo "garage-demo: cluster setup OK"
