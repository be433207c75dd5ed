#!/usr/bin/env bash
# Driver of the real-process fault run (faults.py beside this file): makes the Python venv, installs
# iptables when missing, builds the release binary only when there is none, then runs faults.py as
# root. Its arguments are passed on, e.g.:
#
#   sudo scripts/cluster-faults/run.sh --duration-secs 60 --no-faults   # baseline
#   sudo scripts/cluster-faults/run.sh --duration-secs 600 --seed 7     # ten minutes of faults
#
# Exit status: faults.py's (0 pass, 1 lost / missed / reordered messages, other: the run failed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${WHARF_FAULTS_VENV:-/tmp/wharf-faults-venv}
BINARY=${WHARF_BINARY:-$REPO/target/release/wharf}

if [[ $(id -u) -ne 0 ]]; then
    echo "run.sh: needs root (network namespaces, iptables)" >&2
    exit 2
fi

if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
# Quiet when both are there already; pip only reaches PyPI otherwise.
if ! "$VENV/bin/python" -c 'import paho.mqtt, pika' 2>/dev/null; then
    "$VENV/bin/pip" install --quiet paho-mqtt pika
fi

if ! command -v iptables >/dev/null; then
    apt-get install -y iptables >/dev/null || { apt-get update >/dev/null && apt-get install -y iptables >/dev/null; }
fi

if [[ ! -x $BINARY ]]; then
    echo "run.sh: $BINARY missing; building it (about 4 minutes on 2 cores)" >&2
    (cd "$REPO" && cargo build --release)
fi

# faults.py removes what it set up, Ctrl-C included; this is the fallback when it could not
# (killed with SIGKILL, or a Python error before its own clean-up ran).
cleanup() {
    for i in 1 2 3; do
        if ip netns pids "wharf-faults-n$i" >/dev/null 2>&1; then
            for pid in $(ip netns pids "wharf-faults-n$i"); do kill -CONT "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "wharf-faults-n$i" 2>/dev/null || true
        fi
        ip link del "wfveth$i" 2>/dev/null || true
    done
    ip link del wfbr0 2>/dev/null || true
}
trap cleanup EXIT

"$VENV/bin/python" -u "$HERE/faults.py" --binary "$BINARY" --repo "$REPO" "$@"
