//! The cluster transport under every group's Raft network: what a Raft RPC is on the wire
//! ([`RaftRpc`]), the [`Transport`] that carries it to a peer, the [`RaftService`] that hands an
//! incoming one to the right local group, and [`Switchboard`], an in-process transport between
//! nodes of one process with partitions, loss and delay, for tests and the simulation. Touches no
//! storage; the in-process transport touches no sockets (the gRPC one, on the cluster port, is in
//! [`super::grpc`]).
//!
//! A transport moves opaque bodies: the Raft network ([`super::network`]) encodes requests and
//! replies with postcard, so every transport, the in-process one included, carries the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, Raft, RaftTypeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which Raft RPC a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcKind {
    /// Append entries (and heartbeats).
    AppendEntries,
    /// Request a vote.
    Vote,
    /// One chunk of a snapshot.
    InstallSnapshot,
    /// Commands for the group's leader to propose, from a node that does not lead it (the
    /// any-node gateway). Served by the core, not by openraft.
    Forward,
    /// A change of the group's members ([`super::membership::MembershipChange`]), for its leader
    /// to make.
    Membership,
    /// Hand the group's leadership over to a voter (a node id, postcard), for its leader to do.
    /// Served by the core, not by openraft.
    Transfer,
    /// A step a voter takes in a hand-over ([`super::membership::ElectionStep`]).
    Election,
}

/// One Raft RPC addressed to a group on a peer: the group's name, the kind, and the request
/// encoded by the Raft network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftRpc {
    /// The group (`meta`, `shard-3`): every node names its groups alike.
    pub group: String,
    /// The request's kind.
    pub kind: RpcKind,
    /// The request, encoded.
    pub body: Bytes,
}

/// Why an RPC got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Not delivered: the peer is down, unknown, partitioned away, or does not run the group (yet).
    /// Raft backs off before trying that peer again.
    #[error("node {target} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        target: u64,
        /// Why.
        reason: String,
    },
    /// Sent, but the answer never came (lost, or the connection broke): the peer may have acted on
    /// it. Raft retries; its RPCs are idempotent.
    #[error("rpc to node {target} lost: {reason}")]
    Lost {
        /// The peer.
        target: u64,
        /// Why.
        reason: String,
    },
    /// The peer answered, but not with a reply: the request or reply could not be decoded.
    #[error("node {target} refused the rpc: {reason}")]
    Refused {
        /// The peer.
        target: u64,
        /// Why.
        reason: String,
    },
}

/// Carries Raft RPCs from this node to its peers. One per node, shared by all its groups.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Deliver `rpc` to node `target` (advertised at `node.addr`) and return its encoded reply.
    async fn call(&self, target: u64, node: &BasicNode, rpc: RaftRpc) -> Result<Bytes, TransportError>;
}

/// The transport of a single node: it has no peers, and every RPC is unreachable. openraft never
/// sends one in a group whose only voter is this node; only a membership change adding a node
/// could, and that node then stays unreachable.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPeers;

#[async_trait::async_trait]
impl Transport for NoPeers {
    async fn call(&self, target: u64, _node: &BasicNode, _rpc: RaftRpc) -> Result<Bytes, TransportError> {
        tracing::warn!(target, "raft asked to reach a peer, but this node runs without a cluster");
        Err(TransportError::Unreachable { target, reason: "cluster transport not configured: single-node mode".into() })
    }
}

/// A local group's side of the Raft RPCs: decode a request, hand it to openraft, encode its answer.
#[async_trait::async_trait]
pub trait GroupRpc: Send + Sync + 'static {
    /// Serve one RPC; `Err` is a body that could not be decoded (an answer from openraft, error or
    /// not, is `Ok`).
    async fn serve(&self, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, String>;
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    postcard::from_bytes(body).map_err(|e| format!("malformed request: {e}"))
}

/// Encode an RPC body (request or reply) as every transport carries it.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(value).map_err(|e| format!("encode: {e}"))
}

/// Encode `request`, send it to group `group` on node `target` as a `kind` RPC, and return the
/// encoded answer; an answer not back within `timeout` is lost.
pub(crate) async fn call_encoded<T: Serialize>(
    transport: &dyn Transport,
    target: u64,
    node: &BasicNode,
    group: &str,
    kind: RpcKind,
    request: &T,
    timeout: Duration,
) -> Result<Bytes, TransportError> {
    let body = encode(request).map_err(|reason| TransportError::Refused { target, reason })?;
    let rpc = RaftRpc { group: group.to_owned(), kind, body: body.into() };
    tokio::time::timeout(timeout, transport.call(target, node, rpc))
        .await
        .unwrap_or_else(|_| Err(TransportError::Lost { target, reason: format!("no answer within {timeout:?}") }))
}

