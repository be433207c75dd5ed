//! Interoperability with MQTT.js (the npm `mqtt` package, pinned by `conformance/setup.sh`):
//! QoS 0/1/2 round trips, a retained message and, in MQTT 5, user properties, over TCP and
//! WebSocket. The checks are in `mqttjs/check.cjs`; each run must exit 0.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, SETUP_HINT, run_with_timeout, workspace_dir};

/// Longest a run may take (it waits at most 10 s for any one thing).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn run(url: &str, version: &str) {
    let modules = workspace_dir().join("target/conformance-node/node_modules");
    assert!(modules.join("mqtt/package.json").exists(), "MQTT.js is missing ({}): {SETUP_HINT}", modules.display());
    let mut command = Command::new("node");
    command.env("NODE_PATH", &modules).arg(workspace_dir().join("conformance/mqtt/mqttjs/check.cjs")).args([
        "--url",
        url,
        "--version",
        version,
    ]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "MQTT.js checks failed ({url}, version {version}): {status}\n{stdout}{stderr}");
}

#[test]
fn mqttjs_mqttv311_and_mqttv5_over_tcp() {
    let broker = Broker::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.mqtt_port());
    run(&url, "4");
    run(&url, "5");
}

#[test]
fn mqttjs_mqttv5_over_websocket() {
    let broker = Broker::start();
    run(&format!("ws://127.0.0.1:{}/mqtt", broker.ws_port()), "5");
}
