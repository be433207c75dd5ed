//! The core API handle every front-end uses: opens storage, runs the meta group and the shard
//! groups, and exposes declare/bind/publish/consume/settle/get/purge. Touches everything below it
//! in this crate; nothing below touches it.
//!
//! Request paths: catalogue changes go to the meta group; message operations go to the shard that
//! owns the partition ([`crate::placement`]). Every change is a command committed through a
//! group's [`proposer::Proposer`] (group commit), and replies come back only after commit.

mod background;
mod consumers;
mod membership;
pub(crate) mod proposer;
mod state;
mod txn;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Raft;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::consumers::Registry;
pub use self::consumers::{ConsumeOptions, Consumer, ConsumerEvent, Stopped};
pub use self::membership::{GroupLeader, GroupMembers};
use self::proposer::{Forwarder, GroupEndpoint, Proposer, ReplyReceiver, catch_up, wait};
pub use self::txn::{CheckBack, PreparedTxn, Txn, TxnCommitted, TxnStop};
use crate::alarms::AlarmMonitor;
pub use crate::catalogue::state::StateWrite;
use crate::catalogue::{
    BindingSpec, Catalogue, ExchangeDeclare, ExchangeKind, MetaCommand, MetaReply, QueueDeclare, QueueDef, Route,
    RoutedQueue,
};
use crate::config::{CoreConfig, StorageKind};
use crate::error::{CoreError, CoreResult};
use crate::model::{ConnectionId, FieldValue, Headers, Message, Position, QueueId, QueueName};
use crate::placement::{partition_for, shard_for};
use crate::queue::{AttachRules, ConsumerId, DeadLetter, Delivery, Effect, Outcome, PartitionCaps};
use crate::raft::group::{GroupStart, raft_config, start_group, wait_for_leader};
use crate::raft::network::ClusterNetwork;
use crate::raft::runtime::WharfRuntime;
use crate::raft::state_machine::{EffectSink, StateReader};
use crate::raft::storage::{Durability, FjallStorage, MemStorage, Storage, Syncer, run_io};
use crate::raft::transport::{NoPeers, RaftService, Transport};
use crate::raft::{Proposal, Replies};
use crate::shard::{PartitionKey, PublishOutcome, ShardCommand, ShardReply, ShardState};

openraft::declare_raft_types!(
    /// Types of the meta group (the catalogue).
    pub MetaTypes: D = Proposal<MetaCommand>, R = Replies<MetaReply>, AsyncRuntime = WharfRuntime,
);
openraft::declare_raft_types!(
    /// Types of a shard group (queue partitions).
    pub ShardTypes: D = Proposal<ShardCommand>, R = Replies<ShardReply>, AsyncRuntime = WharfRuntime,
);

/// How long start-up on a single node waits for each group to elect itself.
const LEADER_WAIT_SECS: u64 = 30;
/// How often a cluster node still starting says what it waits for.
const START_REPORT_SECS: u64 = 10;
/// Pause before running recovery again after a leadership change interrupted it.
const RECOVER_RETRY_MS: u64 = 100;
/// Attempts at committing an acknowledgement.
const SETTLE_ATTEMPTS_MAX: u32 = 8;
/// First and longest pause between attempts at a command that was not committed (doubling).
const RETRY_MS_MIN: u64 = 50;
const RETRY_MS_MAX: u64 = 2_000;
/// How long shutdown waits for queued and in-flight commits to finish.
const DRAIN_WAIT_SECS: u64 = 20;
/// The default virtual host, created on first start.
pub const DEFAULT_VHOST: &str = "/";

struct Group<C: openraft::RaftTypeConfig, S: crate::raft::ReplicatedState> {
    /// `meta` or `shard-N`, the same on every node.
    name: String,
    raft: Raft<C>,
    reader: StateReader<S>,
    proposer: Proposer<S>,
}

/// A running core node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("node_id", &self.inner.config.node_id)
            .field("incarnation", &self.inner.incarnation)
            .finish()
    }
}

struct Inner {
    config: CoreConfig,
    /// The cluster this node belongs to (`None` on a single node).
    cluster: Option<ClusterLink>,
    incarnation: u64,
    storage: Arc<dyn Storage>,
    meta: Group<MetaTypes, Catalogue>,
    shards: Vec<Group<ShardTypes, ShardState>>,
    registry: Arc<Registry>,
    ready: AtomicBool,
    closing: AtomicBool,
    connection_seq: AtomicU64,
    txn_seq: AtomicU64,
    /// Check-back handlers of half messages, by producer group (local to this node).
    check_backs: Mutex<BTreeMap<String, mpsc::Sender<CheckBack>>>,
    /// `basic.get` holders per connection, so closing a connection returns what they hold.
    getters: Mutex<BTreeMap<ConnectionId, Vec<(ConsumerId, PartitionKey)>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: tokio::sync::watch::Sender<bool>,
    alarms: Arc<AlarmMonitor>,
}

/// What a published message became.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Where it was stored, one position per queue that took it.
    pub positions: Vec<Position>,
    /// Queues that already had its idempotency key: where the original was stored (nothing was
    /// stored again).
    pub duplicates: Vec<Position>,
    /// Queues that refused it (`x-overflow: reject-publish`, capacity).
    pub rejected: Vec<QueueName>,
    /// Queues the exchange routed it to (taken, refused, or deleted meanwhile).
    pub routed: usize,
}

impl Published {
    /// Whether no queue took it because none matched (AMQP `basic.return` for mandatory).
    pub fn unroutable(&self) -> bool {
        self.routed == 0
    }

    /// Whether every routed queue took it (an AMQP positive confirm). A duplicate counts as taken:
    /// the original is there.
    pub fn confirmed(&self) -> bool {
        self.rejected.is_empty()
    }

    /// The "duplicate" verdict: every queue that has the message had it already, from an earlier
    /// publish with the same idempotency key.
    pub fn is_duplicate(&self) -> bool {
        self.positions.is_empty() && !self.duplicates.is_empty()
    }
}

/// One Raft group as this node sees it (the admin endpoint's `/cluster`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    /// The group (`meta`, `shard-3`).
    pub group: String,
    /// This node's role in it: `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// The last index in this node's log.
    pub last_log_index: Option<u64>,
    /// The last index applied by this node's replica.
    pub last_applied_index: Option<u64>,
    /// The voters, by node id.
    pub voters: Vec<u64>,
    /// On the leader only: the last index known replicated to each node.
    pub replicated: Option<BTreeMap<u64, Option<u64>>>,
}

impl GroupStatus {
    fn of<C: openraft::RaftTypeConfig<NodeId = u64>>(group: &str, raft: &Raft<C>) -> Self {
        let metrics = raft.metrics().borrow().clone();
        let state = match metrics.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        Self {
            group: group.to_owned(),
            state: state.into(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|id| id.index),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            replicated: metrics
                .replication
                .map(|nodes| nodes.into_iter().map(|(node, matched)| (node, matched.map(|id| id.index))).collect()),
        }
    }
}

/// Per shard: which routed queue (by index) and partition each outcome answers for, and the reply.
type ShardWait = (Vec<(usize, PartitionKey)>, ReplyReceiver<ShardReply>);

/// A publish queued for commit: the message is ordered behind earlier publishes of the same
/// caller. Await [`PendingPublish::confirm`] for the outcome.
#[derive(Debug)]
#[must_use = "a publish is confirmed only when its confirmation is awaited"]
pub struct PendingPublish {
    routed: Vec<RoutedQueue>,
    waits: Vec<ShardWait>,
}

