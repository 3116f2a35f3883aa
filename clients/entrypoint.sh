#!/bin/sh
# An edge client: a Flower SuperNode with fedtune's long-running ClientApp worker,
# joining the SuperLink at $SUPERLINK (its Fleet API, host:port) over TLS.
#
#   SUPERLINK      host:port of the SuperLink's Fleet API, e.g. fl.example.org:9092
#   CA             the CA certificate that signed the SuperLink's (ca.pem)
#   KEY            this node's private key (its KEY.pub registered on the SuperLink)
#   PARTITION_ID   which data partition this node trains on (0 .. clients-1)
#   DEVICE         optional: this node's device profile (hardware catalogue name)
#   TORCH_DEVICE   optional: where it trains (auto, cpu, cuda, cuda:N; default: the run's model.device)
#   FLWR_HOME      optional: Flower's state for this node (default ~/.flwr)
#   REPLICA_DIR    optional: where FLoRA and FedKSeed keep this node's copy of the
#                  global model between rounds (default: the temporary directory)
#   PORT           optional: the SuperNode's local Runtime API port (default 9094;
#                  several nodes on one host need one each)
#
# Used by docker-compose.yml's supernode services; on a machine without Docker,
# set the variables and run it after ./setup.sh (with .venv/bin on PATH).
set -eu
exec fedtune deploy node \
    --superlink "${SUPERLINK:?set SUPERLINK to the SuperLink Fleet API, host:port}" \
    --ca "${CA:?set CA to the CA certificate, ca.pem}" \
    --key "${KEY:?set KEY to this node private key}" \
    --partition-id "${PARTITION_ID:?set PARTITION_ID}" \
    ${DEVICE:+--device "$DEVICE"} \
    ${TORCH_DEVICE:+--torch-device "$TORCH_DEVICE"} \
    ${REPLICA_DIR:+--replica-dir "$REPLICA_DIR"} \
    --flwr-home "${FLWR_HOME:-$HOME/.flwr}" \
    --port "${PORT:-9094}"
