//! The runnable examples, run against the real binary: `examples/payments` with chaos (the
//! processor and the broker killed and restarted at random points) must apply every order exactly
//! once and balance its ledger; `examples/iot-telemetry` must deliver every reading once, the
//! will, and the retained statuses; `examples/request-reply` must answer every request across
//! protocols.

#[path = "../examples/common/broker.rs"]
#[allow(dead_code, reason = "shared by the examples; the test uses part of it")]
mod broker;

#[path = "../examples/payments/run.rs"]
mod payments;

#[path = "../examples/iot-telemetry/run.rs"]
mod iot_telemetry;

#[path = "../examples/request-reply/run.rs"]
mod request_reply;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_with_chaos_applies_every_order_exactly_once() {
    let options = payments::Options {
        wharf: env!("CARGO_BIN_EXE_wharf").into(),
        orders: 150,
        chaos: true,
        seed: 7,
        timeout: Duration::from_secs(150),
    };
    let report = payments::run(options).await.expect("the example runs");
    println!("{}", report.text());
    assert!(report.ok(), "{}", report.text());
    assert!(report.broker_kills > 0 && report.processor_kills > 0, "faults were injected: {}", report.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iot_telemetry_delivers_every_reading_the_will_and_the_retained_statuses() {
    let options = iot_telemetry::Options { wharf: env!("CARGO_BIN_EXE_wharf").into(), devices: 5, readings: 40 };
    let report = iot_telemetry::run(options).await.expect("the example runs");
    println!("{}", report.text());
    assert!(report.ok, "{}", report.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_answers_every_request_across_protocols() {
    let options = request_reply::Options { wharf: env!("CARGO_BIN_EXE_wharf").into(), requests: 10 };
    let report = request_reply::run(options).await.expect("the example runs");
    println!("{}", report.text());
    assert!(report.ok, "{}", report.text());
}
