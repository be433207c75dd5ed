//! Raft groups replicated over the cluster transport: three nodes of one process, each on its own
//! in-memory storage, joined by the in-process switchboard (which cuts links) or by gRPC on
//! loopback sockets. Leaders are elected, writes reach every
//! replica, an isolated or crashed leader is replaced without losing an acknowledged write, a
//! crashed replica (un-synced writes lost) catches up from the log or from a snapshot, and nothing
//! unacknowledged by a majority ever appears. Touches in-memory storage and loopback sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::{BasicNode, Raft, ServerState};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use wharf_core::raft::Proposal;
use wharf_core::raft::group::{GroupStart, raft_config, start_group};
use wharf_core::raft::grpc::{GrpcTransport, raft_server};
use wharf_core::raft::network::ClusterNetwork;
use wharf_core::raft::state_machine::{EffectSink, StateReader};
use wharf_core::raft::storage::{MemStorage, Storage, Syncer};
use wharf_core::raft::transport::{RaftService, Switchboard, Transport};

#[path = "common/counters.rs"]
mod counters;

use counters::{CounterCommand, CounterEffect, Counters, TestConfig};

const GROUP: &str = "shard-0";
const TIMEOUT: Duration = Duration::from_secs(20);
const MESSAGE_SIZE_MAX_BYTES: usize = 16 << 20;

/// How the nodes reach each other.
enum Net {
    /// In process, with links that can be cut.
    Switchboard,
    /// gRPC on loopback: each node's address, and its server while it runs.
    Grpc(BTreeMap<u64, (SocketAddr, Option<JoinHandle<()>>)>),
}

/// One node: its storage outlives its Raft instance, as a disk outlives a process.
struct Node {
    id: u64,
    storage: Arc<MemStorage>,
    service: Arc<RaftService>,
    running: Option<(Raft<TestConfig>, StateReader<Counters>)>,
}

struct Cluster {
    board: Arc<Switchboard>,
    net: Net,
    nodes: Vec<Node>,
    snapshot_logs_since_last: u64,
    /// What every acknowledged write added, by key; and how many were acknowledged.
    expected: BTreeMap<String, u64>,
    acknowledged: u64,
}

impl Cluster {
    /// Nodes 1..=`count` joined by the switchboard, all started, formed into one group.
    async fn start(count: u64, snapshot_logs_since_last: u64) -> Self {
        Self::start_on(Net::Switchboard, count, snapshot_logs_since_last).await
    }

    /// Nodes 1..=`count` joined by gRPC on loopback, all started, formed into one group.
    async fn start_grpc(count: u64, snapshot_logs_since_last: u64) -> Self {
        let mut addrs = BTreeMap::new();
        for id in 1..=count {
            // Reserve a free port; the node binds it again when it starts.
            let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
            addrs.insert(id, (port, None));
        }
        Self::start_on(Net::Grpc(addrs), count, snapshot_logs_since_last).await
    }

