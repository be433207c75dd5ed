//! Interoperability with Mosquitto's command-line clients (`mosquitto_pub`, `mosquitto_sub` from
//! Debian's `mosquitto-clients`, installed by `conformance/setup.sh`): the README example with
//! `-V mqttv311` and `-V mqttv5`, and retained messages with `-r`.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Broker, require_program, run_with_timeout};

/// Longest wait for a client to do its part.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

fn mosquitto_pub(broker: &Broker, version: &str, args: &[&str]) {
    let mut command = Command::new("mosquitto_pub");
    command.args(["-h", "127.0.0.1", "-p", &broker.mqtt_port().to_string(), "-V", version]).args(args);
    let (status, stdout, stderr) = run_with_timeout(&mut command, CLIENT_TIMEOUT);
    assert!(status.success(), "mosquitto_pub {args:?} failed with {status}\n{stdout}{stderr}");
}

/// The README example: `mosquitto_sub -t 'sensors/#' -C 1 -v` receives what `mosquitto_pub -t
/// sensors/temp -m 21.5 -q 1` sends. mosquitto_sub does not say when its subscription is in place
/// (its output is buffered on a pipe), so the message is published every 300 ms until it exits
/// after the first one it receives.
fn readme_example(version: &str) {
    require_program("mosquitto_sub");
    require_program("mosquitto_pub");
    let broker = Broker::start();
    let port = broker.mqtt_port().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", "sensors/#", "-C", "1", "-v", "-W", "20"])
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("start mosquitto_sub");
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut published = 0;
    let status = loop {
        if let Some(status) = sub.try_wait().expect("poll mosquitto_sub") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = sub.kill();
            let _ = sub.wait();
            panic!(
                "mosquitto_sub -V {version} received nothing from {published} mosquitto_pub runs within {CLIENT_TIMEOUT:?}\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        mosquitto_pub(&broker, version, &["-t", "sensors/temp", "-m", "21.5", "-q", "1"]);
        published += 1;
        std::thread::sleep(Duration::from_millis(300));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "mosquitto_sub -V {version} exited with {status}\n{stdout}{stderr}");
    assert_eq!(stdout.trim_end(), "sensors/temp 21.5", "mosquitto_sub -V {version} output\n{stderr}");
}

/// `mosquitto_pub -r` stores a retained message a later `mosquitto_sub` gets (RETAIN 1); `-r -n`
/// clears it.
fn retained(version: &str) {
    require_program("mosquitto_sub");
    require_program("mosquitto_pub");
    let broker = Broker::start();
    let port = broker.mqtt_port().to_string();
    let sub = |args: &[&str]| {
        let mut command = Command::new("mosquitto_sub");
        command.args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-t", "sensors/#", "-q", "1"]).args(args);
        run_with_timeout(&mut command, CLIENT_TIMEOUT)
    };
    mosquitto_pub(&broker, version, &["-t", "sensors/temp", "-m", "21.5", "-q", "1", "-r"]);
    let (status, stdout, stderr) = sub(&["-C", "1", "-W", "10", "-F", "%r %q %t %p"]);
    assert!(status.success(), "mosquitto_sub -V {version} exited with {status}\n{stdout}{stderr}");
    assert_eq!(stdout.trim(), "1 1 sensors/temp 21.5", "retained message (RETAIN, QoS, topic, payload)\n{stderr}");

    // Clear sensors/temp; sensors/hum is the control that retained delivery still works.
    mosquitto_pub(&broker, version, &["-t", "sensors/temp", "-n", "-q", "1", "-r"]);
    mosquitto_pub(&broker, version, &["-t", "sensors/hum", "-m", "40", "-q", "1", "-r"]);
    // -W 2: collect everything for two seconds (mosquitto_sub then exits with a timeout status).
    let (_, stdout, stderr) = sub(&["-W", "2", "-v"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, vec!["sensors/hum 40"], "retained messages after clearing sensors/temp\n{stderr}");
}

#[test]
fn mosquitto_readme_example_mqttv311() {
    readme_example("mqttv311");
}

#[test]
fn mosquitto_readme_example_mqttv5() {
    readme_example("mqttv5");
}

#[test]
fn mosquitto_retained_mqttv311() {
    retained("mqttv311");
}

#[test]
fn mosquitto_retained_mqttv5() {
    retained("mqttv5");
}
