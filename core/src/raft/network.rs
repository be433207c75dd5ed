//! The Raft network of every group: [`ClusterNetwork`] carries openraft's RPCs to peers over the
//! node's [`Transport`] (on a single node, [`super::transport::NoPeers`], which reaches nobody).
//! Touches nothing itself (no sockets, no state): the transport does the IO.
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

use super::transport::{RpcKind, Transport, TransportError, call_encoded};

/// The Raft network of group `group`: each RPC is encoded, carried by the
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
        let network = &self.network;
        let sent = call_encoded(
            &*network.transport,
            self.target,
            &self.node,
            &network.group,
            kind,
            request,
            option.hard_ttl(),
        );
        let reply = match sent.await {
            Ok(reply) => reply,
            Err(error @ TransportError::Unreachable { .. }) => {
                return Err(RPCError::Unreachable(Unreachable::new(&error)));
            }
            Err(error) => return Err(RPCError::Network(NetworkError::new(&error))),
        };
        let answer: Result<Resp, RaftError<u64, E>> = postcard::from_bytes(&reply).map_err(|e| {
            let reason = format!("malformed reply: {e}");
            RPCError::Network(NetworkError::new(&TransportError::Lost { target: self.target, reason }))
        })?;
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