    async fn start_on(net: Net, count: u64, snapshot_logs_since_last: u64) -> Self {
        let board = Switchboard::new();
        let nodes = (1..=count)
            .map(|id| Node {
                id,
                storage: Arc::new(MemStorage::new()),
                service: Arc::new(RaftService::new()),
                running: None,
            })
            .collect();
        let mut cluster =
            Self { board, net, nodes, snapshot_logs_since_last, expected: BTreeMap::new(), acknowledged: 0 };
        for id in 1..=count {
            cluster.start_node(id).await;
        }
        cluster
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|node| node.id == id).expect("a node of the cluster")
    }

    fn raft(&self, id: u64) -> &Raft<TestConfig> {
        &self.node(id).running.as_ref().expect("a running node").0
    }

    fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    fn voters(&self) -> BTreeMap<u64, BasicNode> {
        let addr = |id: u64| match &self.net {
            Net::Switchboard => format!("node-{id}"),
            Net::Grpc(addrs) => addrs[&id].0.to_string(),
        };
        self.ids().into_iter().map(|id| (id, BasicNode::new(addr(id)))).collect()
    }

    async fn start_node(&mut self, id: u64) {
        let voters = self.voters();
        let transport: Arc<dyn Transport> = match &self.net {
            Net::Switchboard => self.board.transport(id),
            Net::Grpc(_) => GrpcTransport::new(MESSAGE_SIZE_MAX_BYTES),
        };
        let config = raft_config(50, 150, self.snapshot_logs_since_last, 5_000).unwrap();
        let board = Arc::clone(&self.board);
        let node = self.nodes.iter_mut().find(|node| node.id == id).unwrap();
        assert!(node.running.is_none(), "node {id} runs already");
        let storage: Arc<dyn Storage> = node.storage.clone();
        let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
        let no_effects: EffectSink<CounterEffect> = Arc::new(|_| {});
        let start =
            GroupStart { name: GROUP, node_id: id, raft_config: config, voters, elect_first: id == 1, form: true };
        let network = ClusterNetwork::new(GROUP, transport);
        let (raft, reader) =
            start_group::<TestConfig, Counters, _>(start, network, storage, syncer, no_effects).await.unwrap();
        node.service.register(GROUP, Arc::new(raft.clone()));
        board.attach(id, Arc::clone(&node.service));
        let service = Arc::clone(&node.service);
        node.running = Some((raft, reader));
        if let Net::Grpc(addrs) = &mut self.net {
            let (addr, server) = addrs.get_mut(&id).unwrap();
            let listener = TcpListener::bind(*addr).await.unwrap();
            let router =
                tonic::transport::Server::builder().add_service(raft_server(id, service, MESSAGE_SIZE_MAX_BYTES));
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            *server = Some(tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() }));
        }
    }

    /// Kill node `id` and lose every write it had not synced, as a power loss would.
    async fn crash(&mut self, id: u64) {
        self.board.detach(id);
        if let Net::Grpc(addrs) = &mut self.net {
            // Dropping the server closes its listener and every connection to it.
            let server = addrs.get_mut(&id).unwrap().1.take().expect("a running server");
            server.abort();
            let _ = server.await;
        }
        let node = self.nodes.iter_mut().find(|node| node.id == id).unwrap();
        node.service.deregister(GROUP);
        let (raft, reader) = node.running.take().expect("a running node");
        raft.shutdown().await.unwrap();
        drop((raft, reader));
        let weak: Weak<MemStorage> = Arc::downgrade(&node.storage);
        let deadline = Instant::now() + TIMEOUT;
        // The group's tasks hold the storage until they finish, shortly after shutdown returns.
        while weak.strong_count() > 1 {
            assert!(Instant::now() < deadline, "node {id}'s storage still in use after shutdown");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node.storage.crash();
    }

    /// The leader among the running nodes of `among`, once one of them leads and the others agree.
    async fn leader(&self, among: &[u64]) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let leaders: Vec<u64> = among
                .iter()
                .filter(|&&id| self.node(id).running.is_some())
                .filter(|&&id| self.raft(id).metrics().borrow().state == ServerState::Leader)
                .copied()
                .collect();
            if let [leader] = leaders[..] {
                let agreed = among
                    .iter()
                    .filter(|&&id| self.node(id).running.is_some())
                    .all(|&id| self.raft(id).metrics().borrow().current_leader == Some(leader));
                if agreed {
                    return leader;
                }
            }
            assert!(Instant::now() < deadline, "no single leader among {among:?}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Write `count` increments through the leader among `among`, each acknowledged before the
    /// next, and record them as acknowledged.
    async fn write(&mut self, among: &[u64], first: u64, count: u64) {
        for n in first..first + count {
            let key = format!("k{}", n % 5);
            let proposal =
                Proposal { time_ms: 1_000_000 + n, commands: vec![CounterCommand::Add { key: key.clone(), delta: n }] };
            let leader = self.leader(among).await;
            let reply = tokio::time::timeout(TIMEOUT, self.raft(leader).client_write(proposal))
                .await
                .expect("a write on a leader with a majority commits")
                .unwrap_or_else(|e| panic!("write {n} on leader {leader}: {e}"));
            let value = self.expected.entry(key).or_default();
            *value += n;
            self.acknowledged += 1;
            assert_eq!(reply.data.0, vec![*value], "reply to write {n}");
        }
    }

    /// Wait until the leader among `among` has purged its log up to `index` at least.
    async fn purged(&self, among: &[u64], index: u64) {
        let leader = self.leader(among).await;
        let deadline = Instant::now() + TIMEOUT;
        while self.raft(leader).metrics().borrow().purged.map_or(0, |id| id.index) < index {
            assert!(Instant::now() < deadline, "leader {leader} never purged its log up to {index}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until every running node has applied exactly the acknowledged writes.
    async fn converged(&self) {
        let deadline = Instant::now() + TIMEOUT;
        for node in &self.nodes {
            let Some((_, reader)) = &node.running else { continue };
            loop {
                let (applied, values) = reader.read(|state| (state.applied_commands, state.values.clone()));
                assert!(
                    applied <= self.acknowledged,
                    "node {}: {applied} writes applied, {} acknowledged",
                    node.id,
                    self.acknowledged
                );
                if applied == self.acknowledged {
                    assert_eq!(values, self.expected, "node {}'s state", node.id);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {}: {applied} of {} writes applied",
                    node.id,
                    self.acknowledged
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_by_the_leader_is_applied_on_every_replica() {
    let mut cluster = Cluster::start(3, 5_000).await;
    cluster.write(&[1, 2, 3], 0, 60).await;
    cluster.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_and_its_unacknowledged_write_never_appears() {
    let mut cluster = Cluster::start(3, 5_000).await;
    cluster.write(&[1, 2, 3], 0, 20).await;
    let old = cluster.leader(&[1, 2, 3]).await;
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    cluster.board.isolate(&[old]);

    // The old leader cannot reach a majority: its write is never acknowledged.
    let stray = Proposal { time_ms: 2_000_000, commands: vec![CounterCommand::Add { key: "stray".into(), delta: 1 }] };
    let attempt = tokio::time::timeout(Duration::from_secs(1), cluster.raft(old).client_write(stray)).await;
    assert!(!matches!(attempt, Ok(Ok(_))), "a leader cut off from the majority acknowledged a write");

    // The majority elects another leader and goes on.
    cluster.write(&rest, 20, 20).await;
    assert_ne!(cluster.leader(&rest).await, old);

    // Healed, the old leader follows, drops its stray entry and catches up.
    cluster.board.heal();
    cluster.converged().await;
    cluster.write(&[1, 2, 3], 40, 5).await;
    cluster.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_and_no_acknowledged_write_is_lost() {
    let mut cluster = Cluster::start(3, 5_000).await;
    cluster.write(&[1, 2, 3], 0, 30).await;
    let old = cluster.leader(&[1, 2, 3]).await;
    cluster.crash(old).await;
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    cluster.write(&rest, 30, 30).await;
    cluster.converged().await;

    cluster.start_node(old).await;
    cluster.converged().await;
    cluster.write(&[1, 2, 3], 60, 5).await;
    cluster.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_purged_log_catches_up_from_a_snapshot() {
    // A snapshot every 10 entries; the log is purged below it (64 entries kept), so a replica down
    // for 200 writes is behind the leader's log and must be sent the snapshot.
    let mut cluster = Cluster::start(3, 10).await;
    cluster.write(&[1, 2, 3], 0, 10).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let down = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    cluster.crash(down).await;
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != down).collect();
    cluster.write(&rest, 10, 200).await;
    cluster.purged(&rest, 100).await;

    // Its log ends near index 10 and the leader's starts above 100: only a snapshot brings it up.
    cluster.start_node(down).await;
    cluster.converged().await;
    let snapshot = cluster.raft(down).metrics().borrow().snapshot;
    assert!(snapshot.is_some_and(|id| id.index >= 100), "node {down} caught up without a snapshot: {snapshot:?}");
    cluster.write(&[1, 2, 3], 210, 5).await;
    cluster.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_from_the_leader_moves_leadership_and_loses_nothing() {
    let mut cluster = Cluster::start(3, 5_000).await;
    cluster.write(&[1, 2, 3], 0, 10).await;
    let old = cluster.leader(&[1, 2, 3]).await;
    // The leader still hears the others but cannot reach them: its heartbeats stop arriving.
    for id in cluster.ids() {
        if id != old {
            cluster.board.cut(old, id);
        }
    }
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    cluster.write(&rest, 10, 10).await;
    cluster.board.heal();
    cluster.write(&[1, 2, 3], 20, 10).await;
    cluster.converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_writes_replicate_a_crashed_leader_is_replaced_and_a_restarted_replica_catches_up() {
    let mut cluster = Cluster::start_grpc(3, 10).await;
    cluster.write(&[1, 2, 3], 0, 30).await;
    cluster.converged().await;

    let old = cluster.leader(&[1, 2, 3]).await;
    cluster.crash(old).await;
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    cluster.write(&rest, 30, 150).await;
    cluster.purged(&rest, 100).await;

    // Restarted on its old address, it is behind the leader's purged log: a snapshot is sent.
    cluster.start_node(old).await;
    cluster.converged().await;
    cluster.write(&[1, 2, 3], 180, 5).await;
    cluster.converged().await;
}
