//! A three-node core under faults: publishers with idempotency keys write through random nodes
//! while links are cut (one way and both), nodes are isolated, and nodes are stopped (their
//! in-memory storage losing what was not synced) and started again. After healing, one consumer
//! reads the queue and checks that every confirmed message is there exactly once, and that each
//! publisher's messages kept their order. The fault schedule comes from a seed, printed on
//! failure; `WHARF_FAULT_SEED` replays a schedule (the interleaving is the runtime's, so a replay
//! is close, not exact) and `WHARF_FAULT_ROUNDS` runs more seeds. Touches only in-memory storage.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use wharf_core::model::Message;
use wharf_core::node::{ConsumeOptions, ConsumerEvent, QueueSpec};
use wharf_core::queue::{ConsumerId, Outcome};
use wharf_core::raft::storage::MemStorage;
use wharf_core::raft::transport::{RaftService, Switchboard};
use wharf_core::{ClusterLink, Core};

const NODES: u64 = 3;
const PUBLISHERS: usize = 3;
const MESSAGES_PER_PUBLISHER: usize = 40;
const FAULTS: usize = 12;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The nodes: their storage (which outlives a stop), their running core if any.
struct Nodes {
    board: Arc<Switchboard>,
    storages: Vec<MemStorage>,
    cores: Mutex<Vec<Option<Core>>>,
}

impl Nodes {
    fn voters() -> BTreeMap<u64, String> {
        (1..=NODES).map(|id| (id, format!("node-{id}"))).collect()
    }

    async fn open(&self, id: u64) -> Core {
        let mut config = common::memory_config(2);
        config.node_id = id;
        let service = Arc::new(RaftService::new());
        self.board.attach(id, Arc::clone(&service));
        let link = ClusterLink { voters: Self::voters(), transport: self.board.transport(id), service, join: false };
        let storage = Arc::new(self.storages[(id - 1) as usize].clone());
        tokio::time::timeout(TIMEOUT, Core::open_in(config, storage, Some(link)))
            .await
            .unwrap_or_else(|_| panic!("node {id} did not open in time"))
            .unwrap_or_else(|e| panic!("open node {id}: {e}"))
    }

    fn running(&self) -> Vec<Core> {
        self.cores.lock().unwrap().iter().flatten().cloned().collect()
    }

    async fn stop(&self, id: u64) {
        let core = self.cores.lock().unwrap()[(id - 1) as usize].take();
        if let Some(core) = core {
            // Whatever the shutdown's outcome, the node is gone: detached, its writes not yet
            // synced lost.
            let _ = core.shutdown().await;
            self.board.detach(id);
            self.storages[(id - 1) as usize].crash();
        }
    }

    async fn start(&self, id: u64) {
        let core = self.open(id).await;
        self.cores.lock().unwrap()[(id - 1) as usize] = Some(core);
    }
}