impl PendingPublish {
    /// Wait until the message is committed (fsynced on a majority) in every queue it was routed to.
    pub async fn confirm(self) -> CoreResult<Published> {
        let mut published = Published { routed: self.routed.len(), ..Published::default() };
        // The canary build confirms what was only queued for commit: the simulation must see it.
        #[cfg(feature = "canary-confirm-before-commit")]
        if !self.waits.is_empty() {
            return Ok(published);
        }
        for (indexes, rx) in self.waits {
            let ShardReply::Published(outcomes) = wait(rx).await? else {
                return Err(CoreError::Internal("publish answered with another reply".into()));
            };
            for ((index, target), outcome) in indexes.into_iter().zip(outcomes) {
                let queue = &self.routed[index];
                match outcome {
                    PublishOutcome::Stored(offset) => {
                        published.positions.push(Position { queue: target.0, partition: target.1, offset })
                    }
                    PublishOutcome::Duplicate(offset) => {
                        published.duplicates.push(Position { queue: target.0, partition: target.1, offset })
                    }
                    PublishOutcome::Rejected => published.rejected.push(queue.name.clone()),
                    PublishOutcome::NoPartition => {}
                }
            }
        }
        Ok(published)
    }
}

/// A settle queued for commit ([`Core::settle_queued`]); await [`PendingSettle::done`].
#[derive(Debug)]
#[must_use = "a settle's outcome is known only when it is awaited"]
pub struct PendingSettle {
    core: Core,
    waits: Vec<(PartitionKey, ShardCommand, ReplyReceiver<ShardReply>)>,
}

impl PendingSettle {
    /// Wait until it is committed; the positions the consumer did not hold. An acknowledgement
    /// that failed for a retryable reason (no leader, a lost forward) is sent again, up to
    /// `SETTLE_ATTEMPTS_MAX` times: its client is not waiting for an answer and will not send it
    /// again, and a delivery whose ack was lost stays held until its consumer leaves. Sending an
    /// ack twice is harmless: the second finds the message gone. (A reject is not sent again: the
    /// message may have come back to the same consumer meanwhile.)
    pub async fn done(self) -> CoreResult<Vec<Position>> {
        let mut unknown = Vec::new();
        for (target, command, rx) in self.waits {
            let resend = matches!(command, ShardCommand::Settle { outcome: Outcome::Ack, .. });
            let mut queued = Some(rx);
            let reply = self
                .core
                .retry_uncommitted("acknowledgement", if resend { SETTLE_ATTEMPTS_MAX } else { 1 }, || {
                    let rx = queued
                        .take()
                        .map_or_else(|| self.core.shard_for(target).submit(command.clone(), command.size_bytes()), Ok);
                    async move { wait(rx?).await }
                })
                .await?;
            match reply {
                ShardReply::Settled { unknown: offsets } => {
                    unknown.extend(offsets.into_iter().map(|offset| Position {
                        queue: target.0,
                        partition: target.1,
                        offset,
                    }))
                }
                // The queue was deleted: nothing is held any more.
                ShardReply::Error(CoreError::NotFound(_)) => {}
                ShardReply::Error(error) => return Err(error),
                other => return Err(CoreError::Internal(format!("settle answered {other:?}"))),
            }
        }
        Ok(unknown)
    }
}

/// Where and when a message with a given idempotency key was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCommitted {
    /// Its position.
    pub position: Position,
    /// Committed time of the entry that stored it, milliseconds since the Unix epoch.
    pub committed_ms: u64,
}

/// A queue declaration's answer (AMQP `queue.declare-ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclared {
    /// The queue's name (generated when declared with an empty name).
    pub name: String,
    /// Its id.
    pub id: QueueId,
    /// Ready messages.
    pub message_count: u64,
    /// Consumers.
    pub consumer_count: u32,
}

/// A queue declaration (AMQP `queue.declare`).
#[derive(Debug, Clone, Default)]
pub struct QueueSpec {
    /// Virtual host.
    pub vhost: String,
    /// Name; empty for a server-named queue.
    pub name: String,
    /// Only check it exists.
    pub passive: bool,
    /// Survives a restart.
    pub durable: bool,
    /// Owned by the declaring connection, deleted with it.
    pub exclusive: bool,
    /// The declaring connection (required for an exclusive queue; locks others out of it).
    pub connection: Option<ConnectionId>,
    /// Deleted when its last consumer leaves.
    pub auto_delete: bool,
    /// `x-` arguments.
    pub arguments: Headers,
}

/// An exchange declaration (AMQP `exchange.declare`).
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    /// Virtual host.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ExchangeKind,
    /// Only check it exists.
    pub passive: bool,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    pub internal: bool,
    /// Arguments (`alternate-exchange`).
    pub arguments: Headers,
}

/// How a node takes part in a cluster: the first voters of every group, the transport to its
/// peers, and the service through which its groups answer them.
#[derive(Clone)]
pub struct ClusterLink {
    /// Every node of the cluster (this one included) by id, with the address peers reach it at.
    /// Every group is formed from all of them on first start; afterwards the membership is in
    /// each group's log.
    pub voters: BTreeMap<u64, String>,
    /// Carries this node's Raft RPCs and forwarded requests to its peers.
    pub transport: Arc<dyn Transport>,
    /// Where the peers' RPCs arrive: the core registers its groups there. Serve it on the
    /// cluster port (or attach it to an in-process switchboard).
    pub service: Arc<RaftService>,
    /// This node joins a running cluster (`cluster.join`): on first start it forms no group and
    /// waits until a node of the cluster adds it ([`Core::add_node`]). Ignored once its groups
    /// have members.
    pub join: bool,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink").field("voters", &self.voters).field("join", &self.join).finish_non_exhaustive()
    }
}

impl Core {
    /// Open storage under the configured data directory, start every Raft group, and bring the
    /// node's state up to date (clean up after the previous run, reconcile the catalogue with the
    /// shards).
    pub async fn open(config: CoreConfig) -> CoreResult<Self> {
        Self::open_node(config, None).await
    }

    /// Like [`Core::open`], as a node of `cluster` (`None`: a single node): see [`Core::open_in`].
    pub async fn open_node(config: CoreConfig, cluster: Option<ClusterLink>) -> CoreResult<Self> {
        config.validate().map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        let storage: Arc<dyn Storage> = match config.storage {
            StorageKind::Fjall => {
                let dir = config.data_dir.clone();
                let opened = tokio::task::spawn_blocking(move || FjallStorage::open(dir))
                    .await
                    .map_err(|e| CoreError::Storage(e.to_string()))?;
                Arc::new(opened.map_err(|e| CoreError::Storage(e.to_string()))?)
            }
            StorageKind::Memory => Arc::new(MemStorage::new()),
        };
        Self::open_in(config, storage, cluster).await
    }

    /// Like [`Core::open`], on a given storage (tests reopen a `MemStorage` to simulate restarts).
    pub async fn open_on(config: CoreConfig, storage: Arc<dyn Storage>) -> CoreResult<Self> {
        Self::open_in(config, storage, None).await
    }

