//! Starting one Raft group: builds its log store and state machine on the node's shared storage,
//! starts openraft on a given network, and forms the group from its first voters on first start.
//! Also the openraft configuration every group uses, and a wait for leadership. Touches the
//! storage only through the log store and state machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{Fatal, InitializeError, RaftError};
use openraft::metrics::WaitError;
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, Config, Raft, RaftTypeConfig, SnapshotPolicy};

use super::log_store::LogStore;
use super::state_machine::{EffectSink, StateMachineStore, StateReader};
use super::storage::{Storage, StorageError, Syncer};
use super::{GroupConfig, ReplicatedState};

/// Entries kept in the log below the last snapshot. Small, so that the log is purged soon after
/// each snapshot and disk use stays bounded; a follower lagging by more gets the snapshot instead.
pub const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 64;

/// How many (longest) election timeouts the voters other than a group's designated one wait, on
/// the group's first start, before they form it themselves (the designated voter being down).
const FIRST_ELECTION_GRACE_TIMEOUTS: u64 = 5;

/// Most entries in one append-entries RPC. Each entry is a group-commit batch (up to
/// `limits.batch_bytes_max`), so a few dozen already make a large message.
pub const APPEND_ENTRIES_PER_RPC_MAX: u64 = 32;

/// An error starting or waiting on a Raft group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group's storage failed while opening it.
    #[error("raft group {group}: storage: {source}")]
    Storage {
        /// The group.
        group: String,
        /// The storage error.
        #[source]
        source: StorageError,
    },
    /// The openraft configuration is invalid.
    #[error("invalid raft config: {0}")]
    Config(Box<openraft::ConfigError>),
    /// openraft stopped (storage failure at startup, panic, or shutdown).
    #[error("raft group {group}: {source}")]
    Fatal {
        /// The group.
        group: String,
        /// openraft's reason.
        #[source]
        source: Box<Fatal<u64>>,
    },
    /// Forming the group from its first voters failed.
    #[error("raft group {group}: initialize: {source}")]
    Initialize {
        /// The group.
        group: String,
        /// openraft's reason.
        #[source]
        source: Box<RaftError<u64, InitializeError<u64, BasicNode>>>,
    },
    /// Waiting for a leader timed out, or the group shut down meanwhile.
    #[error("waiting for a raft leader: {0}")]
    Wait(#[from] WaitError),
}

/// The openraft configuration for a group: heartbeats every `heartbeat_interval_ms`, elections
/// after a random timeout in `[election_timeout_min_ms, 2 × election_timeout_min_ms)`, a snapshot
/// every `snapshot_logs_since_last` applied entries, after which the log is purged up to
/// [`LOGS_KEPT_AFTER_SNAPSHOT`] entries below it, and `install_snapshot_timeout_ms` for a follower
/// to take each piece of a snapshot.
pub fn raft_config(
    heartbeat_interval_ms: u64,
    election_timeout_min_ms: u64,
    snapshot_logs_since_last: u64,
    install_snapshot_timeout_ms: u64,
) -> Result<Arc<Config>, GroupError> {
    let config = Config {
        cluster_name: "wharf".into(),
        heartbeat_interval: heartbeat_interval_ms,
        election_timeout_min: election_timeout_min_ms,
        election_timeout_max: election_timeout_min_ms.saturating_mul(2),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
        max_payload_entries: APPEND_ENTRIES_PER_RPC_MAX,
        install_snapshot_timeout: install_snapshot_timeout_ms,
        ..Config::default()
    };
    Ok(Arc::new(config.validate().map_err(|e| GroupError::Config(Box::new(e)))?))
}

/// How a group is started: its name, this node, the openraft configuration, and its first voters.
#[derive(Debug, Clone)]
pub struct GroupStart<'a> {
    /// The group's name (`meta`, `shard-3`), the same on every node.
    pub name: &'a str,
    /// This node's id.
    pub node_id: u64,
    /// openraft's configuration ([`raft_config`]).
    pub raft_config: Arc<Config>,
    /// The voters the group is formed from on first start (this node alone in single-node mode).
    /// Ignored on a restart: the membership is in the log or the snapshot.
    pub voters: BTreeMap<u64, BasicNode>,
    /// This node is the group's designated first leader: on first start it forms the group (and
    /// stands for election) while the other voters wait to be reached, for a few election
    /// timeouts. This is how leaderships start spread over the nodes.
    pub elect_first: bool,
    /// Whether this node may form the group on first start. `false` for a node joining a running
    /// cluster (`cluster.join`): it waits for the group's leader to add it, and never forms a
    /// group of its own (which would share its first log entry's id with the cluster's).
    pub form: bool,
}

