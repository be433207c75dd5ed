//! Steady-load soak: publishers and a consumer run at full speed for a while, and the data
//! directory's size is printed every second. Under steady load disk use must level off (snapshots
//! let the Raft logs be purged, and fjall reclaims what was purged). `cargo bench -p wharf-core
//! --bench soak` (`WHARF_SOAK_SECS`, default 30).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wharf_core::model::Message;
use wharf_core::node::{ConsumeOptions, ConsumerEvent, QueueSpec};
use wharf_core::queue::{ConsumerId, Outcome};
use wharf_core::{Core, CoreConfig};

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs: u64 =
        if smoke { 2 } else { std::env::var("WHARF_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = Core::open(CoreConfig::single_node(dir.path())).await.expect("open core");
        let spec = QueueSpec { vhost: "/".into(), name: "soak".into(), durable: true, ..QueueSpec::default() };
        core.declare_queue(spec).await.expect("declare");
        let stop = Arc::new(AtomicBool::new(false));
        let consumed = Arc::new(AtomicU64::new(0));
        let id = ConsumerId { connection: core.new_connection(), seq: 0 };
        let mut consumer = core
            .consume("/", "soak", id, ConsumeOptions { prefetch: 2_000, no_ack: false, ..ConsumeOptions::default() })
            .await
            .expect("consume");
        let reader = {
            let (core, stop, consumed) = (core.clone(), stop.clone(), consumed.clone());
            tokio::spawn(async move {
                let mut batch = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let idle = match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                        Ok(Some(ConsumerEvent::Delivery(d))) => {
                            batch.push(d.position);
                            false
                        }
                        Ok(_) => break,
                        Err(_) => true,
                    };
                    // Acknowledge in batches, as a consumer with `multiple` acks does.
                    if batch.len() >= 256 || (idle && !batch.is_empty()) {
                        core.settle(id, &batch, Outcome::Ack).await.expect("ack");
                        consumed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        batch.clear();
                    }
                }
                consumer.cancel().await.expect("cancel");
            })
        };
        let mut publishers = Vec::new();
        for _ in 0..8 {
            let (core, stop) = (core.clone(), stop.clone());
            publishers.push(tokio::spawn(async move {
                let payload = bytes::Bytes::from(vec![7u8; 256]);
                let mut pending = std::collections::VecDeque::new();
                while !stop.load(Ordering::Relaxed) {
                    pending.push_back(
                        core.publish("/", Message::new("", "soak", payload.clone())).await.expect("publish"),
                    );
                    if pending.len() >= 16
                        && let Some(p) = pending.pop_front()
                    {
                        p.confirm().await.expect("confirm");
                    }
                }
                for p in pending {
                    p.confirm().await.expect("confirm");
                }
            }));
        }
        let started = Instant::now();
        println!("{:>4}  {:>10}  {:>12}  {:>10}", "s", "consumed", "disk MiB", "backlog");
        for second in 1..=secs {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + Duration::from_secs(second))).await;
            let backlog = core.queue_status("/", "soak").map(|(ready, _)| ready).unwrap_or(0);
            let mib = dir_bytes(dir.path()) as f64 / (1024.0 * 1024.0);
            println!("{second:>4}  {:>10}  {mib:>12.1}  {backlog:>10}", consumed.load(Ordering::Relaxed));
        }
        stop.store(true, Ordering::Relaxed);
        for p in publishers {
            p.await.expect("publisher");
        }
        reader.await.expect("consumer");
        core.shutdown().await.expect("shutdown");
    });
}
