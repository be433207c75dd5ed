//! Interoperability with the Eclipse Paho Python client (paho-mqtt 2.1, MQTT 3.1.1 and 5): round
//! trips at QoS 0, 1 and 2, retained messages, the Will, persistent sessions, over TCP, WebSocket
//! (`/mqtt`) and TLS. The scenarios are in `paho/paho_check.py`, run with the venv made by
//! `conformance/setup.sh`; each must exit 0.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, python, run_with_timeout, workspace_dir};

/// Longest a scenario may take (each waits at most 10 s for any one thing).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach the broker.
struct Target<'a> {
    port: u16,
    transport: &'static str,
    tls_ca: Option<&'a Path>,
    /// Client certificate and key (mTLS).
    client: Option<(&'a Path, &'a Path)>,
}

/// Run one scenario; its exit status and output.
fn run_scenario(version: &str, target: &Target<'_>, scenario: &str) -> (std::process::ExitStatus, String) {
    let mut command = Command::new(python());
    command
        .arg(workspace_dir().join("conformance/mqtt/paho/paho_check.py"))
        .arg(scenario)
        .args(["--host", "127.0.0.1", "--port", &target.port.to_string(), "--version", version])
        .args(["--transport", target.transport]);
    if let Some(ca) = target.tls_ca {
        command.arg("--tls-ca").arg(ca);
    }
    if let Some((cert, key)) = target.client {
        command.arg("--client-cert").arg(cert).arg("--client-key").arg(key);
    }
    let (status, stdout, stderr) = run_with_timeout(&mut command, SCENARIO_TIMEOUT);
    (status, format!("{stdout}{stderr}"))
}

/// Run each scenario against the broker, then fail listing every scenario that failed.
fn run_scenarios(version: &str, target: &Target<'_>, scenarios: &[&str]) {
    let mut failures = Vec::new();
    for scenario in scenarios {
        let (status, output) = run_scenario(version, target, scenario);
        eprintln!("--- paho {scenario} (MQTT {version}, {}): {status}\n{output}", target.transport);
        if !status.success() {
            failures.push(format!("{scenario}: {status}\n{output}"));
        }
    }
    assert!(failures.is_empty(), "paho scenarios failed:\n{}", failures.join("\n"));
}

fn tcp_scenarios(version: &str) {
    python();
    let broker = Broker::start();
    let target = Target { port: broker.mqtt_port(), transport: "tcp", tls_ca: None, client: None };
    run_scenarios(version, &target, &["roundtrip", "retained", "will", "session"]);
}

fn websocket_scenarios(version: &str) {
    python();
    let broker = Broker::start();
    let target = Target { port: broker.ws_port(), transport: "websockets", tls_ca: None, client: None };
    run_scenarios(version, &target, &["roundtrip", "will"]);
}

fn tls_scenarios(version: &str) {
    python();
    let broker = Broker::builder().tls().start();
    let (port, files) = broker.tls().expect("the TLS listener");
    let target = Target { port, transport: "tcp", tls_ca: Some(&files.cert), client: None };
    run_scenarios(version, &target, &["roundtrip", "session"]);
}

#[test]
fn paho_mqttv311_roundtrip_retained_will_session() {
    tcp_scenarios("311");
}

#[test]
fn paho_mqttv5_roundtrip_retained_will_session() {
    tcp_scenarios("5");
}

#[test]
fn paho_mqttv311_over_websocket() {
    websocket_scenarios("311");
}

#[test]
fn paho_mqttv5_over_websocket() {
    websocket_scenarios("5");
}

#[test]
fn paho_mqttv311_over_tls() {
    tls_scenarios("311");
}

#[test]
fn paho_mqttv5_over_tls() {
    tls_scenarios("5");
}

/// mTLS: with `listeners.tls_client_ca_file` set, a client presenting a certificate signed by that
/// CA is served, and one presenting none is refused (the positive control runs first, on the same
/// broker).
#[test]
fn paho_mqttv5_over_mutual_tls() {
    let python = python();
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, ca_key) = (dir.path().join("client-ca.pem"), dir.path().join("client-ca.key"));
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    let output = Command::new(python)
        .arg(workspace_dir().join("conformance/mqtt/paho/paho_check.py"))
        .arg("gen-client-cert")
        .arg("--cert")
        .arg(&ca)
        .arg("--key")
        .arg(&ca_key)
        .arg("--client-cert")
        .arg(&cert)
        .arg("--client-key")
        .arg(&key)
        .output()
        .expect("run python");
    assert!(output.status.success(), "gen-client-cert failed: {}", String::from_utf8_lossy(&output.stderr));
    let broker = Broker::builder().tls().env("WHARF__LISTENERS__TLS_CLIENT_CA_FILE", ca.display()).start();
    let (port, files) = broker.tls().expect("the TLS listener");
    let with_cert = Target { port, transport: "tcp", tls_ca: Some(&files.cert), client: Some((&cert, &key)) };
    let (status, output) = run_scenario("5", &with_cert, "roundtrip");
    assert!(status.success(), "a client with a certificate from the client CA must be served:\n{output}");
    let without_cert = Target { port, transport: "tcp", tls_ca: Some(&files.cert), client: None };
    let (status, output) = run_scenario("5", &without_cert, "roundtrip");
    assert!(!status.success(), "a client without a certificate must be refused:\n{output}");
}