/// Publish `payload` with its own key through any running node until a node confirms it.
async fn publish(nodes: &Nodes, rng: &Mutex<TestRng>, payload: String) {
    let mut message = Message::new("", "events", payload.clone());
    message.idempotency_key = Some(payload.clone());
    message.partition_key = Some(payload.split('-').next().unwrap_or_default().to_owned());
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{payload} never confirmed");
        let running = nodes.running();
        if running.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let core = &running[rng.lock().unwrap().random_range(0..running.len())];
        match tokio::time::timeout(Duration::from_secs(15), core.publish_confirmed("/", message.clone())).await {
            Ok(Ok(published)) if published.confirmed() && !published.unroutable() => return,
            Ok(Ok(published)) => panic!("{payload}: {published:?}"),
            Ok(Err(error)) if error.is_retryable() => {}
            Ok(Err(error)) => panic!("publish {payload}: {error}"),
            // Stuck behind a partition: try elsewhere (the key makes a retry safe).
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(seed: u64) {
    let nodes = Arc::new(Nodes {
        board: Switchboard::new(),
        storages: (0..NODES).map(|_| MemStorage::new()).collect(),
        cores: Mutex::new(vec![None; NODES as usize]),
    });
    let opening: Vec<_> = (1..=NODES)
        .map(|id| {
            let nodes = Arc::clone(&nodes);
            tokio::spawn(async move { nodes.open(id).await })
        })
        .collect();
    for (index, opened) in opening.into_iter().enumerate() {
        nodes.cores.lock().unwrap()[index] = Some(opened.await.unwrap());
    }
    let spec = QueueSpec { vhost: "/".into(), name: "events".into(), durable: true, ..QueueSpec::default() };
    let mut arguments = wharf_core::model::Headers::new();
    arguments.push("x-partitions", wharf_core::model::FieldValue::I64(2));
    nodes.running()[0].declare_queue(QueueSpec { arguments, ..spec }).await.expect("declare");

    // The schedule's generator, from the seed (ChaCha takes 32 bytes).
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = Arc::new(Mutex::new(TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes)));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (nodes, rng) = (Arc::clone(&nodes), Arc::clone(&rng));
            tokio::spawn(async move {
                for n in 0..MESSAGES_PER_PUBLISHER {
                    publish(&nodes, &rng, format!("p{p}-{n:04}")).await;
                }
            })
        })
        .collect();

    // Faults, one at a time, while the publishers run. At most one node is stopped or isolated
    // at once, so a majority can always make progress.
    for _ in 0..FAULTS {
        let (kind, a, b, pause) = {
            let mut rng = rng.lock().unwrap();
            (
                rng.random_range(0..4),
                rng.random_range(1..=NODES),
                rng.random_range(1..=NODES),
                rng.random_range(100..500),
            )
        };
        match kind {
            0 => nodes.board.isolate(&[a]),
            1 if a != b => nodes.board.cut(a, b),
            2 => nodes.stop(a).await,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
        nodes.board.heal();
        if kind == 2 {
            nodes.start(a).await;
        }
    }
    for publisher in publishers {
        tokio::time::timeout(TIMEOUT, publisher).await.expect("publishers finish").expect("publisher");
    }

    // Healed: read everything once through one node and check it.
    let core = nodes.running()[0].clone();
    let id = ConsumerId { connection: core.new_connection(), seq: 1 };
    let mut consumer = loop {
        match core.consume("/", "events", id, ConsumeOptions::default()).await {
            Ok(consumer) => break consumer,
            Err(error) if error.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("consume: {error}"),
        }
    };
    let total = PUBLISHERS * MESSAGES_PER_PUBLISHER;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while seen.len() < total {
        let delivery = match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
            Ok(Some(ConsumerEvent::Delivery(delivery))) => delivery,
            other => panic!("{} of {total} messages read, then {other:?}", seen.len()),
        };
        let payload = String::from_utf8_lossy(&delivery.message.payload).into_owned();
        let publisher = payload.split('-').next().unwrap_or_default().to_owned();
        if !delivery.redelivered {
            if let Some(previous) = last.get(&publisher) {
                assert!(previous < &payload, "{payload} delivered after {previous}: order lost");
            }
            last.insert(publisher, payload.clone());
        }
        *seen.entry(payload).or_default() += 1;
        core.settle(id, &[delivery.position], Outcome::Ack).await.expect("ack");
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(doubled.is_empty(), "stored twice: {doubled:?}");
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await {
        panic!("more than the {total} messages published: {event:?}");
    }
    // All at once: a node shut down after the others could not drain without a majority.
    let stopping: Vec<_> =
        nodes.running().into_iter().map(|core| tokio::spawn(async move { core.shutdown().await })).collect();
    for stopped in stopping {
        let _ = stopped.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_cut_links_isolated_and_restarted_nodes_once_and_in_order() {
    let first: u64 = std::env::var("WHARF_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let rounds: u64 = std::env::var("WHARF_FAULT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for seed in first..first + rounds {
        let outcome = tokio::spawn(run(seed)).await;
        if let Err(panic) = outcome {
            eprintln!("fault schedule failed: replay with WHARF_FAULT_SEED={seed} WHARF_FAULT_ROUNDS=1");
            std::panic::resume_unwind(panic.into_panic());
        }
    }
}
