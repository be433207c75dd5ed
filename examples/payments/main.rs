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

#[path = "run.rs"]
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut options =
        run::Options { wharf: default_wharf(), orders: 200, chaos: false, seed: 1, timeout: Duration::from_secs(120) };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--chaos" => options.chaos = true,
            "--orders" => options.orders = value().parse().unwrap_or(options.orders),
            "--seed" => options.seed = value().parse().unwrap_or(options.seed),
            "--timeout-secs" => options.timeout = Duration::from_secs(value().parse().unwrap_or(120)),
            "--wharf" => options.wharf = PathBuf::from(value()),
            other => {
                eprintln!("payments: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("payments: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(options)) {
        Ok(report) => {
            print!("{}", report.text());
            if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(error) => {
            eprintln!("payments: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/<profile>/wharf`, next to `target/<profile>/examples/payments`.
fn default_wharf() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("wharf")))
        .unwrap_or_else(|| PathBuf::from("wharf"))
}
