//! `wharf bench`: a load generator for MQTT and AMQP 0-9-1 brokers (Wharf or any other) and for
//! Wharf's native gRPC API, like RabbitMQ's perf-test or emqtt-bench. Publishers stamp every message with its send time, its
//! publisher and its sequence number; subscribers use the stamp to count what was lost or
//! duplicated and to record end-to-end latency in HDR histograms. Talks only to the broker it
//! is pointed at; prints a progress line on stderr and the report (text or `--json`) on stdout.

mod amqp;
mod amqp_wire;
mod mqtt;
mod native;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Bytes of the stamp at the start of every payload: send time (8), publisher (4), sequence (8).
pub const STAMP_BYTES: usize = 20;

/// Highest latency the histograms record, microseconds (a minute: anything slower is reported
/// as this).
const LATENCY_MAX_MICROS: u64 = 60_000_000;

/// `wharf bench` protocols.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Benchmark an MQTT broker (MQTT 3.1.1).
    Mqtt(MqttArgs),
    /// Benchmark an AMQP 0-9-1 broker.
    Amqp(AmqpArgs),
    /// Benchmark Wharf's native gRPC API.
    Native(NativeArgs),
}

/// How messages flow from publishers to subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Publisher i sends to destination i mod subscribers; each subscriber has its own.
    OneToOne,
    /// Every publisher sends to one destination that every subscriber receives in full.
    FanOut,
    /// Every publisher sends to one destination; MQTT subscribers each receive all of it, AMQP
    /// consumers share one queue (competing consumers).
    FanIn,
}

/// Options shared by every protocol.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Publishing clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Subscribing clients (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub subscribers: u32,
    /// How publishers reach subscribers.
    #[arg(long, value_enum, default_value_t = Layout::OneToOne)]
    pub layout: Layout,
    /// Payload size, bytes (at least the 20-byte stamp).
    #[arg(long, default_value_t = 256)]
    pub size_bytes: usize,
    /// Messages to publish, all publishers together (ignored with --duration-secs).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Publish for this long instead of a count, seconds.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Publish at this rate, messages per second, all publishers together (0: as fast as
    /// possible). Latency is measured from each message's scheduled time, so a broker that falls
    /// behind shows it.
    #[arg(long, default_value_t = 0)]
    pub rate_per_sec: u64,
    /// After publishing, how long to wait for the last messages, seconds.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Prefix of the topics or queues this run creates (a unique suffix is added).
    #[arg(long, default_value = "wharf-bench")]
    pub prefix: String,
}

/// `wharf bench mqtt`.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Most unacknowledged QoS 1/2 publishes per publisher.
    #[arg(long, default_value_t = 1000)]
    pub inflight: u16,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long)]
    pub password: Option<String>,
    /// Open this many extra connections that stay idle (keep-alive only) through the run, to
    /// measure what a connection costs the broker.
    #[arg(long, default_value_t = 0)]
    pub idle_connections: u32,
    /// After the run, keep the idle connections open this long, seconds (a line on stderr says
    /// when holding starts, for whoever samples the broker's memory).
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
    /// Publishers speak MQTT 5 and give each message an `idempotency-key` user property unique to
    /// the run (Wharf's exactly-once registry); a PUBACK or PUBREC whose `idempotency-verdict` says
    /// `duplicate` counts as refused. Subscribers stay on MQTT 3.1.1.
    #[arg(long)]
    pub idempotency_keys: bool,
}

