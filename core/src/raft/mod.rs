//! Raft plumbing shared by every group (the meta group and the shard groups): the deterministic
//! state trait, the proposal envelope, storage backends, the openraft log store and state machine
//! adapters, the network and the cluster transport under it. Touches storage (through [`storage::Storage`]) and nothing above it.

pub mod group;
pub mod grpc;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod runtime;
pub mod state_machine;
pub mod storage;
pub mod transport;

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A deterministic state replicated by one Raft group.
///
/// Implementations must guarantee:
/// - `apply` depends only on the state, the command and `now_ms`: no clocks, randomness, IO or
///   iteration over hash maps with random seeds. Every replica applying the same commands from the
///   same state reaches the same state and the same replies.
/// - `apply` never panics on any command (bad commands produce an error reply).
/// - Effects are for this node's runtime (deliver to a local consumer, dead-letter work for the
///   leader); they never feed back into the state except as new proposed commands.
pub trait ReplicatedState: Default + Debug + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// A command carried in a Raft entry.
    type Command: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The reply to one command, returned to whoever proposed it.
    type Reply: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// A side effect for the local runtime.
    type Effect: Debug + Send + 'static;

    /// Apply one committed command at committed time `now_ms` (milliseconds since the Unix epoch,
    /// never decreasing from one call to the next).
    fn apply(&mut self, now_ms: u64, command: Self::Command, effects: &mut Vec<Self::Effect>) -> Self::Reply;
}

/// The payload of one Raft entry: commands packed by group commit, with the proposer's clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal<Cmd> {
    /// The proposing leader's wall clock, milliseconds since the Unix epoch. The state machine uses
    /// `max(previous, time_ms)` so that committed time never goes backwards.
    pub time_ms: u64,
    /// Commands, applied in order.
    pub commands: Vec<Cmd>,
}

/// The replies to one entry's commands, in order (empty for blank and membership entries).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replies<R>(pub Vec<R>);

/// The openraft type configuration of a group whose deterministic state is `S`: what the log
/// store, the state machine adapter and `start_group` require of it, named once.
pub trait GroupConfig<S: ReplicatedState>:
    openraft::RaftTypeConfig<
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<Self>,
        D = Proposal<S::Command>,
        R = Replies<S::Reply>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
    >
{
}

impl<C, S> GroupConfig<S> for C
where
    S: ReplicatedState,
    C: openraft::RaftTypeConfig<
            NodeId = u64,
            Node = openraft::BasicNode,
            Entry = openraft::Entry<C>,
            D = Proposal<S::Command>,
            R = Replies<S::Reply>,
            SnapshotData = std::io::Cursor<Vec<u8>>,
        >,
{
}