/// Start a Raft group on this node, with its log and snapshots in `storage`, reaching its peers
/// through `network`.
///
/// `syncer` must sync `storage`; share one per storage between all groups (that is what makes
/// their appends share fdatasyncs). `effects` receives the effects of applied commands.
///
/// On first start (nothing in the log, no vote) the group is initialized with `start.voters` by
/// the designated voter (`start.elect_first`), or by any voter not reached in time. On a restart
/// it resumes from its last snapshot and log. A leader is elected after an election timeout: see
/// [`wait_for_leader`].
pub async fn start_group<C, S, N>(
    start: GroupStart<'_>,
    network: N,
    storage: Arc<dyn Storage>,
    syncer: Syncer,
    effects: EffectSink<S::Effect>,
) -> Result<(Raft<C>, StateReader<S>), GroupError>
where
    C: GroupConfig<S>,
    S: ReplicatedState,
    N: RaftNetworkFactory<C>,
{
    let GroupStart { name, node_id, raft_config, voters, elect_first, form } = start;
    let storage_err = |source| GroupError::Storage { group: name.to_owned(), source };
    let log_store = LogStore::<C>::new(name, Arc::clone(&storage), syncer).map_err(storage_err)?;
    let state_machine = StateMachineStore::<C, S>::open(name, storage, effects).await.map_err(storage_err)?;
    let reader = state_machine.reader();

    let fatal = |source| GroupError::Fatal { group: name.to_owned(), source: Box::new(source) };
    let raft = Raft::new(node_id, Arc::clone(&raft_config), network, log_store, state_machine).await.map_err(fatal)?;
    let alone = voters.keys().all(|&id| id == node_id);
    if form && !raft.is_initialized().await.map_err(fatal)? {
        if elect_first || alone {
            // Forming the group makes this node stand for election at once.
            initialize(&raft, name, voters).await?;
        } else {
            // The others wait to be reached by the designated voter, which then leads; they form
            // the group themselves only if it is not up in time.
            let grace =
                Duration::from_millis(raft_config.election_timeout_max.saturating_mul(FIRST_ELECTION_GRACE_TIMEOUTS));
            let (raft, name) = (raft.clone(), name.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if let Ok(false) = raft.is_initialized().await
                    && let Err(error) = initialize(&raft, &name, voters).await
                {
                    tracing::warn!(group = name, %error, "forming the group");
                }
            });
        }
    }
    // On a restart nobody is designated: standing at once could unseat a live leader (a node
    // restarting alone cannot tell that from the whole cluster restarting).
    Ok((raft, reader))
}

/// Form group `name` from `voters` on this node (which then stands for election). A voter that
/// another has already reached takes it as formed.
async fn initialize<C: RaftTypeConfig<NodeId = u64, Node = BasicNode>>(
    raft: &Raft<C>,
    name: &str,
    voters: BTreeMap<u64, BasicNode>,
) -> Result<(), GroupError> {
    match raft.initialize(voters).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(source) => Err(GroupError::Initialize { group: name.to_owned(), source: Box::new(source) }),
    }
}

/// Wait until the group has a leader (any node), at most `timeout`; returns the leader's id.
pub async fn wait_for_leader<C>(raft: &Raft<C>, timeout: Duration) -> Result<u64, GroupError>
where
    C: RaftTypeConfig<NodeId = u64>,
{
    loop {
        let metrics = raft.wait(Some(timeout)).metrics(|m| m.current_leader.is_some(), "a leader is known").await?;
        // The predicate held on exactly these metrics, so this returns on the first pass.
        if let Some(leader) = metrics.current_leader {
            return Ok(leader);
        }
    }
}