/// `wharf bench amqp`.
#[derive(Debug, Clone, Args)]
pub struct AmqpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// AMQP port.
    #[arg(long, default_value_t = 5672)]
    pub port: u16,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// User.
    #[arg(long, default_value = "guest")]
    pub username: String,
    /// Password.
    #[arg(long, default_value = "guest")]
    pub password: String,
    /// Publisher confirms (a message counts as sent once the broker confirmed it).
    #[arg(long)]
    pub confirms: bool,
    /// Most unconfirmed publishes per publisher with --confirms.
    #[arg(long, default_value_t = 1000)]
    pub inflight: usize,
    /// Consumer prefetch (basic.qos).
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Acknowledge every Nth delivery with `multiple` (1: each delivery on its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub multi_ack_every: u32,
    /// Publish transient messages (delivery-mode 1) instead of persistent ones.
    #[arg(long)]
    pub transient: bool,
    /// `x-queue-type` of the queues (`classic`, `quorum`); none by default.
    #[arg(long)]
    pub queue_type: Option<String>,
    /// Give each message an `x-idempotency-key` header (Wharf's exactly-once registry).
    #[arg(long)]
    pub idempotency_keys: bool,
}

/// `wharf bench native`.
#[derive(Debug, Clone, Args)]
pub struct NativeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Native API port.
    #[arg(long, default_value_t = 7654)]
    pub port: u16,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// Most messages outstanding per publisher (in calls multiplexed on its connection).
    #[arg(long, default_value_t = 1000)]
    pub inflight: usize,
    /// Messages per call: 1 publishes with Publish, more with PublishBatch (at a fixed rate,
    /// each message is sent as soon as it is due, whatever this says).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,
    /// Credit of each consumer (granted again as deliveries are read).
    #[arg(long, default_value_t = 1000)]
    pub credit: u32,
    /// Acknowledge deliveries in settles of this many (held ones are settled after 20 ms idle).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub ack_every: u32,
    /// Give each message an idempotency key unique to the run (a duplicate verdict counts as
    /// refused).
    #[arg(long)]
    pub idempotency_keys: bool,
}

