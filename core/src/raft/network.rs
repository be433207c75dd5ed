//! The Raft network for single-node groups: a [`RaftNetworkFactory`] whose clients refuse every RPC
//! as unreachable. The cluster transport comes later; until then this is what every group is
//! started with. Touches nothing (no sockets, no state).
//!
//! In a group whose only voter is this node openraft never calls the factory: there are no peers
//! to replicate to, to ask for votes, or to send snapshots to. A call can happen only if a
//! membership change adds a node, and that node then stays unreachable.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftTypeConfig};

/// Why every RPC fails in single-node mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cluster transport not configured: single-node mode (cannot reach node {target})")]
pub struct TransportNotConfigured {
    /// The node the RPC was for.
    pub target: u64,
}

/// Network factory for single-node groups: every client it makes answers every RPC with
/// `Unreachable` ([`TransportNotConfigured`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleNodeNetwork;

/// A client to a peer that cannot be reached in single-node mode.
#[derive(Debug, Clone, Copy)]
pub struct UnreachablePeer {
    target: u64,
}

impl UnreachablePeer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&TransportNotConfigured { target: self.target }))
    }
}

impl<C> RaftNetworkFactory<C> for SingleNodeNetwork
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    type Network = UnreachablePeer;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        tracing::warn!(target, "raft asked for a peer client, but the cluster transport is not configured");
        UnreachablePeer { target }
    }
}

impl<C> RaftNetwork<C> for UnreachablePeer
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<C>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(self.unreachable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_error_names_the_cause() {
        let err: RPCError<u64, BasicNode, RaftError<u64>> = UnreachablePeer { target: 7 }.unreachable();
        let text = err.to_string();
        assert!(text.contains("cluster transport not configured: single-node mode"), "{text}");
        assert!(text.contains("node 7"), "{text}");
    }
}