#[async_trait::async_trait]
impl<C> GroupRpc for Raft<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Responder = openraft::impls::OneshotResponder<C>>,
{
    async fn serve(&self, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, String> {
        match kind {
            RpcKind::AppendEntries => {
                let request: AppendEntriesRequest<C> = decode(body)?;
                encode(&self.append_entries(request).await)
            }
            RpcKind::Vote => {
                let request: VoteRequest<u64> = decode(body)?;
                encode(&self.vote(request).await)
            }
            RpcKind::InstallSnapshot => {
                let request: InstallSnapshotRequest<C> = decode(body)?;
                let answer: Result<_, RaftError<u64, InstallSnapshotError>> = self.install_snapshot(request).await;
                encode(&answer)
            }
            RpcKind::Membership => {
                let change: super::membership::MembershipChange = decode(body)?;
                encode(&super::membership::change_here(self, &change).await)
            }
            RpcKind::Election => {
                let step: super::membership::ElectionStep = decode(body)?;
                let done: Result<(), String> = super::membership::election_step(self, step).await;
                encode(&done)
            }
            RpcKind::Forward | RpcKind::Transfer => Err("this group takes no forwarded commands".into()),
        }
    }
}

/// A node's receiving end: the groups it runs, by name. A transport's server hands every incoming
/// RPC to [`RaftService::serve`].
#[derive(Default)]
pub struct RaftService {
    groups: RwLock<BTreeMap<String, Arc<dyn GroupRpc>>>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("RaftService").field("groups", &groups.keys().collect::<Vec<_>>()).finish()
    }
}

impl RaftService {
    /// A service running no group yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve RPCs for group `name` with `group` (replacing a previous one of that name, as a
    /// restarted group does).
    pub fn register(&self, name: &str, group: Arc<dyn GroupRpc>) {
        self.groups.write().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned(), group);
    }

    /// Stop serving group `name`; its RPCs are then unreachable.
    pub fn deregister(&self, name: &str) {
        self.groups.write().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    /// Serve one incoming RPC on node `me`.
    pub async fn serve(&self, me: u64, rpc: RaftRpc) -> Result<Bytes, TransportError> {
        let group = self.groups.read().unwrap_or_else(PoisonError::into_inner).get(&rpc.group).cloned();
        let Some(group) = group else {
            return Err(TransportError::Unreachable {
                target: me,
                reason: format!("group {} does not run on node {me}", rpc.group),
            });
        };
        let reply = group.serve(rpc.kind, &rpc.body).await;
        reply.map(Bytes::from).map_err(|reason| TransportError::Refused { target: me, reason })
    }
}

/// Which way messages between two nodes are cut.
#[derive(Debug, Default)]
struct Links {
    /// Nodes attached, by id: what a request to each is served by.
    nodes: BTreeMap<u64, Arc<RaftService>>,
    /// `(from, to)` pairs whose messages are dropped.
    cut: BTreeSet<(u64, u64)>,
    /// Random loss and delay on every link, when set.
    noise: Option<Noise>,
}

/// Random loss and delay, drawn from a seeded generator so that a simulation replays them.
#[derive(Debug)]
struct Noise {
    rng: StdRng,
    /// Chance that a request or a reply is lost, per thousand.
    loss_per_mille: u32,
    /// Each request and each reply is held back up to this long.
    delay_ms_max: u64,
}

impl Noise {
    fn lost(&mut self) -> bool {
        self.loss_per_mille > 0 && self.rng.gen_range(0..1000) < self.loss_per_mille
    }

    fn delay(&mut self) -> Duration {
        Duration::from_millis(if self.delay_ms_max == 0 { 0 } else { self.rng.gen_range(0..=self.delay_ms_max) })
    }
}

/// An in-process network between nodes of one process: every node attaches its [`RaftService`]
/// and calls the others through [`Switchboard::transport`]. Links can be cut one way or both, and
/// a node detached, as a crash or a partition would; a request crossing a cut link is
/// unreachable, and a reply crossing one is lost after the request was served: its sender hears
/// nothing until its own timeout.
#[derive(Debug, Default)]
pub struct Switchboard {
    links: Mutex<Links>,
}

impl Switchboard {
    /// A switchboard with no node attached.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attach node `id`, served by `service` (replacing what was attached, as after a restart).
    pub fn attach(&self, id: u64, service: Arc<RaftService>) {
        self.links().nodes.insert(id, service);
    }

    /// Detach node `id`: RPCs to it and from it are unreachable until it is attached again (a
    /// crashed node neither answers nor sends).
    pub fn detach(&self, id: u64) {
        self.links().nodes.remove(&id);
    }

    /// Drop every message from `from` to `to` (one way).
    pub fn cut(&self, from: u64, to: u64) {
        self.links().cut.insert((from, to));
    }

