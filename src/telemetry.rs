//! Logging and metrics plumbing: installs the process-global `tracing` subscriber and the global
//! Prometheus recorder, and records the process-level metrics. Touches only that global state.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context, anyhow};
use metrics::{Unit, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Bucket upper bounds of histograms whose name ends in `_seconds`: 100 µs to 10 s, roughly three
/// per decade. Histograms are exported as buckets rather than summaries so that Prometheus can
/// aggregate them across nodes.
pub const HISTOGRAM_BUCKETS_SECONDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket upper bounds of every other histogram (counts such as commands per batch, and sizes in
/// bytes): powers of four from 1 to 16 Mi, which spans the default batch and message limits.
pub const HISTOGRAM_BUCKETS_COUNT: [f64; 13] =
    [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0, 1_048_576.0, 4_194_304.0, 16_777_216.0];

/// How often the recorder's upkeep runs (drains histogram samples into buckets). Without a built-in
/// HTTP listener the exporter leaves this to us.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Gauge set to 1, labelled with the version.
pub const BUILD_INFO: &str = "wharf_build_info";
/// Gauge: seconds since `wharf serve` started; updated at each scrape.
pub const UPTIME_SECONDS: &str = "wharf_uptime_seconds";
/// Counter of admin HTTP requests by path and status.
pub const ADMIN_HTTP_REQUESTS_TOTAL: &str = "wharf_admin_http_requests_total";

/// Install the log subscriber, writing to stderr. `RUST_LOG`, when set and not empty, replaces the
/// configured level (already validated by the settings).
pub fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            EnvFilter::builder().parse(&value).with_context(|| format!("invalid RUST_LOG {value:?}"))?
        }
        _ => EnvFilter::builder().parse(level).with_context(|| format!("invalid log level {level:?}"))?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; a file or a log collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|error| anyhow!("installing the log subscriber: {error}"))
}

/// Install the global Prometheus recorder (histograms as buckets), describe and set the
/// process-level metrics, and return the handle that renders the scrape output.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&HISTOGRAM_BUCKETS_COUNT)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &HISTOGRAM_BUCKETS_SECONDS)
        })
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which build runs.");
    describe_gauge!(UPTIME_SECONDS, Unit::Seconds, "Seconds since the process started serving.");
    describe_counter!(ADMIN_HTTP_REQUESTS_TOTAL, "Admin HTTP requests, by path and status code.");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}
