//! Property test of exactly-once: random interleavings of keyed publishes, retries, transactions
//! (acknowledge an input, publish keyed outputs to queues on two shards) committed, rolled back or
//! interrupted by a crash at each point of two-phase commit, with restarts. Checked against a
//! reference model after every step: no key committed twice, nothing of an aborted transaction
//! visible, every committed transaction visible entirely, the input consumed exactly when its
//! transaction committed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use wharf_core::model::{Message, Position};
use wharf_core::node::{ConsumeOptions, Consumer, ConsumerEvent, QueueSpec, TxnStop};
use wharf_core::queue::{ConsumerId, Outcome};
use wharf_core::raft::storage::MemStorage;
use wharf_core::{Core, CoreConfig, StorageKind};

const INPUTS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A plain publish (or a producer's retry) with a key, to queue 0 or 1.
    Publish { queue: usize, key: u8 },
    /// A transaction: acknowledge the held input (if any), publish these (queue, key) outputs.
    Txn { ack: bool, outputs: Vec<(usize, Option<u8>)>, end: End },
}

#[derive(Debug, Clone, Copy)]
enum End {
    Commit,
    Rollback,
    /// Crash right after the coordinator recorded the start.
    CrashAfterBegin,
    /// Crash after one participant prepared.
    CrashAfterOnePrepare,
    /// Crash after the decision was recorded.
    CrashAfterDecision,
}

fn op() -> impl Strategy<Value = Op> {
    let end = prop_oneof![
        3 => Just(End::Commit),
        1 => Just(End::Rollback),
        1 => Just(End::CrashAfterBegin),
        1 => Just(End::CrashAfterOnePrepare),
        1 => Just(End::CrashAfterDecision),
    ];
    prop_oneof![
        2 => (0usize..2, 0u8..4).prop_map(|(queue, key)| Op::Publish { queue, key }),
        3 => (any::<bool>(), prop::collection::vec((0usize..2, prop::option::of(0u8..4)), 1..4), end)
            .prop_map(|(ack, outputs, end)| Op::Txn { ack, outputs, end }),
    ]
}

fn config() -> CoreConfig {
    let mut config = CoreConfig::single_node("/nonexistent");
    config.storage = StorageKind::Memory;
    config.shard_count = 3;
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config
}

/// The model: what each queue must hold (bodies), which keys each output queue has committed, and
/// which inputs are consumed.
#[derive(Debug, Default)]
struct Model {
    queues: [Vec<String>; 2],
    keys: [BTreeSet<u8>; 2],
    inputs_left: usize,
}

struct World {
    storage: MemStorage,
    core: Core,
    queues: [String; 2],
    /// Shards of the two output queues and of the input queue: a transaction touching more than
    /// one shard runs two-phase commit.
    shards: [u32; 3],
    consumer: Consumer,
    id: ConsumerId,
    /// The input delivery the consumer holds, if any.
    held: Option<Position>,
}

