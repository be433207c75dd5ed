//! Publish-and-confirm throughput of the core API on one node with fsync on, next to fjall's raw
//! batched-append rate for the same bytes (the physical reference), in one run.
//!
//! `cargo bench -p wharf-core --bench publish` (`WHARF_BENCH_SECS` sets each phase's length,
//! default 5). Each publisher publishes 256-byte messages to one durable queue and waits for every
//! confirmation before publishing again ("sequential"), or keeps a window of 16 unconfirmed
//! ("window 16", as an AMQP publisher with confirms does). The queue has `x-max-length` 100,000
//! (drop-head) so that memory stays bounded without a consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use wharf_core::model::{FieldValue, Headers, Message};
use wharf_core::node::QueueSpec;
use wharf_core::{Core, CoreConfig};

const PAYLOAD_BYTES: usize = 256;

fn seconds() -> u64 {
    std::env::var("WHARF_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

/// fjall, one keyspace, `batch` values of 256 bytes per batch, fdatasync per batch.
fn fjall_raw(batch: usize, duration: Duration) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::builder(dir.path()).manual_journal_persist(true).open().expect("open fjall");
    let keyspace = db.keyspace("bench", KeyspaceCreateOptions::default).expect("keyspace");
    let value = vec![7u8; PAYLOAD_BYTES];
    let started = Instant::now();
    let mut key: u64 = 0;
    while started.elapsed() < duration {
        let mut write = db.batch().durability(Some(PersistMode::SyncData));
        for _ in 0..batch {
            write.insert(&keyspace, key.to_be_bytes(), value.clone());
            key += 1;
        }
        write.commit().expect("commit");
    }
    key as f64 / started.elapsed().as_secs_f64()
}

struct CoreRun {
    messages_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// After a short warm-up, count what `done` gains over `duration`, stop the workers, and take
/// the latency percentiles of what they return (microseconds each).
async fn measure(
    done: &AtomicU64,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    duration: Duration,
) -> CoreRun {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let count = done.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("worker"));
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    CoreRun { messages_per_sec: count as f64 / elapsed, p50_ms: percentile(0.50), p99_ms: percentile(0.99) }
}

async fn core_publish(publishers: usize, window: usize, keyed: bool, duration: Duration) -> CoreRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = CoreConfig::single_node(dir.path());
    // Experiments: WHARF_BENCH_PIPELINE overrides limits.pipeline_entries_max.
    if let Some(depth) = std::env::var("WHARF_BENCH_PIPELINE").ok().and_then(|s| s.parse().ok()) {
        config.limits.pipeline_entries_max = depth;
    }
    // Experiments: WHARF_BENCH_SNAPSHOT overrides snapshot_logs_since_last.
    if let Some(logs) = std::env::var("WHARF_BENCH_SNAPSHOT").ok().and_then(|s| s.parse().ok()) {
        config.snapshot_logs_since_last = logs;
    }
    let core = Core::open(config).await.expect("open core");
    let mut arguments = Headers::new();
    arguments.push("x-max-length", FieldValue::I64(100_000));
    let spec = QueueSpec { vhost: "/".into(), name: "bench".into(), durable: true, arguments, ..QueueSpec::default() };
    core.declare_queue(spec).await.expect("declare");
    let stop = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let mut tasks = Vec::new();
    for publisher in 0..publishers {
        let (core, stop, confirmed, payload) = (core.clone(), stop.clone(), confirmed.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies_us = Vec::new();
            let mut pending = std::collections::VecDeque::new();
            let mut seq: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut message = Message::new("", "bench", payload.clone());
                if keyed {
                    // Unique keys, as a producer numbering its payments would send.
                    message.idempotency_key = Some(format!("p{publisher}-{seq}"));
                    seq += 1;
                }
                let started = Instant::now();
                pending.push_back((started, core.publish("/", message).await.expect("publish")));
                if pending.len() >= window
                    && let Some((started, publish)) = pending.pop_front()
                {
                    let published = publish.confirm().await.expect("confirm");
                    assert!(published.confirmed() && !published.unroutable());
                    latencies_us.push(started.elapsed().as_micros() as u64);
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some((_, publish)) = pending.pop_front() {
                publish.confirm().await.expect("confirm");
            }
            latencies_us
        }));
    }
    let run = measure(&confirmed, &stop, tasks, duration).await;
    core.shutdown().await.expect("shutdown");
    run
}

