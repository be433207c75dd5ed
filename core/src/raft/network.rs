//! The Raft networks a group can run with: [`ClusterNetwork`], which carries RPCs to peers over a
//! [`Transport`], and [`SingleNodeNetwork`] for a node without peers, whose clients refuse every
//! RPC as unreachable. Touches nothing itself (no sockets, no state): the transport does the IO.
//!
//! In a group whose only voter is this node openraft never calls the factory: there are no peers
//! to replicate to, to ask for votes, or to send snapshots to.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftTypeConfig};
use serde::de::DeserializeOwned;

use super::transport::{RaftRpc, RpcKind, Transport, TransportError, encode};

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

/// The Raft network of group `group` on a node with peers: each RPC is encoded, carried by the
/// node's [`Transport`], and its answer decoded. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNetwork {
    group: String,
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for ClusterNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNetwork").field("group", &self.group).finish_non_exhaustive()
    }
}

impl ClusterNetwork {
    /// The network of group `group` over `transport`.
    pub fn new(group: &str, transport: Arc<dyn Transport>) -> Self {
        Self { group: group.to_owned(), transport }
    }
}

/// A client to one peer of one group.
#[derive(Debug)]
pub struct PeerClient {
    target: u64,
    node: BasicNode,
    network: ClusterNetwork,
}

impl<C> RaftNetworkFactory<C> for ClusterNetwork
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerClient { target, node: node.clone(), network: self.clone() }
    }
}

impl PeerClient {
    /// Send one request and decode the peer's answer, within the RPC's hard time limit.
    async fn call<Req, Resp, E>(
        &self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let lost = |reason: String| {
            RPCError::Network(NetworkError::new(&TransportError::Lost { target: self.target, reason }))
        };
        let body = encode(request).map_err(lost)?;
        let rpc = RaftRpc { group: self.network.group.clone(), kind, body: body.into() };
        let sent = self.network.transport.call(self.target, &self.node, rpc);
        let reply = match tokio::time::timeout(option.hard_ttl(), sent).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error @ TransportError::Unreachable { .. })) => {
                return Err(RPCError::Unreachable(Unreachable::new(&error)));
            }
            Ok(Err(error)) => return Err(RPCError::Network(NetworkError::new(&error))),
            Err(_) => return Err(lost(format!("no answer within {:?}", option.hard_ttl()))),
        };
        let answer: Result<Resp, RaftError<u64, E>> =
            postcard::from_bytes(&reply).map_err(|e| lost(format!("malformed reply: {e}")))?;
        answer.map_err(|error| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), error)))
    }
}

impl<C> RaftNetwork<C> for PeerClient
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(RpcKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.call(RpcKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(RpcKind::Vote, &rpc, &option).await
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
