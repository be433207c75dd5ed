#!/usr/bin/env bash
# Installs what the black-box conformance tests need besides the Rust toolchain, and nothing when
# it is already there (safe to run before every test run; .ci/run does):
#   - Mosquitto's command-line clients (mosquitto_pub, mosquitto_sub) from the distribution's
#     mosquitto-clients package, with apt-get (as root, or through sudo);
#   - MQTT.js (npm package mqtt, pinned) under target/conformance-node, with the machine's Node.js;
#   - a Python venv at target/conformance-venv with paho-mqtt 2.1.x, pika 1.3.x, grpcio,
#     grpcio-tools and grpcio-status (the native API from Python, stubs generated from the .proto),
#     and cryptography (used to make a TLS certificate when the openssl command is missing), from
#     PyPI.
# The tests find the venv at <workspace>/target/conformance-venv/bin/python and fail, naming this
# script, when something is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/conformance-venv
PAHO_REQUIREMENT='paho-mqtt>=2.1,<2.2'
PIKA_REQUIREMENT='pika>=1.3,<1.4'
GRPC_REQUIREMENTS=('grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2' 'grpcio-status>=1.60,<2')

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "conformance/setup.sh: root (or sudo) is needed to run: $*" >&2
        return 1
    fi
}

# --- mosquitto-clients ----------------------------------------------------------------------------
if command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1; then
    echo "mosquitto-clients: present ($(command -v mosquitto_pub))"
else
    echo "mosquitto-clients: installing with apt-get"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients
fi

# --- Python venv with paho-mqtt -------------------------------------------------------------------
venv_ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import sys
import cryptography  # noqa: F401
import pika  # noqa: F401
import grpc  # noqa: F401
import grpc_status  # noqa: F401
import grpc_tools  # noqa: F401
import paho.mqtt
sys.exit(0 if paho.mqtt.__version__.startswith("2.1.") else 1)
EOF
}

if venv_ready; then
    echo "python venv: present ($VENV, paho-mqtt $("$VENV/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)'))"
else
    python=${PYTHON:-}
    if [ -z "$python" ]; then
        for candidate in python3.11 python3; do
            if command -v "$candidate" >/dev/null 2>&1; then
                python=$candidate
                break
            fi
        done
    fi
    if [ -z "$python" ]; then
        echo "conformance/setup.sh: no python3 found (set PYTHON=/path/to/python3)" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "python venv: creating $VENV with $python ($("$python" --version 2>&1))"
        mkdir -p target
        if ! "$python" -m venv "$VENV"; then
            # Distributions that split ensurepip out of python3: use virtualenv instead.
            rm -rf "$VENV"
            "$python" -m pip install --quiet --user virtualenv
            "$python" -m virtualenv "$VENV"
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PAHO_REQUIREMENT" "$PIKA_REQUIREMENT" "${GRPC_REQUIREMENTS[@]}" cryptography
    if ! venv_ready; then
        echo "conformance/setup.sh: $VENV still lacks paho-mqtt 2.1, pika, grpcio or cryptography" >&2
        exit 1
    fi
    echo "python venv: ready ($VENV, paho-mqtt $("$VENV/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)'))"
fi

# --- MQTT.js (npm) --------------------------------------------------------------------------------
NODE_DIR=target/conformance-node
MQTTJS_VERSION=5.16.0
if [ -f "$NODE_DIR/node_modules/mqtt/package.json" ] \
    && grep -q "\"version\": \"$MQTTJS_VERSION\"" "$NODE_DIR/node_modules/mqtt/package.json"; then
    echo "MQTT.js: present ($NODE_DIR, mqtt $MQTTJS_VERSION)"
else
    if ! command -v npm >/dev/null 2>&1; then
        echo "Node.js/npm: installing with apt-get"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
    fi
    echo "MQTT.js: installing mqtt@$MQTTJS_VERSION into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error "mqtt@$MQTTJS_VERSION"
fi
