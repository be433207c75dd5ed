//! `wharf bench` against a Wharf it starts (the conformance harness's `Broker`): its counts are
//! checked, not its speed. A run of N messages at QoS 1 / with confirms reports N sent, N
//! received, none lost or duplicated (MQTT, AMQP and the native API); fan-out multiplies what is expected; a rate caps what is
//! sent; a broker that is not there, or refuses the client, is a clear failure.

#[path = "../conformance/mqtt/harness.rs"]
#[allow(dead_code, reason = "shared with the conformance suites; the bench tests use part of it")]
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Broker, run_with_timeout};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `wharf bench <args> --json` and parse its report; panics with the output on failure.
fn bench(broker: &Broker, protocol: &str, args: &[&str]) -> serde_json::Value {
    let port = match protocol {
        "mqtt" => broker.mqtt_port(),
        "native" => broker.native_port(),
        _ => broker.amqp_port(),
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    command.args(["bench", protocol, "--port", &port.to_string(), "--json"]).args(args);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "wharf bench {protocol} {args:?} failed: {status}\n{stdout}{stderr}\n{}", broker.log());
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("not a JSON report ({error}):\n{stdout}"))
}

fn count(report: &serde_json::Value, field: &str) -> u64 {
    report[field].as_u64().unwrap_or_else(|| panic!("no {field} in {report}"))
}

/// Every expected delivery arrived once.
fn assert_complete(report: &serde_json::Value, sent: u64, expected: u64) {
    assert_eq!(count(report, "sent"), sent, "{report}");
    assert_eq!(count(report, "expected"), expected, "{report}");
    assert_eq!(count(report, "received"), expected, "{report}");
    assert_eq!((count(report, "lost"), count(report, "duplicates")), (0, 0), "{report}");
    assert!(report["latency_micros"]["p50"].as_u64().is_some_and(|p50| p50 > 0), "{report}");
}

#[test]
fn bench_mqtt_qos1_reports_every_message_received_and_none_lost() {
    let broker = Broker::start();
    let report = bench(&broker, "mqtt", &["--qos", "1", "--count", "500", "--publishers", "2", "--subscribers", "2"]);
    assert_complete(&report, 500, 500);
    assert_eq!(report["mode"], "qos 1");
}

#[test]
fn bench_mqtt_qos2_fan_out_expects_a_copy_per_subscriber() {
    let broker = Broker::start();
    let args = ["--qos", "2", "--count", "200", "--subscribers", "3", "--layout", "fan-out", "--size-bytes", "1024"];
    let report = bench(&broker, "mqtt", &args);
    assert_complete(&report, 200, 600);
}

#[test]
fn bench_mqtt_with_idempotency_keys_publishes_over_mqtt5_and_loses_nothing() {
    let broker = Broker::start();
    for qos in ["1", "2"] {
        let args = ["--qos", qos, "--count", "300", "--publishers", "2", "--subscribers", "2", "--idempotency-keys"];
        let report = bench(&broker, "mqtt", &args);
        // Every key is new: no duplicate verdict (which would count as refused).
        assert_complete(&report, 300, 300);
        assert_eq!(count(&report, "refused"), 0, "{report}");
    }
}

#[test]
fn bench_amqp_confirms_reports_every_message_received_and_none_lost() {
    let broker = Broker::start();
    let report = bench(&broker, "amqp", &["--confirms", "--count", "500", "--publishers", "2", "--subscribers", "2"]);
    assert_complete(&report, 500, 500);
    assert_eq!(report["mode"], "confirms, persistent");
}

#[test]
fn bench_amqp_fan_out_with_idempotency_keys_and_multi_acks() {
    let broker = Broker::start();
    let args = [
        "--confirms",
        "--count",
        "300",
        "--subscribers",
        "2",
        "--layout",
        "fan-out",
        "--idempotency-keys",
        "--multi-ack-every",
        "25",
    ];
    let report = bench(&broker, "amqp", &args);
    assert_complete(&report, 300, 600);
}

#[test]
fn bench_amqp_fan_in_consumers_share_one_queue() {
    let broker = Broker::start();
    let args = ["--confirms", "--count", "300", "--publishers", "3", "--subscribers", "2", "--layout", "fan-in"];
    let report = bench(&broker, "amqp", &args);
    assert_complete(&report, 300, 300);
}

#[test]
fn bench_native_reports_every_message_received_and_none_lost() {
    let broker = Broker::start();
    let report = bench(&broker, "native", &["--count", "500", "--publishers", "2", "--subscribers", "2"]);
    assert_complete(&report, 500, 500);
    assert_eq!(report["protocol"], "native");
}

#[test]
fn bench_native_fan_out_with_idempotency_keys_small_credit_and_batches() {
    let broker = Broker::start();
    let args = [
        "--count",
        "300",
        "--subscribers",
        "3",
        "--layout",
        "fan-out",
        "--idempotency-keys",
        "--credit",
        "7",
        "--batch",
        "16",
    ];
    let report = bench(&broker, "native", &args);
    assert_complete(&report, 300, 900);
    assert_eq!(count(&report, "refused"), 0, "every key is new: {report}");
}

#[test]
fn bench_rate_caps_what_is_sent() {
    let broker = Broker::start();
    let args = ["--qos", "1", "--rate-per-sec", "200", "--duration-secs", "1"];
    let report = bench(&broker, "mqtt", &args);
    let sent = count(&report, "sent");
    // 200 a second for one second is at most 200 scheduled messages (the first at time 0).
    assert!((1..=200).contains(&sent), "{report}");
    assert_eq!((count(&report, "received"), count(&report, "lost")), (sent, 0), "{report}");
}

#[test]
fn bench_against_no_broker_fails_with_a_clear_error() {
    let port = harness::free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    command.args(["bench", "amqp", "--port", &port.to_string(), "--count", "1"]);
    let (status, _stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not connect") || stderr.contains("no connection"), "{stderr}");
}

#[test]
fn bench_amqp_reports_the_brokers_refusal() {
    let broker = Broker::start();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    let port = broker.amqp_port().to_string();
    command.args(["bench", "amqp", "--port", &port, "--password", "not-the-password", "--count", "1"]);
    let (status, _stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("403"), "the broker's reply code is shown: {stderr}");
}

#[test]
fn bench_mqtt_holds_idle_connections_through_the_run() {
    let broker = Broker::start();
    let report = bench(&broker, "mqtt", &["--qos", "1", "--count", "50", "--idle-connections", "25"]);
    assert_complete(&report, 50, 50);
    assert_eq!(count(&report, "idle_connections"), 25, "{report}");
}