    /// Like [`Core::open_on`], as a node of `cluster` (`None`: a single node). Returns once every
    /// group has a leader, which takes a majority of the voters running.
    ///
    /// A node that does not lead a group forwards that group's commands to its leader and answers
    /// once its own replica has applied them; deliveries to its consumers come from its own
    /// replica.
    pub async fn open_in(
        config: CoreConfig,
        storage: Arc<dyn Storage>,
        cluster: Option<ClusterLink>,
    ) -> CoreResult<Self> {
        config.validate().map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        if let Some(link) = &cluster
            && !link.voters.contains_key(&config.node_id)
        {
            return Err(CoreError::InvalidArgument(format!(
                "node {} is not among the cluster's voters {:?}",
                config.node_id,
                link.voters.keys().collect::<Vec<_>>()
            )));
        }
        let storage_error = |e: crate::raft::storage::StorageError| CoreError::Storage(e.to_string());
        check_node_id(&storage, config.node_id).await?;
        check_shard_count(&storage, config.shard_count).await?;
        // At least the wall clock's milliseconds: a node id given a new, empty data directory
        // (a replaced machine joining again) starts above the ids its earlier directory handed
        // out, which the cluster may still hold (connections, transactions).
        let at_least = crate::raft::runtime::wall_clock_ms();
        let incarnation = run_io(&storage, move |s| s.next_incarnation(at_least)).await.map_err(storage_error)?;
        let syncer = Syncer::new(Arc::clone(&storage)).map_err(storage_error)?;
        let raft = raft_config(
            config.raft_heartbeat_interval_ms,
            config.raft_election_timeout_min_ms,
            config.snapshot_logs_since_last,
            config.raft_install_snapshot_timeout_ms,
        )
        .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        let group_error = |e: crate::raft::group::GroupError| CoreError::Unavailable(e.to_string());

        let registry = Arc::new(Registry::default());
        let (dead_letter_tx, dead_letter_rx) = mpsc::unbounded_channel();

        let meta_effects: EffectSink<<Catalogue as crate::raft::ReplicatedState>::Effect> = Arc::new(|_| {});
        let (voters, transport): (BTreeMap<u64, openraft::BasicNode>, Arc<dyn Transport>) = match &cluster {
            Some(link) => (
                link.voters.iter().map(|(&id, addr)| (id, openraft::BasicNode::new(addr))).collect(),
                Arc::clone(&link.transport),
            ),
            None => (BTreeMap::from([(config.node_id, openraft::BasicNode::default())]), Arc::new(NoPeers)),
        };
        let launch = GroupLaunch {
            config: &config,
            raft_config: &raft,
            voters: &voters,
            transport: &transport,
            storage: &storage,
            syncer: &syncer,
            cluster: cluster.as_ref(),
        };
        let (meta, meta_task) = launch.start::<MetaTypes, Catalogue>("meta", 0, meta_effects).await?;
        let mut tasks = vec![meta_task];

        let mut shards = Vec::with_capacity(config.shard_count as usize);
        for index in 0..config.shard_count as usize {
            let sink = shard_effect_sink(Arc::clone(&registry), dead_letter_tx.clone());
            let (shard, task) =
                launch.start::<ShardTypes, ShardState>(&format!("shard-{index}"), index + 1, sink).await?;
            tasks.push(task);
            shards.push(shard);
        }
        // On a single node a group elects itself at once. In a cluster a node may start while no
        // majority is up (a whole cluster restarting, node by node), and its own replicas are part
        // of what brings the majority back: it waits as long as it takes, saying so.
        let patient = cluster.is_some();
        let joining = cluster.as_ref().is_some_and(|link| link.join);
        wait_for_leader_patiently(&meta.name, &meta.raft, patient, joining).await.map_err(group_error)?;
        for shard in &shards {
            wait_for_leader_patiently(&shard.name, &shard.raft, patient, joining).await.map_err(group_error)?;
        }

        let (stop, _) = tokio::sync::watch::channel(false);
        let disk = (config.storage == StorageKind::Fjall).then(|| config.data_dir.clone());
        let alarms = Arc::new(AlarmMonitor::new(config.alarms.clone(), disk));
        let core = Self {
            inner: Arc::new(Inner {
                config,
                cluster,
                incarnation,
                storage,
                meta,
                shards,
                registry,
                ready: AtomicBool::new(false),
                closing: AtomicBool::new(false),
                connection_seq: AtomicU64::new(0),
                txn_seq: AtomicU64::new(0),
                getters: Mutex::new(BTreeMap::new()),
                check_backs: Mutex::new(BTreeMap::new()),
                tasks: Mutex::new(tasks),
                stop,
                alarms,
            }),
        };
        // In a cluster, leaderships can still move while the nodes start, and a majority may not
        // be up yet: what recovery proposes may be refused or not committed. Every step is
        // idempotent, so it is run again until it goes through (the operator stops a node that
        // should not wait; the serve command abandons the open on a signal).
        let started = tokio::time::Instant::now();
        let mut reported = started;
        loop {
            match core.recover().await {
                Ok(()) => break,
                Err(error) if patient && error.is_retryable() => {
                    if reported.elapsed() >= Duration::from_secs(START_REPORT_SECS) {
                        reported = tokio::time::Instant::now();
                        tracing::warn!(%error, waited_secs = started.elapsed().as_secs(),
                            "start-up recovery not committed yet (is a majority of the cluster up?): trying again");
                    } else {
                        tracing::debug!(%error, "start-up recovery interrupted: again");
                    }
                    tokio::time::sleep(Duration::from_millis(RECOVER_RETRY_MS)).await;
                }
                Err(error) => return Err(error),
            }
        }
        let mut background = background::spawn(&core, dead_letter_rx);
        let monitor = Arc::clone(&core.inner.alarms);
        let stopped = core.inner.stop.subscribe();
        background.push(tokio::spawn(async move { monitor.run(stopped).await }));
        core.inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(background);
        core.inner.ready.store(true, Ordering::Release);
        tracing::info!(node = core.inner.config.node_id, incarnation, shards = core.inner.shards.len(), "core ready");
        Ok(core)
    }

