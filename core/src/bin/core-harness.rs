//! A small driver of the real core (storage, Raft, state machines) in its own process, for tests
//! that must kill it mid-stream: `publish` prints each confirmed sequence number as it is
//! confirmed; `consume` prints every message left in the queue and acknowledges it. Touches only
//! the core's public API and its data directory.

use std::io::Write;
use std::time::Duration;

use wharf_core::model::{Headers, Message};
use wharf_core::node::{ConsumeOptions, ConsumerEvent, QueueSpec, TxnStop};
use wharf_core::queue::{ConsumerId, Outcome};
use wharf_core::{Core, CoreConfig, CoreError};

const QUEUE: &str = "restart";
/// Partitions of the test queue: ordering is checked per partition.
const PARTITIONS: i64 = 4;
/// Publishes awaiting confirmation at once (like an AMQP publisher with a confirm window).
const WINDOW: usize = 64;

fn usage() -> ! {
    eprintln!(
        "usage: core-harness publish DATA_DIR COUNT [FIRST_SEQ] | consume DATA_DIR \
         | txn DATA_DIR (after-begin|after-one-prepare|after-decision|retry-in-doubt) | check DATA_DIR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(command), Some(dir)) = (args.get(1), args.get(2)) else { usage() };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        let mut config = CoreConfig::single_node(dir);
        // Small snapshots so that a run crosses snapshot + purge, and restarts load a snapshot.
        config.snapshot_logs_since_last = 8;
        let core = Core::open(config).await?;
        let mut arguments = Headers::new();
        arguments.push("x-partitions", wharf_core::model::FieldValue::I64(PARTITIONS));
        let spec =
            QueueSpec { vhost: "/".into(), name: QUEUE.into(), durable: true, arguments, ..QueueSpec::default() };
        core.declare_queue(spec).await?;
        match command.as_str() {
            "publish" => {
                let count: u64 = args.get(3).and_then(|c| c.parse().ok()).unwrap_or_else(|| usage());
                let first: u64 = args.get(4).map_or(Some(0), |c| c.parse().ok()).unwrap_or_else(|| usage());
                publish(&core, first, count).await?;
            }
            "consume" => consume(&core).await?,
            "txn" => txn_until(&core, args.get(3).map(String::as_str).unwrap_or_else(|| usage())).await?,
            "check" => check(&core).await?,
            _ => usage(),
        }
        core.shutdown().await
    });
    if let Err(error) = result {
        eprintln!("core-harness: {error}");
        std::process::exit(1);
    }
}

async fn publish(core: &Core, first: u64, count: u64) -> Result<(), CoreError> {
    let mut pending = std::collections::VecDeque::new();
    let mut out = std::io::stdout().lock();
    for seq in first..first + count {
        let mut message = Message::new("", QUEUE, seq.to_be_bytes().to_vec());
        message.partition_key = Some(format!("key-{}", seq % 7));
        pending.push_back((seq, core.publish("/", message).await?));
        if pending.len() >= WINDOW
            && let Some((seq, publish)) = pending.pop_front()
        {
            confirmed(&mut out, seq, publish.confirm().await?);
        }
    }
    while let Some((seq, publish)) = pending.pop_front() {
        confirmed(&mut out, seq, publish.confirm().await?);
    }
    Ok(())
}

fn confirmed(out: &mut impl Write, seq: u64, published: wharf_core::node::Published) {
    assert_eq!(published.positions.len(), 1, "message {seq} stored once: {published:?}");
    let position = published.positions[0];
    // Flushed line by line: the test reads confirmations while the process runs, then kills it.
    writeln!(out, "confirmed {seq} {} {}", position.partition, position.offset).expect("stdout");
    out.flush().expect("stdout");
}