async fn attach(core: &Core) -> (Consumer, ConsumerId) {
    let id = ConsumerId { connection: core.new_connection(), seq: 0 };
    let consumer = core
        .consume("/", "input", id, ConsumeOptions { prefetch: 1, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    (consumer, id)
}

async fn take(consumer: &mut Consumer) -> Option<Position> {
    match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
        Ok(Some(ConsumerEvent::Delivery(d))) => Some(d.position),
        _ => None,
    }
}

impl World {
    async fn new() -> (Self, Model) {
        let storage = MemStorage::new();
        let core = Core::open_on(config(), Arc::new(storage.clone())).await.expect("open");
        let mut names: Vec<(String, u32)> = Vec::new();
        for i in 0..32 {
            let name = format!("out-{i}");
            let spec = QueueSpec { vhost: "/".into(), name: name.clone(), durable: true, ..QueueSpec::default() };
            let id = core.declare_queue(spec).await.expect("declare").id;
            names.push((name, wharf_core::placement::shard_for(id, 0, 3)));
            if names.iter().any(|(_, s)| *s != names[0].1) {
                break;
            }
        }
        let (second, second_shard) = names.iter().find(|(_, s)| *s != names[0].1).expect("two shards").clone();
        let spec = QueueSpec { vhost: "/".into(), name: "input".into(), durable: true, ..QueueSpec::default() };
        let input_id = core.declare_queue(spec).await.expect("declare input").id;
        let shards = [names[0].1, second_shard, wharf_core::placement::shard_for(input_id, 0, 3)];
        for i in 0..INPUTS {
            core.publish_confirmed("/", Message::new("", "input", format!("in-{i}"))).await.expect("input");
        }
        let (mut consumer, id) = attach(&core).await;
        let held = take(&mut consumer).await;
        let world = Self { storage, core, queues: [names[0].0.clone(), second], shards, consumer, id, held };
        (world, Model { inputs_left: INPUTS, ..Model::default() })
    }

    /// Crash: stop the groups without a word to anyone, lose what was not durable, restart.
    async fn crash_and_restart(&mut self) {
        self.core.shutdown().await.expect("stop");
        self.storage.crash();
        self.core = Core::open_on(config(), Arc::new(self.storage.clone())).await.expect("reopen");
        let (consumer, id) = attach(&self.core).await;
        let old = std::mem::replace(&mut self.consumer, consumer);
        std::mem::forget(old);
        self.id = id;
        self.held = take(&mut self.consumer).await;
    }
}

fn message(queue: &str, body: String, key: Option<u8>) -> Message {
    let mut m = Message::new("", queue, body);
    m.idempotency_key = key.map(|k| format!("key-{k}"));
    m
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut world, mut model) = World::new().await;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Publish { queue, key } => {
                let body = format!("p{step}");
                let published = world
                    .core
                    .publish_confirmed("/", message(&world.queues[queue], body.clone(), Some(key)))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let duplicate = model.keys[queue].contains(&key);
                prop_assert_eq!(published.is_duplicate(), duplicate, "verdict for key {} in queue {}", key, queue);
                if !duplicate {
                    model.keys[queue].insert(key);
                    model.queues[queue].push(body);
                }
            }
            Op::Txn { ack, outputs, end } => {
                let mut txn = world.core.begin_txn();
                let acked = if ack { world.held } else { None };
                if let Some(position) = acked {
                    txn.ack(world.id, &[position]);
                }
                let mut staged = Vec::new();
                for (i, (queue, key)) in outputs.iter().enumerate() {
                    let body = format!("t{step}-{i}");
                    txn.publish("/", message(&world.queues[*queue], body.clone(), *key));
                    staged.push((*queue, *key, body));
                }
                // Would it commit? Not if a key is committed already or used twice in it.
                let mut seen = BTreeSet::new();
                let acceptable = staged.iter().all(|(queue, key, _)| {
                    key.is_none_or(|k| !model.keys[*queue].contains(&k) && seen.insert((*queue, k)))
                });
                let mut shards: BTreeSet<u32> = staged.iter().map(|(q, _, _)| world.shards[*q]).collect();
                if acked.is_some() {
                    shards.insert(world.shards[2]);
                }
                let two_phase = shards.len() > 1;
                let mut crashed = false;
                let committed = match end {
                    End::Rollback => {
                        txn.rollback();
                        // Nothing was sent: the rolled-back transaction commits nothing.
                        let result = world.core.commit_txn(txn).await;
                        prop_assert!(result.is_ok(), "an empty transaction commits");
                        false
                    }
                    End::Commit => {
                        let result = world.core.commit_txn(txn).await;
                        prop_assert_eq!(result.is_ok(), acceptable, "commit outcome: {:?}", result.err());
                        acceptable
                    }
                    End::CrashAfterBegin | End::CrashAfterOnePrepare | End::CrashAfterDecision if two_phase => {
                        let stop = match end {
                            End::CrashAfterBegin => TxnStop::AfterBegin,
                            End::CrashAfterOnePrepare => TxnStop::AfterPrepared(1),
                            _ => TxnStop::AfterDecision,
                        };
                        let stopped = world.core.commit_txn_until(txn, stop).await;
                        prop_assert!(matches!(stopped, Ok(None)), "stopped: {:?}", stopped);
                        world.crash_and_restart().await;
                        crashed = true;
                        // Only a recorded commit decision survives the crash.
                        matches!(end, End::CrashAfterDecision) && acceptable
                    }
                    _ => {
                        // One shard: a single entry, then a crash.
                        let result = world.core.commit_txn(txn).await;
                        prop_assert_eq!(result.is_ok(), acceptable);
                        world.crash_and_restart().await;
                        crashed = true;
                        acceptable
                    }
                };
                if committed {
                    for (queue, key, body) in staged {
                        if let Some(k) = key {
                            model.keys[queue].insert(k);
                        }
                        model.queues[queue].push(body);
                    }
                    if acked.is_some() {
                        model.inputs_left -= 1;
                    }
                }
                // After a crash the restarted consumer already took what it holds. Otherwise, an
                // input consumed by the commit frees the consumer for the next one; a refused or
                // rolled-back acknowledgement leaves the delivery with it.
                if !crashed && (world.held.is_none() || (committed && acked.is_some())) {
                    world.held = take(&mut world.consumer).await;
                }
            }
        }
        for queue in 0..2 {
            let (ready, _) =
                world.core.queue_status("/", &world.queues[queue]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ready, model.queues[queue].len() as u64, "step {}: messages in queue {}", step, queue);
            for key in 0..4u8 {
                let found = world
                    .core
                    .idempotency_lookup("/", &world.queues[queue], &format!("key-{key}"))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(
                    found.is_some(),
                    model.keys[queue].contains(&key),
                    "step {}: key {} in queue {}",
                    step,
                    key,
                    queue
                );
            }
        }
        let (ready, consumers) =
            world.core.queue_status("/", "input").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(consumers, 1);
        prop_assert_eq!(
            ready + u64::from(world.held.is_some()),
            model.inputs_left as u64,
            "step {}: inputs left",
            step
        );
    }
    // Finally the exact contents, in order.
    for queue in 0..2 {
        let holder = ConsumerId { connection: world.core.new_connection(), seq: 9 };
        let mut bodies = Vec::new();
        while let Some(d) = world
            .core
            .get("/", &world.queues[queue], holder, true)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            bodies.push(String::from_utf8_lossy(&d.message.payload).into_owned());
        }
        prop_assert_eq!(&bodies, &model.queues[queue], "contents of queue {}", queue);
    }
    if let Some(position) = world.held {
        world.core.settle(world.id, &[position], Outcome::Ack).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    world.core.shutdown().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn transactions_and_keys_match_the_model(ops in prop::collection::vec(op(), 1..20)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(run(ops))?;
    }
}
