//! Request-reply across protocols: an MQTT 5 requester (Response Topic, Correlation Data) asks an
//! AMQP responder, which answers on the reply-to with the correlation-id; an AMQP requester
//! (reply-to, correlation-id) asks an MQTT 5 responder, which answers on the Response Topic.
//! Exits 0 only when every request was answered with its own correlation.
//!
//! ```sh
//! cargo build --release && cargo run --release --example request-reply
//! ```
//!
//! Options: `--requests N` (20 each way), `--wharf PATH`.

#[path = "../common/broker.rs"]
#[allow(dead_code, reason = "shared by the examples; each uses part of it")]
mod broker;
#[path = "run.rs"]
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut options = run::Options { wharf: broker::default_wharf(), requests: 20 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--requests" => options.requests = value().parse().unwrap_or(options.requests),
            "--wharf" => options.wharf = PathBuf::from(value()),
            other => return broker::unknown_argument("request-reply", other),
        }
    }
    broker::run_example("request-reply", async {
        let report = run::run(options).await?;
        Ok((report.text(), report.ok))
    })
}