/// Run `wharf bench`.
pub fn run(command: BenchCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wharf bench: no runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (json, result) = match command {
        BenchCommand::Mqtt(args) => (args.common.json, runtime.block_on(mqtt::run(args))),
        BenchCommand::Amqp(args) => (args.common.json, runtime.block_on(amqp::run(args))),
        BenchCommand::Native(args) => (args.common.json, runtime.block_on(native::run(args))),
    };
    match result {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(error) => {
                        eprintln!("wharf bench: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("wharf bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl CommonArgs {
    /// Refuse settings that cannot run.
    fn validate(&self) -> anyhow::Result<()> {
        if self.size_bytes < STAMP_BYTES {
            bail!("--size-bytes must be at least {STAMP_BYTES} (the stamp)");
        }
        if self.publishers == 0 || self.subscribers == 0 {
            bail!("--publishers and --subscribers must be at least 1");
        }
        if self.layout == Layout::OneToOne && self.subscribers > self.publishers {
            bail!("one-to-one needs at least as many publishers as subscribers");
        }
        Ok(())
    }

    /// A unique name prefix for this run's topics or queues.
    fn run_prefix(&self) -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{}-{:x}", self.prefix, nanos & 0xffff_ffff)
    }

    /// The destination index (topic or queue) publisher `publisher` sends to.
    fn destination_of(&self, publisher: u32) -> u32 {
        match self.layout {
            Layout::OneToOne => publisher % self.subscribers,
            Layout::FanOut | Layout::FanIn => 0,
        }
    }

    /// The run's queues (AMQP, native): one per subscriber (one-to-one, fan-out) or one shared
    /// by every consumer (fan-in).
    fn queue_names(&self, prefix: &str) -> Vec<String> {
        let count = match self.layout {
            Layout::OneToOne | Layout::FanOut => self.subscribers,
            Layout::FanIn => 1,
        };
        (0..count).map(|index| format!("{prefix}-{index}")).collect()
    }

    /// Where publisher `publisher` sends (exchange, routing key): the fan-out exchange, else its
    /// queue through the default exchange.
    fn address_of(&self, publisher: u32, fanout: Option<&str>, queues: &[String]) -> (String, String) {
        match fanout {
            Some(exchange) => (exchange.to_owned(), String::new()),
            None => (String::new(), queues[self.destination_of(publisher) as usize % queues.len()].clone()),
        }
    }

    /// Deliveries each message sent makes with one queue per consumer (or one shared).
    fn queue_copies(&self) -> u64 {
        match self.layout {
            Layout::FanOut => u64::from(self.subscribers),
            Layout::OneToOne | Layout::FanIn => 1,
        }
    }

    /// Messages publisher `publisher` sends in count mode.
    fn count_of(&self, publisher: u32) -> u64 {
        let publishers = u64::from(self.publishers);
        self.count / publishers + u64::from(u64::from(publisher) < self.count % publishers)
    }
}

/// When each message of one publisher is due, and when the publisher stops.
///
/// At a fixed rate the due times come from a pacing thread that sleeps with the operating
/// system's timer (tens of microseconds of slack) rather than tokio's, which fires on whole
/// milliseconds: with tokio's timer every message would leave up to a millisecond late, and
/// since latency is measured from the due time (so that a broker that holds publishers back is
/// charged for it), that lateness would be charged to the broker.
#[derive(Debug)]
pub struct Schedule {
    /// Messages to send (none: until `until`).
    count: Option<u64>,
    until: Option<Instant>,
    /// Due times from the pacing thread, at a fixed rate; none: as fast as possible.
    paced: Option<tokio::sync::mpsc::Receiver<Instant>>,
    seq: u64,
}

/// Due times the pacing thread may run ahead of its publisher. When the publisher is held back
/// (by the broker) for longer, the thread waits; the due times stay on the schedule regardless.
const PACED_AHEAD_MAX: usize = 1024;

impl Schedule {
    fn new(args: &CommonArgs, publisher: u32, start: Instant) -> Self {
        let per_publisher = args.rate_per_sec as f64 / f64::from(args.publishers);
        let count = args.duration_secs.is_none().then(|| args.count_of(publisher));
        let until = args.duration_secs.map(|secs| start + Duration::from_secs(secs));
        let paced = (args.rate_per_sec > 0).then(|| {
            let interval = Duration::from_secs_f64(1.0 / per_publisher);
            let (tx, rx) = tokio::sync::mpsc::channel(PACED_AHEAD_MAX);
            std::thread::Builder::new()
                .name(format!("bench-pacer-{publisher}"))
                .spawn(move || pace(start, interval, count, until, &tx))
                .map(|_| rx)
        });
        let paced = match paced {
            Some(Ok(rx)) => Some(rx),
            Some(Err(error)) => {
                eprintln!("wharf bench: no pacing thread ({error})");
                None
            }
            None => None,
        };
        Self { count, until, paced, seq: 0 }
    }

    /// Wait until the next message is due; its stamp time, or `None` when the publisher is done.
    async fn next(&mut self) -> Option<Instant> {
        let due = match &mut self.paced {
            Some(paced) => paced.recv().await?,
            None => {
                if self.count.is_some_and(|count| self.seq >= count) {
                    return None;
                }
                let now = Instant::now();
                if self.until.is_some_and(|until| now >= until) {
                    return None;
                }
                now
            }
        };
        self.seq += 1;
        Some(due)
    }
}

/// The pacing thread of one publisher: hands over each due time once it has come.
fn pace(
    start: Instant,
    interval: Duration,
    count: Option<u64>,
    until: Option<Instant>,
    tx: &tokio::sync::mpsc::Sender<Instant>,
) {
    let mut seq = 0u64;
    while count.is_none_or(|count| seq < count) {
        let due = start + interval.mul_f64(seq as f64);
        if until.is_some_and(|until| due >= until) {
            return;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if tx.blocking_send(due).is_err() {
            return; // the publisher stopped
        }
        seq += 1;
    }
}

/// A payload of `size_bytes` stamped with its send time, publisher and sequence number.
pub fn stamp(epoch: Instant, sent: Instant, publisher: u32, seq: u64, size_bytes: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size_bytes.max(STAMP_BYTES)];
    let nanos = sent.saturating_duration_since(epoch).as_nanos() as u64;
    payload[..8].copy_from_slice(&nanos.to_be_bytes());
    payload[8..12].copy_from_slice(&publisher.to_be_bytes());
    payload[12..20].copy_from_slice(&seq.to_be_bytes());
    payload
}

/// The stamp of a payload: send time (ns since the epoch), publisher, sequence.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u32, u64)> {
    let nanos = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let publisher = u32::from_be_bytes(payload.get(8..12)?.try_into().ok()?);
    let seq = u64::from_be_bytes(payload.get(12..20)?.try_into().ok()?);
    Some((nanos, publisher, seq))
}

/// Counters every client updates, read by the progress line and the report.
#[derive(Debug, Default)]
pub struct Counters {
    /// Publishes handed to the broker (QoS 0, no confirms) or acknowledged by it.
    pub sent: AtomicU64,
    /// Publishes the broker refused (negative confirm) or, with MQTT idempotency keys, answered as
    /// duplicates.
    pub refused: AtomicU64,
    /// Messages received by subscribers, duplicates included.
    pub received: AtomicU64,
}

/// What one subscriber saw.
#[derive(Debug)]
pub struct Receiver {
    epoch: Instant,
    seen: HashSet<(u32, u64)>,
    duplicates: u64,
    latency: Histogram<u64>,
    counters: Arc<Counters>,
}

impl Receiver {
    /// A receiver measuring from `epoch` (the publishers' stamp origin).
    pub fn new(epoch: Instant, counters: Arc<Counters>) -> anyhow::Result<Self> {
        let latency = Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).context("histogram")?;
        Ok(Self { epoch, seen: HashSet::new(), duplicates: 0, latency, counters })
    }

    /// Record one received payload.
    pub fn record(&mut self, payload: &[u8]) {
        let Some((sent_nanos, publisher, seq)) = read_stamp(payload) else { return };
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        if !self.seen.insert((publisher, seq)) {
            self.duplicates += 1;
        }
        let now_nanos = self.epoch.elapsed().as_nanos() as u64;
        let micros = now_nanos.saturating_sub(sent_nanos) / 1_000;
        self.latency.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
    }
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `mqtt`, `amqp` or `native`.
    pub protocol: &'static str,
    /// The scenario, in words (`qos 1`, `confirms, persistent`).
    pub mode: String,
    pub layout: Layout,
    pub publishers: u32,
    pub subscribers: u32,
    pub size_bytes: usize,
    /// Publishes sent (acknowledged by the broker where acknowledgements are asked for).
    pub sent: u64,
    /// Publishes the broker refused.
    pub refused: u64,
    /// Deliveries expected from what was sent and the layout.
    pub expected: u64,
    /// Deliveries received, duplicates included.
    pub received: u64,
    /// Expected deliveries that never came.
    pub lost: u64,
    /// Deliveries of a message a subscriber had already received.
    pub duplicates: u64,
    /// Time from the first publish to the end of publishing, seconds.
    pub publish_secs: f64,
    /// Time from the first publish to the last delivery, seconds.
    pub elapsed_secs: f64,
    /// Sent per second over the publishing time.
    pub sent_per_sec: f64,
    /// Received per second over the whole run.
    pub received_per_sec: f64,
    /// End-to-end latency, microseconds.
    pub latency_micros: Latency,
    /// Idle connections held open through the run (MQTT `--idle-connections`).
    pub idle_connections: u32,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Report {
    /// The report as text, one figure a line.
    pub fn text(&self) -> String {
        let l = &self.latency_micros;
        format!(
            "{} {} | layout {:?} | {} publishers -> {} subscribers | {} B | {} idle connections\n\
             sent {} (refused {}) | received {} of {} expected | lost {} | duplicates {}\n\
             throughput: sent {:.0} msg/s, received {:.0} msg/s | elapsed {:.2} s\n\
             latency (us): p50 {} | p99 {} | p99.9 {} | max {} | mean {:.0}\n",
            self.protocol,
            self.mode,
            self.layout,
            self.publishers,
            self.subscribers,
            self.size_bytes,
            self.idle_connections,
            self.sent,
            self.refused,
            self.received,
            self.expected,
            self.lost,
            self.duplicates,
            self.sent_per_sec,
            self.received_per_sec,
            self.elapsed_secs,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            l.mean,
        )
    }
}

/// Everything a run measured, turned into its report.
pub struct Outcome {
    pub counters: Arc<Counters>,
    pub receivers: Vec<Receiver>,
    /// Deliveries expected per sent message.
    pub copies: u64,
    pub publish_secs: f64,
    pub elapsed_secs: f64,
}

impl Outcome {
    fn report(self, protocol: &'static str, mode: String, args: &CommonArgs) -> anyhow::Result<Report> {
        let mut latency = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_MICROS, 3).context("histogram")?;
        let mut unique = 0u64;
        let mut duplicates = 0u64;
        for receiver in &self.receivers {
            latency.add(&receiver.latency).context("merge histograms")?;
            unique += receiver.seen.len() as u64;
            duplicates += receiver.duplicates;
        }
        let sent = self.counters.sent.load(Ordering::Relaxed);
        let received = self.counters.received.load(Ordering::Relaxed);
        let expected = sent * self.copies;
        let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Ok(Report {
            protocol,
            mode,
            layout: args.layout,
            publishers: args.publishers,
            subscribers: args.subscribers,
            size_bytes: args.size_bytes,
            sent,
            refused: self.counters.refused.load(Ordering::Relaxed),
            expected,
            received,
            lost: expected.saturating_sub(unique),
            duplicates,
            publish_secs: self.publish_secs,
            elapsed_secs: self.elapsed_secs,
            sent_per_sec: per_sec(sent, self.publish_secs),
            received_per_sec: per_sec(received, self.elapsed_secs),
            latency_micros: Latency {
                p50: latency.value_at_quantile(0.5),
                p99: latency.value_at_quantile(0.99),
                p999: latency.value_at_quantile(0.999),
                max: latency.max(),
                mean: latency.mean(),
            },
            idle_connections: 0,
        })
    }
}

/// Print a progress line on stderr every second until `done` fires.
async fn progress(counters: Arc<Counters>, start: Instant, mut done: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sent, mut last_received) = (0, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.changed() => return,
        }
        let sent = counters.sent.load(Ordering::Relaxed);
        let received = counters.received.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1} s] sent {sent} (+{}/s) received {received} (+{}/s)",
            start.elapsed().as_secs_f64(),
            sent - last_sent,
            received - last_received
        );
        (last_sent, last_received) = (sent, received);
    }
}

