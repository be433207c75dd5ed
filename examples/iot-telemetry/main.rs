//! IoT telemetry: MQTT devices (QoS 1 readings, retained status, wills) → an AMQP analytics
//! consumer. One device dies without a DISCONNECT and its will reaches the analytics side; a
//! dashboard subscribing later gets every device's retained status. Exits 0 only when every
//! reading arrived once, the will arrived, and every retained status is right.
//!
//! ```sh
//! cargo build --release && cargo run --release --example iot-telemetry
//! ```
//!
//! Options: `--devices N` (10), `--readings N` (100 per device), `--wharf PATH`.

#[path = "../common/broker.rs"]
#[allow(dead_code, reason = "shared by the examples; each uses part of it")]
mod broker;
#[path = "run.rs"]
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut options = run::Options { wharf: broker::default_wharf(), devices: 10, readings: 100 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--devices" => options.devices = value().parse().unwrap_or(options.devices),
            "--readings" => options.readings = value().parse().unwrap_or(options.readings),
            "--wharf" => options.wharf = PathBuf::from(value()),
            other => return broker::unknown_argument("iot-telemetry", other),
        }
    }
    broker::run_example("iot-telemetry", async {
        let report = run::run(options).await?;
        Ok((report.text(), report.ok))
    })
}
