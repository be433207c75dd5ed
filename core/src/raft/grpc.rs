//! The cluster transport over gRPC (`proto/wharf/cluster/v1/raft.proto`): [`GrpcTransport`] calls
//! peers at their advertised addresses, one HTTP/2 connection per peer shared by every group, and
//! [`raft_server`] serves a node's [`RaftService`] on the cluster port. Touches sockets only
//! through tonic; what runs the server (the listener, its shutdown) is the caller's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::transport::{RaftRpc, RaftService, RpcKind, Transport, TransportError};

#[allow(
    missing_docs,
    unused_qualifications,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]
/// The generated messages, client and server of `wharf.cluster.v1`.
pub mod proto {
    tonic::include_proto!("wharf.cluster.v1");
}

use proto::raft_client::RaftClient;
use proto::raft_server::RaftServer;
use proto::{Kind, RaftReply, RaftRequest};

/// How long connecting to a peer may take before the RPC counts as unreachable.
const CONNECT_TIMEOUT_MS: u64 = 1_000;

impl From<RpcKind> for Kind {
    fn from(kind: RpcKind) -> Self {
        match kind {
            RpcKind::AppendEntries => Kind::AppendEntries,
            RpcKind::Vote => Kind::Vote,
            RpcKind::InstallSnapshot => Kind::InstallSnapshot,
            RpcKind::Forward => Kind::Forward,
            RpcKind::Membership => Kind::Membership,
            RpcKind::Transfer => Kind::Transfer,
            RpcKind::Election => Kind::Election,
        }
    }
}

/// Calls peers over gRPC. Cheap to share: one per node.
#[derive(Debug)]
pub struct GrpcTransport {
    /// Per peer: the address its client was made for, and the client (clones share one
    /// connection, re-established by tonic when it breaks).
    clients: Mutex<BTreeMap<u64, (String, RaftClient<Channel>)>>,
    message_size_max_bytes: usize,
}

impl GrpcTransport {
    /// A transport whose requests and replies are at most `message_size_max_bytes` each.
    pub fn new(message_size_max_bytes: usize) -> Arc<Self> {
        Arc::new(Self { clients: Mutex::new(BTreeMap::new()), message_size_max_bytes })
    }

    /// The client for `target` at `addr` (`host:port`), made on first use and again when the
    /// peer's address changes.
    fn client(&self, target: u64, addr: &str) -> Result<RaftClient<Channel>, TransportError> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, client)) = clients.get(&target)
            && known == addr
        {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| TransportError::Unreachable { target, reason: format!("bad address {addr:?}: {e}") })?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true);
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(self.message_size_max_bytes)
            .max_encoding_message_size(self.message_size_max_bytes);
        clients.insert(target, (addr.to_owned(), client.clone()));
        Ok(client)
    }
}

#[async_trait::async_trait]
impl Transport for GrpcTransport {
    async fn call(&self, target: u64, node: &BasicNode, rpc: RaftRpc) -> Result<Bytes, TransportError> {
        let mut client = self.client(target, &node.addr)?;
        let request = RaftRequest { target, group: rpc.group, kind: Kind::from(rpc.kind).into(), body: rpc.body };
        match client.call(request).await {
            Ok(reply) => Ok(reply.into_inner().body),
            Err(status) => Err(from_status(target, &status)),
        }
    }
}

/// What a failed call means for Raft: not delivered (back off), maybe delivered (retry), or
/// refused by the peer.
fn from_status(target: u64, status: &Status) -> TransportError {
    let reason = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        // tonic reports a refused or broken connection as UNAVAILABLE too.
        Code::Unavailable => TransportError::Unreachable { target, reason },
        Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted | Code::Internal => {
            TransportError::Lost { target, reason }
        }
        _ => TransportError::Refused { target, reason },
    }
}

/// The server side: serves Raft RPCs meant for node `me`.
#[derive(Debug)]
pub struct RaftEndpoint {
    me: u64,
    service: Arc<RaftService>,
}

#[tonic::async_trait]
impl proto::raft_server::Raft for RaftEndpoint {
    async fn call(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let request = request.into_inner();
        if request.target != self.me {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {}: check the peer addresses in the cluster configuration",
                self.me, request.target
            )));
        }
        let kind = match Kind::try_from(request.kind) {
            Ok(Kind::AppendEntries) => RpcKind::AppendEntries,
            Ok(Kind::Vote) => RpcKind::Vote,
            Ok(Kind::InstallSnapshot) => RpcKind::InstallSnapshot,
            Ok(Kind::Forward) => RpcKind::Forward,
            Ok(Kind::Membership) => RpcKind::Membership,
            Ok(Kind::Transfer) => RpcKind::Transfer,
            Ok(Kind::Election) => RpcKind::Election,
            Ok(Kind::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!("unknown rpc kind {}", request.kind)));
            }
        };
        let rpc = RaftRpc { group: request.group, kind, body: request.body };
        match self.service.serve(self.me, rpc).await {
            Ok(body) => Ok(Response::new(RaftReply { body })),
            Err(TransportError::Unreachable { reason, .. }) => Err(Status::unavailable(reason)),
            Err(error) => Err(Status::invalid_argument(error.to_string())),
        }
    }
}

/// The gRPC service serving `service`'s groups as node `me`, with requests and replies of at most
/// `message_size_max_bytes`. Add it to a `tonic::transport::Server` on the cluster port.
pub fn raft_server(me: u64, service: Arc<RaftService>, message_size_max_bytes: usize) -> RaftServer<RaftEndpoint> {
    RaftServer::new(RaftEndpoint { me, service })
        .max_decoding_message_size(message_size_max_bytes)
        .max_encoding_message_size(message_size_max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_tell_unreachable_from_lost_from_refused() {
        let unreachable = from_status(2, &Status::unavailable("connection refused"));
        assert!(matches!(unreachable, TransportError::Unreachable { target: 2, .. }), "{unreachable:?}");
        let lost = from_status(2, &Status::cancelled("stream reset"));
        assert!(matches!(lost, TransportError::Lost { .. }), "{lost:?}");
        let refused = from_status(2, &Status::failed_precondition("this is node 3, not node 2"));
        assert!(matches!(&refused, TransportError::Refused { reason, .. } if reason.contains("node 3")), "{refused:?}");
    }
}