    /// Cut both ways between every node of `side` and every node not in it.
    pub fn isolate(&self, side: &[u64]) {
        let mut links = self.links();
        let others: Vec<u64> = links.nodes.keys().copied().filter(|id| !side.contains(id)).collect();
        for &a in side {
            for &b in &others {
                links.cut.insert((a, b));
                links.cut.insert((b, a));
            }
        }
    }

    /// Restore every cut link (loss and delay set by [`Switchboard::set_noise`] stay).
    pub fn heal(&self) {
        self.links().cut.clear();
    }

    /// Lose each request and each reply with a chance of `loss_per_mille` per thousand, and hold
    /// each back for up to `delay_ms_max`, drawing from a generator seeded with `seed`. Zero for
    /// both turns the noise off.
    pub fn set_noise(&self, seed: u64, loss_per_mille: u32, delay_ms_max: u64) {
        self.links().noise = (loss_per_mille > 0 || delay_ms_max > 0).then(|| Noise {
            rng: StdRng::seed_from_u64(seed),
            loss_per_mille: loss_per_mille.min(1000),
            delay_ms_max,
        });
    }

    /// Carry one request or reply through the noise: held back by its delay, and never
    /// arriving (the sender hears nothing, see [`silence`]) if it is lost.
    async fn cross(&self) {
        let (lost, delay) = match self.links().noise.as_mut() {
            Some(noise) => (noise.lost(), noise.delay()),
            None => (false, Duration::ZERO),
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if lost {
            std::future::pending::<()>().await;
        }
    }

    /// The transport node `from` calls its peers with.
    pub fn transport(self: &Arc<Self>, from: u64) -> Arc<dyn Transport> {
        Arc::new(LocalTransport { from, board: Arc::clone(self) })
    }
}

/// A node's end of a [`Switchboard`].
#[derive(Debug)]
struct LocalTransport {
    from: u64,
    board: Arc<Switchboard>,
}

#[async_trait::async_trait]
impl Transport for LocalTransport {
    async fn call(&self, target: u64, _node: &BasicNode, rpc: RaftRpc) -> Result<Bytes, TransportError> {
        let service = {
            let links = self.board.links();
            if !links.nodes.contains_key(&self.from) {
                return Err(TransportError::Unreachable { target, reason: "sender detached".into() });
            }
            if links.cut.contains(&(self.from, target)) {
                return Err(TransportError::Unreachable { target, reason: "link cut".into() });
            }
            links.nodes.get(&target).cloned()
        };
        let service =
            service.ok_or_else(|| TransportError::Unreachable { target, reason: "node not attached".into() })?;
        self.board.cross().await;
        let reply = service.serve(target, rpc).await?;
        self.board.cross().await;
        // The link may have been cut, or the node detached, while the request was served.
        let reply_cut = {
            let links = self.board.links();
            let attached = links.nodes.get(&target).is_some_and(|now| Arc::ptr_eq(now, &service));
            links.cut.contains(&(target, self.from)) || !attached
        };
        if reply_cut {
            return silence().await;
        }
        Ok(reply)
    }
}

/// What a sender hears of a lost request or reply: nothing, until its own timeout gives up (as
/// over a real network, and so that a retry loop cannot spin without time passing).
async fn silence() -> Result<Bytes, TransportError> {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_single_node_reaches_nobody_and_says_why() {
        let rpc = RaftRpc { group: "meta".into(), kind: RpcKind::Vote, body: Bytes::new() };
        let error = NoPeers.call(7, &BasicNode::default(), rpc).await.expect_err("no peers");
        assert!(matches!(&error, TransportError::Unreachable { target: 7, .. }), "{error:?}");
        assert!(error.to_string().contains("single-node mode"), "{error}");
    }

    #[tokio::test]
    async fn a_group_that_does_not_run_on_a_node_is_unreachable_there() {
        let board = Switchboard::new();
        board.attach(1, Arc::new(RaftService::new()));
        board.attach(2, Arc::new(RaftService::new()));
        let rpc = RaftRpc { group: "shard-0".into(), kind: RpcKind::Vote, body: Bytes::new() };
        let error = board.transport(1).call(2, &BasicNode::default(), rpc.clone()).await.expect_err("no group");
        assert!(matches!(&error, TransportError::Unreachable { reason, .. } if reason.contains("shard-0")), "{error}");
        board.cut(1, 2);
        let error = board.transport(1).call(2, &BasicNode::default(), rpc.clone()).await.expect_err("cut");
        assert!(matches!(&error, TransportError::Unreachable { reason, .. } if reason == "link cut"), "{error}");
        // A crashed node neither answers nor sends.
        board.heal();
        board.detach(1);
        let error = board.transport(1).call(2, &BasicNode::default(), rpc).await.expect_err("detached");
        assert!(matches!(&error, TransportError::Unreachable { reason, .. } if reason == "sender detached"), "{error}");
    }
}