    /// Bring state up to date after a start: the default vhost exists; consumers and exclusive
    /// queues of earlier incarnations are gone; transient queues do not survive; every queue's
    /// partitions exist on their shards and no partition outlives its queue.
    async fn recover(&self) -> CoreResult<()> {
        let node = self.inner.config.node_id;
        let incarnation = self.inner.incarnation;
        // The catalogue enforces the limits in its replicated state: adopt the configured ones.
        let limits = &self.inner.config.limits;
        if self.inner.meta.reader.read(|c| c.limits() != limits) {
            self.meta(MetaCommand::SetLimits(limits.clone())).await?;
        }
        if !self.inner.meta.reader.read(|c| c.has_vhost(DEFAULT_VHOST)) {
            self.meta(MetaCommand::CreateVhost { name: DEFAULT_VHOST.into() }).await?;
        }
        self.on_shards((0..self.inner.shards.len()).map(|shard| (shard, ShardCommand::NodeUp { node, incarnation })))
            .await?;
        // Transactions this node coordinated before a crash are in doubt: finish them now.
        self.resolve_in_doubt().await?;
        let deleted = self.meta(MetaCommand::DeleteOwnedBy { node, incarnation_below: incarnation }).await?;
        self.drop_deleted_partitions(&deleted).await?;
        // RabbitMQ semantics: a non-durable queue does not survive a restart of its node. A queue
        // has no home node in a cluster yet, so there non-durable queues and exchanges stay (the
        // exclusive ones went with their connections just above).
        if self.inner.cluster.is_some() {
            return self.reconcile().await;
        }
        let transient: Vec<(String, String, QueueId)> = self.inner.meta.reader.read(|c| {
            c.queues().filter(|q| !q.durable).map(|q| (q.name.vhost.clone(), q.name.name.clone(), q.id)).collect()
        });
        for (vhost, name, id) in transient {
            let reply =
                self.meta(MetaCommand::DeleteQueue { vhost, name, expected_id: Some(id), connection: None }).await?;
            self.drop_deleted_partitions(&reply).await?;
        }
        // Likewise a non-durable exchange (its bindings go with it).
        let transient: Vec<(String, String)> = self.inner.meta.reader.read(|c| {
            c.vhosts()
                .flat_map(|vhost| {
                    c.exchanges_in(vhost).filter(|e| !e.durable).map(move |e| (vhost.to_owned(), e.name.clone()))
                })
                .collect()
        });
        for (vhost, name) in transient {
            match self.meta(MetaCommand::DeleteExchange { vhost, name, if_unused: false }).await {
                Ok(_) | Err(CoreError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        self.reconcile().await
    }

    /// Reconcile the catalogue and the shards: a crash between the meta commit and the shard
    /// commits of a declaration or deletion leaves the two out of step; both commands are
    /// idempotent, so redo them.
    async fn reconcile(&self) -> CoreResult<()> {
        let queues: Vec<QueueDef> = self.inner.meta.reader.read(|c| c.queues().cloned().collect());
        let mut live = std::collections::BTreeSet::new();
        for queue in &queues {
            self.create_partitions(queue).await?;
            for partition in 0..queue.args.partitions {
                live.insert((queue.id, partition));
            }
        }
        // In a cluster this node's catalogue replica may lag behind a declaration made through
        // another node whose partitions its shard replicas already hold: nothing is deleted on a
        // view that may be stale.
        if self.inner.cluster.is_some() {
            return Ok(());
        }
        for (index, shard) in self.inner.shards.iter().enumerate() {
            let orphans: Vec<PartitionKey> =
                shard.reader.read(|s| s.partitions().map(|(k, _)| *k).filter(|k| !live.contains(k)).collect());
            for (queue, partition) in orphans {
                tracing::info!(shard = index, %queue, partition, "deleting a partition whose queue is gone");
                shard.proposer.call(ShardCommand::DeletePartition { queue, partition }, 64).await?;
            }
        }
        Ok(())
    }

    /// Whether every Raft group has a leader and the node serves requests: not while it opens or
    /// closes, nor once it was removed from the cluster ([`Core::remove_node`]).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire) && !self.inner.closing.load(Ordering::Acquire) && self.is_member()
    }

    /// Whether this node is a member of the cluster (always, on a single node).
    pub fn is_member(&self) -> bool {
        let me = self.inner.config.node_id;
        self.inner.meta.raft.metrics().borrow().membership_config.membership().get_node(&me).is_some()
    }

    /// The node's memory and disk alarms: front-ends watch them to hold back publishers.
    pub fn alarms(&self) -> &AlarmMonitor {
        &self.inner.alarms
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// This run's incarnation number.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// A new connection id on this node, for a front-end's new client connection.
    pub fn new_connection(&self) -> ConnectionId {
        ConnectionId {
            node: self.inner.config.node_id,
            incarnation: self.inner.incarnation,
            seq: self.inner.connection_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Stop accepting requests, let queued and in-flight commits finish, stop the groups and make
    /// storage durable. Idempotent.
    pub async fn shutdown(&self) -> CoreResult<()> {
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        tracing::info!("core shutting down: draining commits");
        let _ = self.inner.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(DRAIN_WAIT_SECS);
        // A barrier per group: its reply means everything queued before it is committed.
        let mut barriers = Vec::new();
        for shard in &self.inner.shards {
            barriers.push(shard.proposer.submit(ShardCommand::Tick, 64));
        }
        for barrier in barriers.into_iter().flatten() {
            if tokio::time::timeout_at(deadline, wait(barrier)).await.is_err() {
                tracing::warn!("a shard did not drain within {DRAIN_WAIT_SECS} s");
            }
        }
        // The groups this node leads elect their next leader now rather than after an election
        // timeout, and nothing is left waiting on a leader that is going.
        let handed = self.step_down().await;
        if !handed.is_empty() {
            tracing::info!(?handed, "leaderships handed over before stopping");
        }
        self.stop_groups().await?;
        run_io(&self.inner.storage, |s| s.sync()).await.map_err(|e| CoreError::Storage(e.to_string()))?;
        tracing::info!("core stopped");
        Ok(())
    }

    /// Run `attempt` until it is committed or fails for good: after a retryable failure (no
    /// leader, a lost forward) it runs again, after a pause doubling from [`RETRY_MS_MIN`] to
    /// [`RETRY_MS_MAX`], while this node is open and fewer than `attempts_max` attempts were made.
    pub(crate) async fn retry_uncommitted<T, F>(
        &self,
        what: &str,
        attempts_max: u32,
        mut attempt: impl FnMut() -> F,
    ) -> CoreResult<T>
    where
        F: Future<Output = CoreResult<T>>,
    {
        let mut attempts = 1;
        let mut pause_ms = RETRY_MS_MIN;
        loop {
            match attempt().await {
                Err(error) if error.is_retryable() && attempts < attempts_max && self.check_open().is_ok() => {
                    tracing::debug!(%error, attempts, "{what} not committed; trying again");
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                    pause_ms = (pause_ms * 2).min(RETRY_MS_MAX);
                    attempts += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Stop at once, as a killed process does: no draining, no final sync (what the storage had
    /// not synced is the storage's to lose). For crash tests and the simulation.
    #[doc(hidden)]
    pub async fn kill(&self) -> CoreResult<()> {
        self.inner.closing.store(true, Ordering::Release);
        let _ = self.inner.stop.send(true);
        self.stop_groups().await
    }

    /// Stop the node's tasks and groups, and leave the cluster's service.
    async fn stop_groups(&self) -> CoreResult<()> {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for task in &tasks {
            task.abort();
        }
        let mut failures = Vec::new();
        if let Some(link) = &self.inner.cluster {
            link.service.deregister(&self.inner.meta.name);
            for shard in &self.inner.shards {
                link.service.deregister(&shard.name);
            }
        }
        if let Err(e) = self.inner.meta.raft.shutdown().await {
            failures.push(format!("meta: {e}"));
        }
        for shard in &self.inner.shards {
            if let Err(e) = shard.raft.shutdown().await {
                failures.push(format!("{}: {e}", shard.name));
            }
        }
        self.inner.ready.store(false, Ordering::Release);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CoreError::Internal(format!("groups did not stop cleanly: {}", failures.join("; "))))
        }
    }

    /// In a cluster, bring this node's catalogue replica up to what the meta group's leader had
    /// applied (a read barrier); `false` on a single node, where the replica is never behind.
    async fn catch_up_catalogue(&self) -> CoreResult<bool> {
        let Some(forwarder) = self.forwarder() else { return Ok(false) };
        catch_up::<MetaTypes, Catalogue>("meta", &self.inner.meta.raft, &forwarder).await?;
        Ok(true)
    }

    /// In a cluster, bring this node's replica of shard `index` up to what its leader had applied
    /// (a read barrier); nothing to do on a single node.
    pub(crate) async fn catch_up_shard(&self, index: usize) -> CoreResult<()> {
        let (Some(forwarder), Some(shard)) = (self.forwarder(), self.inner.shards.get(index)) else { return Ok(()) };
        catch_up::<ShardTypes, ShardState>(&shard.name, &shard.raft, &forwarder).await
    }

    /// How this node reaches the groups' leaders; `None` on a single node.
    fn forwarder(&self) -> Option<Forwarder> {
        let link = self.inner.cluster.as_ref()?;
        Some(Forwarder { me: self.inner.config.node_id, transport: Arc::clone(&link.transport) })
    }

    /// Every Raft group as this node sees it: its role, the leader, the log, the voters.
    pub fn group_status(&self) -> Vec<GroupStatus> {
        let meta = GroupStatus::of(&self.inner.meta.name, &self.inner.meta.raft);
        std::iter::once(meta)
            .chain(self.inner.shards.iter().map(|shard| GroupStatus::of(&shard.name, &shard.raft)))
            .collect()
    }

    /// Whether this node currently leads `raft`'s group.
    fn leads<C: openraft::RaftTypeConfig<NodeId = u64>>(&self, raft: &Raft<C>) -> bool {
        proposer::leads(raft, self.inner.config.node_id)
    }

    fn check_open(&self) -> CoreResult<()> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(CoreError::Unavailable("the node is shutting down".into()));
        }
        Ok(())
    }

    fn shard_index(&self, key: PartitionKey) -> usize {
        shard_for(key.0, key.1, self.inner.config.shard_count) as usize
    }

    pub(crate) fn shard_for(&self, key: PartitionKey) -> &Proposer<ShardState> {
        &self.inner.shards[self.shard_index(key)].proposer
    }

    fn shard_reader(&self, key: PartitionKey) -> &StateReader<ShardState> {
        &self.inner.shards[self.shard_index(key)].reader
    }

    /// Send each command to its shard (by index). All are queued before any reply is awaited, so
    /// they share entries and run in parallel; the replies come back in order.
    pub(crate) async fn on_shards(
        &self,
        commands: impl IntoIterator<Item = (usize, ShardCommand)>,
    ) -> CoreResult<Vec<ShardReply>> {
        let waits = commands
            .into_iter()
            .map(|(shard, command)| {
                let size = command.size_bytes();
                self.inner.shards[shard].proposer.submit(command, size)
            })
            .collect::<CoreResult<Vec<_>>>()?;
        let mut replies = Vec::with_capacity(waits.len());
        for rx in waits {
            replies.push(wait(rx).await?);
        }
        Ok(replies)
    }

    async fn meta(&self, command: MetaCommand) -> CoreResult<MetaReply> {
        self.meta_sized(command, 256).await
    }

    /// [`Core::meta`] for a command whose size in a Raft entry is `size_bytes` (group commit packs
    /// entries up to `limits.batch_bytes_max`).
    async fn meta_sized(&self, command: MetaCommand, size_bytes: u64) -> CoreResult<MetaReply> {
        match self.inner.meta.proposer.call(command, size_bytes).await? {
            MetaReply::Error(error) => Err(error),
            reply => Ok(reply),
        }
    }

    async fn create_partitions(&self, queue: &QueueDef) -> CoreResult<()> {
        let limits = &self.inner.config.limits;
        let caps = PartitionCaps {
            messages_max: limits.queue_messages_max,
            bytes_max: limits.queue_bytes_max,
            consumer_inflight_max: limits.consumer_inflight_max,
            consumers_max: limits.consumers_per_queue_max,
            idempotency_window_ms: limits.idempotency_window_ms,
            idempotency_keys_max: limits.idempotency_keys_max,
            idempotency_key_bytes_max: limits.idempotency_key_bytes_max,
        };
        self.on_shards((0..queue.args.partitions).map(|partition| {
            let command = ShardCommand::CreatePartition {
                queue: queue.id,
                partition,
                name: queue.name.clone(),
                args: queue.args.clone(),
                caps,
            };
            (self.shard_index((queue.id, partition)), command)
        }))
        .await?;
        Ok(())
    }

    /// Delete the shard partitions of queues a meta reply says were deleted; returns the messages
    /// they held.
    async fn drop_deleted_partitions(&self, reply: &MetaReply) -> CoreResult<u64> {
        let commands = deleted_queues(reply)
            .into_iter()
            .flat_map(|(queue, partitions)| (0..partitions).map(move |partition| (queue, partition)));
        let replies = self
            .on_shards(commands.map(|(queue, partition)| {
                (self.shard_index((queue, partition)), ShardCommand::DeletePartition { queue, partition })
            }))
            .await?;
        Ok(replies.iter().map(|reply| if let ShardReply::Deleted(Some(count)) = reply { *count } else { 0 }).sum())
    }

    // ----- catalogue -------------------------------------------------------------------------

    /// Create a virtual host with its predeclared exchanges.
    pub async fn create_vhost(&self, name: &str) -> CoreResult<()> {
        self.check_open()?;
        self.meta(MetaCommand::CreateVhost { name: name.into() }).await.map(drop)
    }

    /// Delete a virtual host and everything in it.
    pub async fn delete_vhost(&self, name: &str) -> CoreResult<()> {
        self.check_open()?;
        let reply = self.meta(MetaCommand::DeleteVhost { name: name.into() }).await?;
        self.drop_deleted_partitions(&reply).await.map(drop)
    }

    /// Declare an exchange (AMQP `exchange.declare`).
    pub async fn declare_exchange(&self, spec: ExchangeSpec) -> CoreResult<()> {
        self.check_open()?;
        self.meta(MetaCommand::DeclareExchange(ExchangeDeclare {
            vhost: spec.vhost,
            name: spec.name,
            kind: spec.kind,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            arguments: spec.arguments,
            passive: spec.passive,
        }))
        .await
        .map(drop)
    }

    /// Delete an exchange (AMQP `exchange.delete`).
    pub async fn delete_exchange(&self, vhost: &str, name: &str, if_unused: bool) -> CoreResult<()> {
        self.check_open()?;
        self.meta(MetaCommand::DeleteExchange { vhost: vhost.into(), name: name.into(), if_unused }).await.map(drop)
    }

    /// Declare a queue (AMQP `queue.declare`): created in the catalogue, then its partitions on
    /// their shards.
    pub async fn declare_queue(&self, spec: QueueSpec) -> CoreResult<QueueDeclared> {
        self.check_open()?;
        let vhost = spec.vhost.clone();
        let reply = self
            .meta(MetaCommand::DeclareQueue(QueueDeclare {
                vhost: spec.vhost,
                name: spec.name,
                durable: spec.durable,
                exclusive: spec.exclusive,
                connection: spec.connection,
                auto_delete: spec.auto_delete,
                arguments: spec.arguments,
                passive: spec.passive,
            }))
            .await?;
        let MetaReply::QueueDeclared { id, name, .. } = reply else {
            return Err(CoreError::Internal(format!("queue.declare answered {reply:?}")));
        };
        let queue = self.queue_def(&vhost, &name)?;
        if !spec.passive {
            // Also touches existing partitions (x-expires counts from the last use).
            self.create_partitions(&queue).await?;
        }
        let (message_count, consumer_count) = self.queue_counts(&queue);
        Ok(QueueDeclared { name, id, message_count, consumer_count })
    }

    /// The queue, if `connection` may use it: an exclusive queue belongs to its declaring
    /// connection alone (AMQP 405 `RESOURCE_LOCKED` for anyone else).
    fn usable_queue(&self, vhost: &str, name: &str, connection: Option<ConnectionId>) -> CoreResult<QueueDef> {
        let def = self.queue_def(vhost, name)?;
        match def.exclusive_owner {
            Some(owner) if connection != Some(owner) => Err(CoreError::ResourceLocked(format!(
                "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be \
                 originally declared on another connection or the exclusive property value does not match \
                 that of the original declaration."
            ))),
            _ => Ok(def),
        }
    }

    fn queue_def(&self, vhost: &str, name: &str) -> CoreResult<QueueDef> {
        self.inner
            .meta
            .reader
            .read(|c| c.queue(vhost, name).cloned())
            .ok_or_else(|| CoreError::NotFound(format!("no queue '{name}' in vhost '{vhost}'")))
    }

    /// Ready messages and consumers of a queue, summed over its partitions.
    fn queue_counts(&self, queue: &QueueDef) -> (u64, u32) {
        let mut messages = 0;
        let mut consumers = 0;
        for partition in 0..queue.args.partitions {
            let key = (queue.id, partition);
            let (m, c) = self
                .shard_reader(key)
                .read(|s| s.partition(key).map_or((0, 0), |p| (p.ready_len(), p.consumer_count())));
            messages += m;
            consumers += c;
        }
        (messages, consumers)
    }

    /// Ready messages and consumers of a queue (AMQP passive declare).
    pub fn queue_status(&self, vhost: &str, name: &str) -> CoreResult<(u64, u32)> {
        let queue = self.queue_def(vhost, name)?;
        Ok(self.queue_counts(&queue))
    }

    /// Delete a queue (AMQP `queue.delete`) on behalf of `connection` (an exclusive queue can only
    /// be deleted by its owner); returns the messages it held.
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: Option<ConnectionId>,
    ) -> CoreResult<u64> {
        self.check_open()?;
        let queue = self.queue_def(vhost, name)?;
        let (messages, consumers) = self.queue_counts(&queue);
        if if_unused && consumers > 0 {
            return Err(CoreError::PreconditionFailed(format!("queue '{name}' in vhost '{vhost}' in use")));
        }
        if if_empty && messages > 0 {
            return Err(CoreError::PreconditionFailed(format!("queue '{name}' in vhost '{vhost}' not empty")));
        }
        let reply = self
            .meta(MetaCommand::DeleteQueue {
                vhost: vhost.into(),
                name: name.into(),
                expected_id: Some(queue.id),
                connection,
            })
            .await?;
        self.drop_deleted_partitions(&reply).await
    }

    /// Bind a queue or exchange to an exchange, on behalf of `connection` (exclusive queues of
    /// other connections are locked).
    pub async fn bind(&self, binding: BindingSpec, connection: Option<ConnectionId>) -> CoreResult<()> {
        self.check_open()?;
        self.meta(MetaCommand::Bind { binding, connection }).await.map(drop)
    }

    /// Remove a binding.
    pub async fn unbind(&self, binding: BindingSpec, connection: Option<ConnectionId>) -> CoreResult<()> {
        self.check_open()?;
        self.meta(MetaCommand::Unbind { binding, connection }).await.map(drop)
    }

    /// Read the catalogue (for listings, routing checks, admin views).
    pub fn with_catalogue<T>(&self, f: impl FnOnce(&Catalogue) -> T) -> T {
        self.inner.meta.reader.read(f)
    }

    // ----- messages --------------------------------------------------------------------------

    /// Route a message and queue it for commit on every shard it goes to. Publishes queued by one
    /// caller keep their order within each partition. Await the result's `confirm()`.
    pub async fn publish(&self, vhost: &str, message: Message) -> CoreResult<PendingPublish> {
        self.publish_to(vhost, message, None, |_| true).await
    }

    /// [`Core::publish`] for a connection whose publishes must keep their order even across
    /// failures (MQTT, [MQTT-4.6.0-6]): once one of them fails with an error that may be retried,
    /// the connection's later publishes to the same shard are refused (retryably) rather than
    /// stored ahead of it, until [`Core::close_connection`]. The connection is expected to close
    /// on such a failure, so that its client sends again, in order.
    pub async fn publish_ordered(
        &self,
        vhost: &str,
        message: Message,
        connection: ConnectionId,
    ) -> CoreResult<PendingPublish> {
        self.publish_to(vhost, message, Some(connection), |_| true).await
    }

    /// [`Core::publish`] to the routed queues `keep` accepts, in order for `source` if given
    /// ([`Core::publish_ordered`]).
    pub(crate) async fn publish_to(
        &self,
        vhost: &str,
        message: Message,
        source: Option<ConnectionId>,
        keep: impl Fn(&RoutedQueue) -> bool,
    ) -> CoreResult<PendingPublish> {
        self.check_open()?;
        let mut message = message;
        let mut route = self.route_message(vhost, &mut message);
        // Not found, or nowhere to go: perhaps declared or bound through another node and not yet
        // applied here. Catch up with the catalogue's leader and route again.
        let stale = match &route {
            Err(CoreError::NotFound(_)) => true,
            Ok(found) => found.queues.is_empty(),
            Err(_) => false,
        };
        if stale && self.catch_up_catalogue().await? {
            route = self.route_message(vhost, &mut message);
        }
        let mut route = route?;
        route.queues.retain(|queue| keep(queue));
        let key = message.partition_key.as_deref().unwrap_or(&message.routing_key);
        // One command per shard, naming every partition there: a message routed to many queues is
        // carried once per shard, not once per queue.
        let mut per_shard: BTreeMap<usize, Vec<(usize, PartitionKey)>> = BTreeMap::new();
        for (index, queue) in route.queues.iter().enumerate() {
            let target = (queue.id, partition_for(key, queue.partitions));
            per_shard.entry(self.shard_index(target)).or_default().push((index, target));
        }
        let message = Arc::new(message);
        let mut waits = Vec::with_capacity(per_shard.len());
        for (shard, indexes) in per_shard {
            let targets = indexes.iter().map(|(_, target)| *target).collect();
            let command = ShardCommand::Publish { targets, message: Arc::clone(&message) };
            let size = command.size_bytes();
            waits.push((indexes, self.inner.shards[shard].proposer.submit_ordered(command, size, source)?));
        }
        metrics::counter!("wharf_core_published_messages_total").increment(1);
        Ok(PendingPublish { routed: route.queues, waits })
    }

    /// Route a message about to be published or staged: a delayed-message exchange on its way
    /// gives it the delay of its `x-delay` header, then its limits are checked. As RabbitMQ's
    /// plugin: milliseconds, an integer or a string holding one; absent or not positive: no
    /// delay; a delayed message is delivered with `x-delay` negated, so that republishing it as
    /// received does not delay it again.
    pub(crate) fn route_message(&self, vhost: &str, message: &mut Message) -> CoreResult<Route> {
        self.check_message(message)?;
        let route = self
            .inner
            .meta
            .reader
            .read(|c| c.route(vhost, &message.exchange, &message.routing_key, &message.headers))?;
        if route.delayed && message.delay_ms.is_none() {
            let header = crate::catalogue::DELAY_HEADER;
            let delay = match message.headers.get(header) {
                Some(FieldValue::LongString(text)) => text.trim().parse::<i64>().ok(),
                Some(value) => value.as_i64(),
                None => None,
            };
            if let Some(delay) = delay.filter(|&delay| delay > 0) {
                message.delay_ms = u64::try_from(delay).ok();
                // A signed 32-bit integer when it fits, as the plugin writes it ('I': clients
                // decode it as signed, not all do so for 'l').
                let negated = i32::try_from(-delay).map_or(FieldValue::I64(-delay), FieldValue::I32);
                message.headers.set(header, negated);
                self.check_message(message)?;
            }
        }
        Ok(route)
    }

    /// Refuse a message breaking a limit (size, key length, delay).
    fn check_message(&self, message: &Message) -> CoreResult<()> {
        let limits = &self.inner.config.limits;
        let size = message.payload_len();
        if size > limits.message_size_max_bytes {
            return Err(CoreError::LimitExceeded {
                limit: "limits.message_size_max_bytes",
                value: size,
                max: limits.message_size_max_bytes,
            });
        }
        if let Some(key) = &message.idempotency_key
            && key.len() as u64 > u64::from(limits.idempotency_key_len_max_bytes)
        {
            return Err(CoreError::LimitExceeded {
                limit: "limits.idempotency_key_len_max_bytes",
                value: key.len() as u64,
                max: limits.idempotency_key_len_max_bytes.into(),
            });
        }
        if let Some(delay) = message.delay_ms
            && delay > limits.delay_max_ms
        {
            return Err(CoreError::LimitExceeded {
                limit: "limits.delay_max_ms",
                value: delay,
                max: limits.delay_max_ms,
            });
        }
        Ok(())
    }

    /// Publish and wait for the confirmation.
    pub async fn publish_confirmed(&self, vhost: &str, message: Message) -> CoreResult<Published> {
        self.publish(vhost, message).await?.confirm().await
    }

    /// Attach a consumer to every partition of a queue.
    pub async fn consume(
        &self,
        vhost: &str,
        queue: &str,
        id: ConsumerId,
        options: ConsumeOptions,
    ) -> CoreResult<Consumer> {
        self.check_open()?;
        let mut def = self.usable_queue(vhost, queue, Some(id.connection));
        if matches!(def, Err(CoreError::NotFound(_))) && self.catch_up_catalogue().await? {
            def = self.usable_queue(vhost, queue, Some(id.connection));
        }
        let def = def?;
        let limits = &self.inner.config.limits;
        let credit_window = limits.consumer_inflight_max.clamp(2, 1_000);
        // Register before attaching: deliveries can be produced while the attach is applied.
        let rx = self.inner.registry.register(id);
        let targets: Vec<PartitionKey> = (0..def.args.partitions).map(|p| (def.id, p)).collect();
        // Whatever was sent is undone if this call fails, or is dropped half-way (its caller gave
        // up waiting): an attach committed for nobody would hold deliveries nobody reads.
        let mut undo = consumers::AttachUndo::new(self.clone(), id);
        for &target in &targets {
            let rules = AttachRules {
                prefetch: options.prefetch,
                no_ack: options.no_ack,
                credit: options.credit.unwrap_or(credit_window),
                priority: options.priority,
                exclusive: options.exclusive,
                credit_limited: options.credit.is_some(),
            };
            let command = ShardCommand::Attach { consumer: id, target, rules };
            undo.sent(target);
            match self.shard_for(target).call(command, 64).await {
                Ok(ShardReply::Error(e)) | Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        undo.disarm();
        Ok(Consumer {
            core: self.clone(),
            id,
            queue: def.name.clone(),
            targets,
            rx,
            options,
            since_credit: BTreeMap::new(),
            credit_window,
            detached: false,
        })
    }

    /// After a consumer left: an auto-delete queue whose last consumer left is deleted.
    pub(crate) async fn after_cancel(&self, queue: &QueueName, consumers_left: u32) {
        if consumers_left > 0 {
            return;
        }
        let Ok(def) = self.queue_def(&queue.vhost, &queue.name) else { return };
        if def.auto_delete
            && let Err(error) = self.delete_queue(&queue.vhost, &queue.name, false, false, None).await
        {
            tracing::warn!(%queue, %error, "auto-delete of a queue failed");
        }
    }

    /// Change the prefetch of a consumer on every partition of its queue (AMQP `basic.qos` on a
    /// consumer that already exists).
    pub async fn set_prefetch(&self, consumer: &Consumer, prefetch: u32) -> CoreResult<()> {
        self.check_open()?;
        self.on_shards(consumer.targets.iter().map(|&target| {
            (self.shard_index(target), ShardCommand::SetPrefetch { consumer: consumer.id, target, prefetch })
        }))
        .await?;
        Ok(())
    }

    /// Grant a consumer attached with explicit credit ([`ConsumeOptions::credit`]) `credit` more
    /// deliveries on each partition of its queue.
    pub async fn grant_credit(&self, consumer: &Consumer, credit: u32) -> CoreResult<()> {
        self.check_open()?;
        self.on_shards(
            consumer.targets.iter().map(|&target| {
                (self.shard_index(target), ShardCommand::Credit { consumer: consumer.id, target, credit })
            }),
        )
        .await?;
        Ok(())
    }

    /// Settle deliveries held by `consumer` (a consumer or a `basic.get` holder). Returns the
    /// positions it did not hold (already settled, or never delivered to it).
    pub async fn settle(
        &self,
        consumer: ConsumerId,
        positions: &[Position],
        outcome: Outcome,
    ) -> CoreResult<Vec<Position>> {
        self.settle_queued(consumer, positions, outcome)?.done().await
    }

    /// [`Core::settle`], queued for commit now and awaited later: it is applied before any command
    /// the caller queues afterwards (a later settle, get, consumer stop or connection close), so a
    /// front-end can go on without waiting for each acknowledgement's commit, and concurrent
    /// settles share Raft entries.
    pub fn settle_queued(
        &self,
        consumer: ConsumerId,
        positions: &[Position],
        outcome: Outcome,
    ) -> CoreResult<PendingSettle> {
        self.check_open()?;
        let mut per_partition: BTreeMap<PartitionKey, Vec<u64>> = BTreeMap::new();
        for position in positions {
            per_partition.entry((position.queue, position.partition)).or_default().push(position.offset);
        }
        let mut waits = Vec::with_capacity(per_partition.len());
        for (target, offsets) in per_partition {
            let command = ShardCommand::Settle { consumer, target, offsets, outcome };
            let size = command.size_bytes();
            let rx = self.shard_for(target).submit(command.clone(), size)?;
            waits.push((target, command, rx));
        }
        Ok(PendingSettle { core: self.clone(), waits })
    }

    /// `basic.get`: take one message from a queue. Without `no_ack` it is held by `holder` until
    /// settled, or until the holder's connection closes ([`Core::close_connection`]).
    pub async fn get(
        &self,
        vhost: &str,
        queue: &str,
        holder: ConsumerId,
        no_ack: bool,
    ) -> CoreResult<Option<Delivery>> {
        self.check_open()?;
        let def = self.usable_queue(vhost, queue, Some(holder.connection))?;
        // Start at a rotating partition so that one partition does not starve the others.
        let start = self.inner.connection_seq.load(Ordering::Relaxed) as u32;
        for step in 0..def.args.partitions {
            let target = (def.id, (start.wrapping_add(step)) % def.args.partitions);
            let reply = self.shard_for(target).call(ShardCommand::Get { holder, target, no_ack }, 64).await?;
            match reply {
                ShardReply::Got(Some(delivery)) => {
                    if !no_ack {
                        self.hold_for_connection(holder, &[target]);
                    }
                    return Ok(Some(delivery));
                }
                ShardReply::Got(None) => {}
                ShardReply::Error(error) => return Err(error),
                other => return Err(CoreError::Internal(format!("get answered {other:?}"))),
            }
        }
        Ok(None)
    }

    /// Remember that `holder` may hold deliveries on `targets` until its connection closes
    /// ([`Core::close_connection`] detaches it there).
    pub(crate) fn hold_for_connection(&self, holder: ConsumerId, targets: &[PartitionKey]) {
        let mut getters = self.inner.getters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = getters.entry(holder.connection).or_default();
        for &target in targets {
            if !held.contains(&(holder, target)) {
                held.push((holder, target));
            }
        }
    }

    /// "Was a message with idempotency key `key` committed to `queue`, where, when?" The answer
    /// is linearizable: it reflects every publish confirmed before the call. Keys are scoped to the
    /// destination queue, and remembered for the queue's window (`x-idempotency-window-ms`, else
    /// `limits.idempotency_window_ms`) within the per-partition count and byte bounds.
    pub async fn idempotency_lookup(&self, vhost: &str, queue: &str, key: &str) -> CoreResult<Option<KeyCommitted>> {
        self.check_open()?;
        let def = self.queue_def(vhost, queue)?;
        // The key's partition depends on the publish's partition or routing key, which the
        // question does not carry: ask every partition (a key is in at most one).
        for partition in 0..def.args.partitions {
            let target = (def.id, partition);
            let shard = &self.inner.shards[self.shard_index(target)];
            shard.raft.ensure_linearizable().await.map_err(|e| match e.forward_to_leader() {
                Some(forward) => CoreError::NotLeader { leader: forward.leader_id },
                None => CoreError::Unavailable(e.to_string()),
            })?;
            let now = shard.reader.clock_ms().max(proposer::now_ms());
            let found = shard.reader.read(|s| s.partition(target).and_then(|p| p.idempotency_key(key, now)));
            if let Some(record) = found {
                return Ok(Some(KeyCommitted {
                    position: Position { queue: target.0, partition: target.1, offset: record.offset },
                    committed_ms: record.committed_ms,
                }));
            }
        }
        Ok(None)
    }

    /// Remove every ready message of a queue on behalf of `connection`; returns how many.
    pub async fn purge(&self, vhost: &str, queue: &str, connection: Option<ConnectionId>) -> CoreResult<u64> {
        self.check_open()?;
        let def = self.usable_queue(vhost, queue, connection)?;
        let replies = self
            .on_shards((0..def.args.partitions).map(|partition| {
                let target = (def.id, partition);
                (self.shard_index(target), ShardCommand::Purge { target })
            }))
            .await?;
        let mut purged = 0;
        for reply in replies {
            match reply {
                ShardReply::Purged(count) => purged += count,
                ShardReply::Error(error) => return Err(error),
                other => return Err(CoreError::Internal(format!("purge answered {other:?}"))),
            }
        }
        Ok(purged)
    }

    /// A client connection closed: what its `basic.get` calls hold returns to the queues, and its
    /// exclusive queues are deleted. (Its consumers are cancelled by dropping their handles.)
    pub async fn close_connection(&self, connection: ConnectionId) -> CoreResult<()> {
        for shard in &self.inner.shards {
            shard.proposer.lower_fence(connection);
        }
        let held = self
            .inner
            .getters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&connection)
            .unwrap_or_default();
        for (holder, target) in held {
            self.shard_for(target).call(ShardCommand::Detach { consumer: holder, target }, 64).await?;
        }
        let reply = self.meta(MetaCommand::DeleteConnectionQueues { owner: connection }).await?;
        self.drop_deleted_partitions(&reply).await.map(drop)
    }
}

/// The (queue, partitions) a meta reply reports deleted.
fn deleted_queues(reply: &MetaReply) -> Vec<(QueueId, u32)> {
    match reply {
        MetaReply::QueueDeleted(queue) => vec![(queue.id, queue.partitions)],
        MetaReply::QueuesDeleted(queues) => queues.iter().map(|q| (q.id, q.partitions)).collect(),
        _ => Vec::new(),
    }
}

/// Refuse to start on a data directory written by another node: its Raft logs, votes and
/// memberships name the node that wrote them, and another node id would never be a voter in them.
async fn check_node_id(storage: &Arc<dyn Storage>, node_id: u64) -> CoreResult<()> {
    check_fixed(storage, "node_id", node_id, node_id.to_be_bytes().to_vec(), |stored| {
        format!(
            "invalid configuration: node.id: the data directory belongs to node {stored} (configured: {node_id}); \
             start it as node {stored}, or give node {node_id} a data directory of its own"
        )
    })
    .await
}

/// Refuse to start with a shard count other than the one the data was written with: partitions
/// are placed by hash over it, so changing it would lose track of every partition.
async fn check_shard_count(storage: &Arc<dyn Storage>, shard_count: u32) -> CoreResult<()> {
    check_fixed(storage, "shard_count", shard_count.into(), shard_count.to_be_bytes().to_vec(), |stored| {
        format!(
            "invalid configuration: core.shard_count: the data directory was created with {stored} shards, \
             and the shard count cannot change (configured: {shard_count})"
        )
    })
    .await
}

/// A setting the data directory is bound to: recorded (`encoded`, a big-endian number) under
/// `key` at first start, refused with `refusal(stored)` when a later start has another `value`.
async fn check_fixed(
    storage: &Arc<dyn Storage>,
    key: &'static str,
    value: u64,
    encoded: Vec<u8>,
    refusal: impl FnOnce(u64) -> String,
) -> CoreResult<()> {
    let storage_error = |e: crate::raft::storage::StorageError| CoreError::Storage(e.to_string());
    let stored = run_io(storage, move |s| s.get_meta("node", key)).await.map_err(storage_error)?;
    let Some(bytes) = stored else {
        return run_io(storage, move |s| s.put_meta("node", key, &encoded, Durability::Synced))
            .await
            .map_err(storage_error);
    };
    let stored = match bytes.len() {
        4 => u64::from(u32::from_be_bytes(bytes.try_into().unwrap_or_default())),
        8 => u64::from_be_bytes(bytes.try_into().unwrap_or_default()),
        _ => return Err(CoreError::Storage(format!("the stored {key} is not a 32- or 64-bit number"))),
    };
    if stored == value { Ok(()) } else { Err(CoreError::InvalidArgument(refusal(stored))) }
}

/// Refuse a group whose stored membership does not fit the configuration: this node is no longer
/// a member (it was removed from the cluster), or the data directory was written by another
/// cluster, or by this node alone (its groups would go on without the peers, a second cluster
/// beside theirs). The stored membership, which membership changes keep up to date, wins over
/// the configured peers as long as they share a voter other than this node. A group not formed
/// yet has no membership and passes.
fn check_membership<C: openraft::RaftTypeConfig<NodeId = u64, Node = openraft::BasicNode>>(
    group: &str,
    raft: &Raft<C>,
    me: u64,
    voters: &BTreeMap<u64, openraft::BasicNode>,
) -> CoreResult<()> {
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let stored: Vec<u64> = membership.voter_ids().collect();
    let configured: Vec<u64> = voters.keys().copied().collect();
    if stored.is_empty() || stored == configured {
        return Ok(());
    }
    if membership.get_node(&me).is_none() {
        return Err(CoreError::InvalidArgument(format!(
            "node {me} is no longer a member of the cluster: the data directory's group {group} has the voters \
             {stored:?}; give this node an empty data directory and add it again (wharf cluster join)"
        )));
    }
    let shared = stored.iter().any(|id| *id != me && voters.contains_key(id));
    if shared {
        tracing::info!(group, ?stored, ?configured, "the group's members changed since the configuration was written");
        return Ok(());
    }
    let peers =
        if configured.len() == 1 { "no peers (a single node)".to_owned() } else { format!("peers {configured:?}") };
    Err(CoreError::InvalidArgument(format!(
        "invalid configuration: cluster.peers: the data directory's group {group} has the voters {stored:?}, \
         but {peers} are configured, none of them among those voters: configure the voters the data was \
         written with (or some of them), or give this node an empty data directory"
    )))
}

/// What every group of a node is started with ([`Core::open_in`]).
struct GroupLaunch<'a> {
    config: &'a CoreConfig,
    raft_config: &'a Arc<openraft::Config>,
    voters: &'a BTreeMap<u64, openraft::BasicNode>,
    transport: &'a Arc<dyn Transport>,
    storage: &'a Arc<dyn Storage>,
    syncer: &'a Syncer,
    cluster: Option<&'a ClusterLink>,
}

impl GroupLaunch<'_> {
    /// Start group `name`, the `index`-th of the node (the meta group is 0, shard `i` is `i + 1`):
    /// its Raft instance, after checking its stored membership; its proposer (whose task is
    /// returned); and, in a cluster, its endpoint for the peers.
    async fn start<C, S>(
        &self,
        name: &str,
        index: usize,
        effects: EffectSink<S::Effect>,
    ) -> CoreResult<(Group<C, S>, JoinHandle<()>)>
    where
        S: crate::raft::ReplicatedState,
        C: crate::raft::GroupConfig<S, Responder = openraft::impls::OneshotResponder<C>, AsyncRuntime = WharfRuntime>,
    {
        let me = self.config.node_id;
        let start = GroupStart {
            name,
            node_id: me,
            raft_config: Arc::clone(self.raft_config),
            voters: self.voters.clone(),
            elect_first: designated(self.voters, index) == Some(me),
            form: !self.cluster.is_some_and(|link| link.join),
        };
        let network = ClusterNetwork::new(name, Arc::clone(self.transport));
        let (raft, reader) =
            start_group::<C, S, _>(start, network, Arc::clone(self.storage), self.syncer.clone(), effects)
                .await
                .map_err(|e| CoreError::Unavailable(e.to_string()))?;
        check_membership(name, &raft, me, self.voters)?;
        let forwarder = self.cluster.map(|_| Forwarder { me, transport: Arc::clone(self.transport) });
        let (proposer, task) = Proposer::spawn(name, raft.clone(), &self.config.limits, forwarder);
        if let Some(link) = self.cluster {
            let endpoint = GroupEndpoint {
                name: name.to_owned(),
                raft: raft.clone(),
                proposer: proposer.clone(),
                transport: Arc::clone(&link.transport),
            };
            link.service.register(name, Arc::new(endpoint));
        }
        Ok((Group { name: name.to_owned(), raft, reader, proposer }, task))
    }
}

/// The voter that stands for election first in the `group`-th group (the meta group is 0, shard
/// `i` is `i + 1`): round robin over the voters, so that leaderships start spread over the nodes.
fn designated(voters: &BTreeMap<u64, openraft::BasicNode>, group: usize) -> Option<u64> {
    if voters.is_empty() {
        return None;
    }
    voters.keys().nth(group % voters.len()).copied()
}

/// Wait until `raft`'s group has a leader: at most [`LEADER_WAIT_SECS`], or, when `patient` (a
/// cluster node), for as long as it takes, with a warning every [`START_REPORT_SECS`] (saying what
/// is awaited: a majority, or, for a node `joining` the cluster, to be added).
async fn wait_for_leader_patiently<C>(
    name: &str,
    raft: &Raft<C>,
    patient: bool,
    joining: bool,
) -> Result<u64, crate::raft::group::GroupError>
where
    C: openraft::RaftTypeConfig<NodeId = u64>,
{
    if !patient {
        return wait_for_leader(raft, Duration::from_secs(LEADER_WAIT_SECS)).await;
    }
    let started = tokio::time::Instant::now();
    loop {
        match wait_for_leader(raft, Duration::from_secs(START_REPORT_SECS)).await {
            Err(crate::raft::group::GroupError::Wait(openraft::metrics::WaitError::Timeout(..))) => {
                let waited_secs = started.elapsed().as_secs();
                if joining {
                    tracing::warn!(
                        group = name,
                        waited_secs,
                        "not added to the group yet (wharf cluster join, on a node of the cluster): still waiting"
                    );
                } else {
                    tracing::warn!(
                        group = name,
                        waited_secs,
                        "no leader known yet (is a majority of the cluster up?): still waiting"
                    );
                }
            }
            outcome => return outcome,
        }
    }
}

/// Effects of a shard's state machine, for this node: deliveries and cancellations to local
/// consumers, dead-letter work to the republishing task.
fn shard_effect_sink(registry: Arc<Registry>, dead_letters: mpsc::UnboundedSender<DeadLetter>) -> EffectSink<Effect> {
    Arc::new(move |effects: Vec<Effect>| {
        for effect in effects {
            match effect {
                Effect::Deliver(delivery) => registry.deliver(delivery),
                Effect::ConsumerCancelled(id) => registry.cancelled(id),
                Effect::DeadLetter(job) => {
                    let _ = dead_letters.send(job);
                }
            }
        }
    })
}

#[allow(dead_code, reason = "the Cursor import is used by declare_raft_types! expansions")]
type SnapshotData = Cursor<Vec<u8>>;
