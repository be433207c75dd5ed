//! Exactly-once payment processing across protocols. Payment orders arrive over MQTT (devices)
//! and AMQP (a web shop); a processor consumes them over the native API and, in one transaction,
//! acknowledges each order and publishes its ledger entry; a ledger consumer reads over AMQP.
//! With `--chaos`, the processor and the broker are killed and restarted at random points while
//! producers retry with the same keys. At the end it checks that every order was applied exactly
//! once and that the ledger balances, prints the counts, and exits 0 only then.
//!
//! ```sh
//! cargo build --release && cargo run --release --example payments -- --chaos
//! ```
//!
//! Options: `--orders N` (200), `--chaos`, `--seed S` (1), `--timeout-secs T` (120),
//! `--wharf PATH` (the `wharf` binary next to the example's target directory).

#[path = "../common/broker.rs"]
#[allow(dead_code, reason = "shared by the examples; each uses part of it")]
mod broker;
#[path = "run.rs"]
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut options = run::Options {
        wharf: broker::default_wharf(),
        orders: 200,
        chaos: false,
        seed: 1,
        timeout: Duration::from_secs(120),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--chaos" => options.chaos = true,
            "--orders" => options.orders = value().parse().unwrap_or(options.orders),
            "--seed" => options.seed = value().parse().unwrap_or(options.seed),
            "--timeout-secs" => options.timeout = Duration::from_secs(value().parse().unwrap_or(120)),
            "--wharf" => options.wharf = PathBuf::from(value()),
            other => return broker::unknown_argument("payments", other),
        }
    }
    broker::run_example("payments", async {
        let report = run::run(options).await?;
        Ok((report.text(), report.ok()))
    })
}