/// The running parts of a run, once its publishers and subscribers are started.
pub struct Running {
    pub counters: Arc<Counters>,
    pub start: Instant,
    pub publishers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub subscribers: Vec<tokio::task::JoinHandle<Receiver>>,
    pub stop: tokio::sync::watch::Sender<bool>,
    pub reporter: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Wait for the publishers, then for the deliveries (`copies` per message sent), then stop the
    /// subscribers and gather what they saw.
    pub async fn finish(self, copies: u64, drain_secs: u64) -> anyhow::Result<Outcome> {
        for publisher in self.publishers {
            publisher.await.context("publisher task")??;
        }
        let publish_secs = self.start.elapsed().as_secs_f64();
        let counters = self.counters;
        drain(&counters, || counters.sent.load(Ordering::Relaxed) * copies, drain_secs).await;
        let elapsed_secs = self.start.elapsed().as_secs_f64();
        self.stop.send_replace(true);
        let mut receivers = Vec::new();
        for subscriber in self.subscribers {
            receivers.push(subscriber.await.context("subscriber task")?);
        }
        let _ = self.reporter.await;
        Ok(Outcome { counters, receivers, copies, publish_secs, elapsed_secs })
    }
}

/// After publishing: wait until every expected delivery arrived, or until nothing arrived for
/// `drain_secs`.
async fn drain(counters: &Counters, expected: impl Fn() -> u64, drain_secs: u64) {
    let mut last = counters.received.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    loop {
        let received = counters.received.load(Ordering::Relaxed);
        if received >= expected() {
            return;
        }
        if received != last {
            last = received;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(drain_secs) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_pad_to_the_size() {
        let epoch = Instant::now();
        let payload = stamp(epoch, epoch + Duration::from_micros(1500), 7, 42, 64);
        assert_eq!(payload.len(), 64);
        assert_eq!(read_stamp(&payload), Some((1_500_000, 7, 42)));
        assert_eq!(read_stamp(&payload[..10]), None);
    }

    #[test]
    fn counts_split_over_publishers_and_layouts_choose_destinations() {
        let args = CommonArgs {
            host: "h".into(),
            publishers: 3,
            subscribers: 3,
            layout: Layout::OneToOne,
            size_bytes: 256,
            count: 10,
            duration_secs: None,
            rate_per_sec: 0,
            drain_secs: 1,
            json: false,
            prefix: "p".into(),
        };
        assert_eq!((0..3).map(|p| args.count_of(p)).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!((0..3).map(|p| args.destination_of(p)).collect::<Vec<_>>(), [0, 1, 2]);
        let fan_out = CommonArgs { layout: Layout::FanOut, ..args.clone() };
        assert_eq!(fan_out.destination_of(2), 0);
        assert!(CommonArgs { size_bytes: 10, ..args.clone() }.validate().is_err());
        assert!(CommonArgs { publishers: 1, ..args }.validate().is_err(), "one-to-one needs enough publishers");
    }

    /// At a fixed rate each due time is handed out once it has come, on the schedule (not from
    /// when the previous message left), and the publisher stops at its count or its duration.
    #[tokio::test]
    async fn paced_schedules_hand_out_due_times_on_schedule_and_stop() {
        let args = CommonArgs {
            host: "h".into(),
            publishers: 2,
            subscribers: 2,
            layout: Layout::OneToOne,
            size_bytes: 256,
            count: 40,
            duration_secs: None,
            rate_per_sec: 2_000,
            drain_secs: 1,
            json: false,
            prefix: "p".into(),
        };
        let start = Instant::now();
        let mut schedule = Schedule::new(&args, 0, start);
        let mut dues = Vec::new();
        while let Some(due) = schedule.next().await {
            assert!(Instant::now() >= due, "a due time handed out before it came");
            dues.push(due);
        }
        // 20 messages for this publisher, 1 ms apart (2,000/s over two publishers).
        assert_eq!(dues.len(), 20);
        for (seq, due) in dues.iter().enumerate() {
            let offset_secs = due.duration_since(start).as_secs_f64();
            assert!((offset_secs - seq as f64 / 1000.0).abs() < 1e-6, "message {seq} due at {offset_secs} s");
        }
        assert!(schedule.next().await.is_none(), "a finished schedule stays finished");

        let timed = CommonArgs { duration_secs: Some(1), rate_per_sec: 100, ..args.clone() };
        let mut schedule = Schedule::new(&timed, 1, start);
        let mut sent = 0;
        while schedule.next().await.is_some() {
            sent += 1;
        }
        assert_eq!(sent, 50, "50 per second for one second");
        assert!(start.elapsed() >= Duration::from_millis(980));

        // As fast as possible: no pacing, the count only.
        let mut schedule = Schedule::new(&CommonArgs { rate_per_sec: 0, ..args }, 0, start);
        let mut sent = 0;
        while schedule.next().await.is_some() {
            sent += 1;
        }
        assert_eq!(sent, 20);
    }

    #[test]
    fn a_receiver_counts_duplicates_once() {
        let epoch = Instant::now();
        let counters = Arc::new(Counters::default());
        let mut receiver = Receiver::new(epoch, Arc::clone(&counters)).expect("receiver");
        let payload = stamp(epoch, epoch, 0, 1, 32);
        receiver.record(&payload);
        receiver.record(&payload);
        receiver.record(&stamp(epoch, epoch, 0, 2, 32));
        assert_eq!((receiver.seen.len(), receiver.duplicates), (2, 1));
        assert_eq!(counters.received.load(Ordering::Relaxed), 3);
    }
}