async fn consume(core: &Core) -> Result<(), CoreError> {
    let id = ConsumerId { connection: core.new_connection(), seq: 0 };
    let mut consumer = core
        .consume("/", QUEUE, id, ConsumeOptions { prefetch: 500, no_ack: false, ..ConsumeOptions::default() })
        .await?;
    let mut out = std::io::stdout().lock();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            Ok(Some(ConsumerEvent::Delivery(delivery))) => {
                let seq = u64::from_be_bytes(delivery.message.payload[..8].try_into().expect("8-byte payload"));
                let p = delivery.position;
                writeln!(out, "delivered {seq} {} {} {}", p.partition, p.offset, delivery.redelivered).expect("stdout");
                core.settle(id, &[p], Outcome::Ack).await?;
            }
            Ok(Some(ConsumerEvent::Cancelled)) | Ok(None) => break,
            Err(_) => {
                // Quiet for 2 s: done if the queue is empty.
                if core.queue_status("/", QUEUE)?.0 == 0 {
                    break;
                }
            }
        }
    }
    out.flush().expect("stdout");
    consumer.cancel().await?;
    Ok(())
}

/// The two queues of the transaction tests, on different shards: declared in a fixed order on a
/// fresh data directory, so every run finds the same pair.
async fn txn_queues(core: &Core) -> Result<(String, String), CoreError> {
    let mut first: Option<(String, u32)> = None;
    for i in 0..32 {
        let name = format!("txn-{i}");
        let spec = QueueSpec { vhost: "/".into(), name: name.clone(), durable: true, ..QueueSpec::default() };
        let id = core.declare_queue(spec).await?.id;
        let shard = wharf_core::placement::shard_for(id, 0, core.config().shard_count);
        match &first {
            None => first = Some((name, shard)),
            Some((a, other)) if *other != shard => return Ok((a.clone(), name)),
            Some(_) => {}
        }
    }
    Err(CoreError::Internal("32 queues on one shard".into()))
}

/// Consume an input from queue A, then run a transaction acknowledging it and publishing
/// "output-a" to A and "output-b" (idempotency key "payment-1") to B, up to a crash point; print
/// "stopped" and wait to be killed.
async fn txn_until(core: &Core, point: &str) -> Result<(), CoreError> {
    let stop = match point {
        "after-begin" => TxnStop::AfterBegin,
        "after-one-prepare" => TxnStop::AfterPrepared(1),
        "after-decision" => TxnStop::AfterDecision,
        "retry-in-doubt" => TxnStop::AfterPrepared(usize::MAX),
        _ => usage(),
    };
    let (a, b) = txn_queues(core).await?;
    core.publish_confirmed("/", Message::new("", a.as_str(), "input")).await?;
    let id = ConsumerId { connection: core.new_connection(), seq: 0 };
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await?;
    let Some(ConsumerEvent::Delivery(input)) = consumer.recv().await else {
        return Err(CoreError::Internal("no input delivered".into()));
    };
    let mut txn = core.begin_txn();
    txn.ack(id, &[input.position]);
    txn.publish("/", Message::new("", a.as_str(), "output-a"));
    let mut payment = Message::new("", b.as_str(), "output-b");
    payment.idempotency_key = Some("payment-1".into());
    txn.publish("/", payment.clone());
    let finished = core.commit_txn_until(txn, stop).await?;
    assert!(finished.is_none(), "stopped before the end");
    if point == "retry-in-doubt" {
        // The producer gives up waiting and retries the payment on its own, while the transaction
        // is in doubt.
        core.publish_confirmed("/", payment).await?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "stopped").expect("stdout");
    out.flush().expect("stdout");
    std::mem::forget(consumer);
    // Wait to be killed: no shutdown, no flush.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// After a restart: print every message left in both queues ("A body" / "B body"), and whether
/// the key "payment-1" is committed to B.
async fn check(core: &Core) -> Result<(), CoreError> {
    let (a, b) = txn_queues(core).await?;
    let mut out = std::io::stdout().lock();
    for (label, queue) in [("A", &a), ("B", &b)] {
        let holder = ConsumerId { connection: core.new_connection(), seq: 0 };
        while let Some(delivery) = core.get("/", queue, holder, true).await? {
            let body = String::from_utf8_lossy(&delivery.message.payload).into_owned();
            writeln!(out, "{label} {body} {}", delivery.redelivered).expect("stdout");
        }
    }
    let key = core.idempotency_lookup("/", &b, "payment-1").await?.is_some();
    writeln!(out, "key {key}").expect("stdout");
    writeln!(out, "coordinator {}", core.with_catalogue(|c| c.txns().count())).expect("stdout");
    out.flush().expect("stdout");
    Ok(())
}