/// Transactions of two 256-byte publishes, to two queues on different shards (two-phase commit)
/// or on one shard (one entry), by `clients` concurrent clients each committing one at a time.
async fn txn_commit(clients: usize, two_shards: bool, duration: Duration) -> CoreRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = Core::open(CoreConfig::single_node(dir.path())).await.expect("open core");
    let shard_count = core.config().shard_count;
    let mut names: Vec<(String, u32)> = Vec::new();
    for i in 0..16 {
        let name = format!("txn{i}");
        let mut arguments = Headers::new();
        arguments.push("x-max-length", FieldValue::I64(100_000));
        let spec =
            QueueSpec { vhost: "/".into(), name: name.clone(), durable: true, arguments, ..QueueSpec::default() };
        let declared = core.declare_queue(spec).await.expect("declare");
        names.push((name, wharf_core::placement::shard_for(declared.id, 0, shard_count)));
    }
    let first = names[0].clone();
    // The second queue: on another shard (two-phase commit) or on the same one (one entry).
    let second = names[1..]
        .iter()
        .find(|(_, shard)| (*shard != first.1) == two_shards)
        .cloned()
        .expect("16 queues over the shards give both cases");
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD_BYTES]);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (core, stop, committed, payload) = (core.clone(), stop.clone(), committed.clone(), payload.clone());
        let (a, b) = (first.0.clone(), second.0.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies_us = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut txn = core.begin_txn();
                txn.publish("/", Message::new("", a.as_str(), payload.clone()));
                txn.publish("/", Message::new("", b.as_str(), payload.clone()));
                let started = Instant::now();
                core.commit_txn(txn).await.expect("commit");
                latencies_us.push(started.elapsed().as_micros() as u64);
                committed.fetch_add(1, Ordering::Relaxed);
            }
            latencies_us
        }));
    }
    let run = measure(&committed, &stop, tasks, duration).await;
    core.shutdown().await.expect("shutdown");
    run
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a short smoke.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let duration = Duration::from_secs(if smoke { 1 } else { seconds() });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");

    println!("fjall raw batched append, {PAYLOAD_BYTES}-byte values, fdatasync per batch:");
    let mut raw = Vec::new();
    for batch in [1usize, 64, 256, 1024] {
        let rate = fjall_raw(batch, duration);
        println!("  batch {batch:>5}: {rate:>12.0} values/s");
        raw.push((batch, rate));
    }
    println!("core publish-and-confirm, {PAYLOAD_BYTES}-byte messages, fsync on, one node:");
    let mut results = Vec::new();
    // Experiments: WHARF_BENCH_ONLY=PUBLISHERSxWINDOW runs one configuration (e.g. 64x1).
    let only = std::env::var("WHARF_BENCH_ONLY").ok();
    for (publishers, window) in [(1usize, 1usize), (64, 1), (1, 16), (64, 16)] {
        if only.as_ref().is_some_and(|o| *o != format!("{publishers}x{window}")) {
            continue;
        }
        let run = runtime.block_on(core_publish(publishers, window, false, duration));
        let label = if window == 1 { "sequential".to_owned() } else { format!("window {window}") };
        println!(
            "  {publishers:>2} publishers, {label:<10}: {:>10.0} msg/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
            run.messages_per_sec, run.p50_ms, run.p99_ms
        );
        results.push((publishers, window, run));
    }
    println!("core publish-and-confirm with a unique idempotency key per message (same setup):");
    for (publishers, window) in [(64usize, 1usize), (64, 16)] {
        if only.as_ref().is_some_and(|o| *o != format!("{publishers}x{window}k")) && only.is_some() {
            continue;
        }
        let keyed = runtime.block_on(core_publish(publishers, window, true, duration));
        let plain =
            results.iter().find(|(p, w, _)| *p == publishers && *w == window).map(|(_, _, r)| r.messages_per_sec);
        let label = if window == 1 { "sequential".to_owned() } else { format!("window {window}") };
        println!(
            "  {publishers:>2} publishers, {label:<10}: {:>10.0} msg/s   p50 {:>6.2} ms   p99 {:>6.2} ms   {}",
            keyed.messages_per_sec,
            keyed.p50_ms,
            keyed.p99_ms,
            plain.map_or(String::new(), |plain| format!("{:.1} % of plain", 100.0 * keyed.messages_per_sec / plain))
        );
    }
    println!("transactions of 2 publishes (commit_txn), one client committing at a time each:");
    for (clients, two_shards) in [(1usize, true), (64, true), (64, false)] {
        if only.is_some() {
            continue;
        }
        let run = runtime.block_on(txn_commit(clients, two_shards, duration));
        let kind = if two_shards { "2 shards (2PC)" } else { "1 shard (one entry)" };
        println!(
            "  {clients:>2} clients, {kind:<20}: {:>8.0} txn/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
            run.messages_per_sec, run.p50_ms, run.p99_ms
        );
    }
    let best_raw = raw.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    let raw_at = |batch: usize| raw.iter().find(|(b, _)| *b == batch).map_or(0.0, |(_, r)| *r);
    for (publishers, window, run) in &results {
        if *publishers == 64 {
            // 64 publishers with a window of W keep up to 64×W messages waiting: compare with
            // the raw rate at the batch size group commit can form, and with the best raw rate.
            let batch = if *window == 1 { 64 } else { 1024 };
            println!(
                "  ratio, 64 publishers window {window}: {:.1} % of raw fjall at batch {batch} ({:.0}/s), \
                 {:.1} % of the best raw rate ({best_raw:.0}/s)",
                100.0 * run.messages_per_sec / raw_at(batch),
                raw_at(batch),
                100.0 * run.messages_per_sec / best_raw
            );
        }
    }
}
