//! The runnable examples, run against the real binary: `examples/payments` with chaos (the
//! processor and the broker killed and restarted at random points) must apply every order exactly
//! once and balance its ledger.

#[path = "../examples/payments/run.rs"]
mod payments;

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
