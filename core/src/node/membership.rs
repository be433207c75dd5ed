//! Adding nodes to the cluster and removing them, online: every group's membership is changed by
//! its leader (asked over the cluster transport when that is another node), one group after the
//! other; a removed node's consumers and exclusive queues are then let go. And handing a group's
//! leadership over to another voter (on request, and at a graceful shutdown). Touches the groups'
//! `Raft` handles, their group commit (held during a hand-over), the cluster transport and, for a
//! removed node, the groups' state through commands.

use std::sync::Arc;
use std::time::Duration;

use openraft::impls::OneshotResponder;
use openraft::{BasicNode, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};

use super::Core;
use super::proposer::Proposer;
use crate::catalogue::MetaCommand;
use crate::error::{CoreError, CoreResult};
use crate::raft::membership::{ElectionStep, MembershipAnswer, MembershipChange, change_here, matched};
use crate::raft::transport::{RpcKind, Transport, call_encoded};
use crate::raft::{GroupConfig, ReplicatedState};
use crate::shard::ShardCommand;

/// Pause before asking a group's leader again (no leader yet, another change in progress, a
/// new node still catching up).
const MEMBERSHIP_RETRY_MS: u64 = 200;
/// Attempts at letting go of a removed node's consumers and queues (the groups it led elect new
/// leaders meanwhile).
const FORGET_ATTEMPTS_MAX: u32 = 12;

/// How many longest election timeouts (openraft's leader lease) a hand-over may take at each of
/// its steps: the entries in flight to finish, the target to catch up, the target to be elected.
const HAND_OVER_LEASES: u32 = 4;

/// One group's leader, after a hand-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLeader {
    /// The group (`meta`, `shard-3`).
    pub group: String,
    /// Its leader.
    pub leader: u64,
}

/// What the leader made of a hand-over request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum HandOver {
    /// The target leads now.
    Done,
    /// This node does not lead the group: the leader it knows of, if any.
    NotLeader {
        /// The leader.
        leader: Option<u64>,
    },
    /// Not done, and worth trying again.
    Retry(String),
    /// Refused: trying again would not help.
    Refused(String),
}

/// One group's members after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembers {
    /// The group (`meta`, `shard-3`).
    pub group: String,
    /// Its voters, ascending.
    pub voters: Vec<u64>,
}

impl Core {
    /// Add node `id`, whose cluster listener is at `addr`, to every group of the cluster: a
    /// learner first, a voter once it has caught up (snapshots included). The node must be
    /// running with `cluster.join` (it waits to be added) and the cluster's `core.shard_count`.
    /// Each group goes through openraft's joint consensus, so a majority stays available
    /// throughout. Idempotent: a node already a voter of a group is left as it is, so a change
    /// interrupted (or timed out) is finished by asking again. Fails after `timeout` in all.
    pub async fn add_node(&self, id: u64, addr: &str, timeout: Duration) -> CoreResult<Vec<GroupMembers>> {
        if addr.trim().is_empty() {
            return Err(CoreError::InvalidArgument("the new node's cluster address is empty".into()));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // The new node's catching up may take what is left of the whole change's time.
        let change = || MembershipChange::Add {
            id,
            addr: addr.to_owned(),
            catch_up_timeout_ms: u64::try_from(
                deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis(),
            )
            .unwrap_or(u64::MAX),
        };
        tracing::info!(node = id, addr, "adding a node to the cluster");
        self.change_every_group(change, deadline).await
    }

    /// Remove node `id` from every group of the cluster, then let go of what it held: its
    /// consumers' unacknowledged deliveries go back to their queues, its exclusive queues are
    /// deleted. The node may be running or down; once removed it takes no part in the groups
    /// and refuses to start on its data directory. A node cannot remove itself (ask another).
    /// Idempotent, like [`Core::add_node`].
    pub async fn remove_node(&self, id: u64, timeout: Duration) -> CoreResult<Vec<GroupMembers>> {
        let me = self.inner.config.node_id;
        if id == me {
            return Err(CoreError::InvalidArgument(format!(
                "node {me} cannot remove itself: ask another node of the cluster"
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        tracing::info!(node = id, "removing a node from the cluster");
        let members = self.change_every_group(|| MembershipChange::Remove { id }, deadline).await?;
        // Gone for good: its consumers and exclusive queues will never be cleaned up by a restart.
        // Leaderships may still be moving (the node led some groups), so each step is retried.
        let gone = u64::MAX;
        let shards = self.inner.shards.len();
        self.retry_uncommitted("letting go of a removed node's consumers", FORGET_ATTEMPTS_MAX, || {
            self.on_shards((0..shards).map(|shard| (shard, ShardCommand::NodeUp { node: id, incarnation: gone })))
        })
        .await?;
        let deleted = self
            .retry_uncommitted("deleting a removed node's exclusive queues", FORGET_ATTEMPTS_MAX, || {
                self.meta(MetaCommand::DeleteOwnedBy { node: id, incarnation_below: gone })
            })
            .await?;
        self.drop_deleted_partitions(&deleted).await?;
        tracing::info!(node = id, "node removed from the cluster");
        Ok(members)
    }

    /// Make the change `change()` to the meta group, then to every shard, by their leaders; the
    /// groups' members afterwards.
    async fn change_every_group(
        &self,
        change: impl Fn() -> MembershipChange,
        deadline: tokio::time::Instant,
    ) -> CoreResult<Vec<GroupMembers>> {
        self.check_open()?;
        let Some(link) = self.inner.cluster.as_ref() else {
            return Err(CoreError::InvalidArgument(
                "this node runs alone (no cluster.peers): the members of a single node cannot change".into(),
            ));
        };
        let transport = &*link.transport;
        let meta = &self.inner.meta;
        let mut members = vec![change_group(&meta.name, &meta.raft, transport, &change, deadline).await?];
        for shard in &self.inner.shards {
            members.push(change_group(&shard.name, &shard.raft, transport, &change, deadline).await?);
        }
        Ok(members)
    }
}

/// Have group `name`'s leader make the change, this node or another, again while it is worth it
/// and the deadline allows.
async fn change_group<C>(
    name: &str,
    raft: &Raft<C>,
    transport: &dyn Transport,
    change: &impl Fn() -> MembershipChange,
    deadline: tokio::time::Instant,
) -> CoreResult<GroupMembers>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Responder = OneshotResponder<C>>,
{
    loop {
        let metrics = raft.metrics().borrow().clone();
        let answer = match metrics.current_leader {
            Some(leader) if leader == metrics.id => change_here(raft, &change()).await,
            Some(leader) => {
                let request = change();
                let asked = ask_group_leader(raft, transport, name, leader, RpcKind::Membership, &request, deadline);
                asked.await.unwrap_or_else(MembershipAnswer::Retry)
            }
            None => MembershipAnswer::NotLeader { leader: None },
        };
        match answer {
            MembershipAnswer::Done { voters } => {
                tracing::info!(group = name, ?voters, "group members changed");
                return Ok(GroupMembers { group: name.to_owned(), voters });
            }
            MembershipAnswer::Refused(reason) => {
                return Err(CoreError::InvalidArgument(format!("group {name}: {reason}")));
            }
            answer if tokio::time::Instant::now() < deadline => {
                tracing::debug!(group = name, %answer, "membership change: asking again");
                tokio::time::sleep(Duration::from_millis(MEMBERSHIP_RETRY_MS)).await;
            }
            answer => {
                return Err(CoreError::Unavailable(format!(
                    "group {name}: the membership change did not complete in time ({answer}); ask again to finish it"
                )));
            }
        }
    }
}

impl Core {
    /// Hand the leadership of `group` (every group when `None`) over to voter `to`, each group
    /// by its leader ([`hand_over`]): for balancing leaderships over the nodes, or before
    /// maintenance. The groups' leaders afterwards. Fails after `timeout` in all.
    pub async fn transfer_leadership(
        &self,
        group: Option<&str>,
        to: u64,
        timeout: Duration,
    ) -> CoreResult<Vec<GroupLeader>> {
        self.check_open()?;
        let Some(link) = self.inner.cluster.as_ref() else {
            return Err(CoreError::InvalidArgument("this node runs alone: its groups have no other voter".into()));
        };
        let names: Vec<&str> = std::iter::once(self.inner.meta.name.as_str())
            .chain(self.inner.shards.iter().map(|s| s.name.as_str()))
            .collect();
        if let Some(group) = group
            && !names.contains(&group)
        {
            return Err(CoreError::NotFound(format!("no group {group}: the groups are {names:?}")));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut leaders = Vec::new();
        let meta = &self.inner.meta;
        if group.is_none_or(|group| group == meta.name) {
            leaders.push(transfer_group(&meta.name, &meta.raft, &meta.proposer, &*link.transport, to, deadline).await?);
        }
        for shard in self.inner.shards.iter().filter(|shard| group.is_none_or(|group| group == shard.name)) {
            leaders
                .push(transfer_group(&shard.name, &shard.raft, &shard.proposer, &*link.transport, to, deadline).await?);
        }
        Ok(leaders)
    }

    /// Hand every group this node leads over to its most up-to-date other voter, all groups at
    /// once: before maintenance, and at a graceful shutdown ([`Core::shutdown`]). The groups
    /// handed over, with their new leader; what does not go through in time is left to an
    /// election.
    pub async fn step_down(&self) -> Vec<GroupLeader> {
        let Some(link) = self.inner.cluster.as_ref() else { return Vec::new() };
        let meta = &self.inner.meta;
        let mut handing = vec![tokio::spawn(hand_over_to_best(
            meta.name.clone(),
            meta.raft.clone(),
            meta.proposer.clone(),
            Arc::clone(&link.transport),
        ))];
        for shard in &self.inner.shards {
            handing.push(tokio::spawn(hand_over_to_best(
                shard.name.clone(),
                shard.raft.clone(),
                shard.proposer.clone(),
                Arc::clone(&link.transport),
            )));
        }
        let mut handed = Vec::new();
        for task in handing {
            if let Ok(Some(group)) = task.await {
                handed.push(group);
            }
        }
        handed
    }
}

/// Send `request` to group `name`'s leader, node `leader`, as a `kind` RPC, answered before
/// `deadline`: its answer, or why none came (worth asking again).
async fn ask_group_leader<C, T, A>(
    raft: &Raft<C>,
    transport: &dyn Transport,
    name: &str,
    leader: u64,
    kind: RpcKind,
    request: &T,
    deadline: tokio::time::Instant,
) -> Result<A, String>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
    T: Serialize,
    A: serde::de::DeserializeOwned,
{
    let node = raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned().unwrap_or_default();
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let reply =
        call_encoded(transport, leader, &node, name, kind, request, remaining).await.map_err(|e| e.to_string())?;
    postcard::from_bytes(&reply).map_err(|error| format!("node {leader} answered: {error}"))
}

/// Have group `name`'s leader hand it over to `to`, this node or another, again while it is
/// worth it and the deadline allows.
async fn transfer_group<C, S>(
    name: &str,
    raft: &Raft<C>,
    proposer: &Proposer<S>,
    transport: &dyn Transport,
    to: u64,
    deadline: tokio::time::Instant,
) -> CoreResult<GroupLeader>
where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>>,
{
    loop {
        let metrics = raft.metrics().borrow().clone();
        let answer = match metrics.current_leader {
            Some(leader) if leader == to => HandOver::Done,
            Some(leader) if leader == metrics.id => hand_over(name, raft, proposer, transport, to).await,
            Some(leader) => {
                let asked = ask_group_leader(raft, transport, name, leader, RpcKind::Transfer, &to, deadline);
                asked.await.unwrap_or_else(HandOver::Retry)
            }
            None => HandOver::NotLeader { leader: None },
        };
        match answer {
            HandOver::Done => {
                // The target leads (as the old leader saw it): wait to see it here too.
                let seen = raft
                    .wait(Some(deadline.saturating_duration_since(tokio::time::Instant::now())))
                    .metrics(|m| m.current_leader == Some(to), "the new leader")
                    .await;
                if seen.is_ok() {
                    tracing::info!(group = name, leader = to, "leadership handed over");
                    return Ok(GroupLeader { group: name.to_owned(), leader: to });
                }
            }
            HandOver::Refused(reason) => return Err(CoreError::InvalidArgument(format!("group {name}: {reason}"))),
            HandOver::NotLeader { .. } | HandOver::Retry(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CoreError::Unavailable(format!(
                "group {name}: the leadership did not go to node {to} in time; ask again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(MEMBERSHIP_RETRY_MS)).await;
    }
}

/// `raft`'s metrics if this node leads its group; else the leader it knows of.
fn leading<C: RaftTypeConfig<NodeId = u64, Node = BasicNode>>(
    raft: &Raft<C>,
) -> Result<openraft::RaftMetrics<u64, BasicNode>, Option<u64>> {
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader == Some(metrics.id) { Ok(metrics) } else { Err(metrics.current_leader) }
}

/// Hand group `name` over to the other voter that has replicated the most, if this node leads
/// it (a second time if the first did not go through); the new leader.
async fn hand_over_to_best<C, S>(
    name: String,
    raft: Raft<C>,
    proposer: Proposer<S>,
    transport: Arc<dyn Transport>,
) -> Option<GroupLeader>
where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>>,
{
    for _attempt in 0..2 {
        let metrics = leading(&raft).ok()?;
        let me = metrics.id;
        let best = metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&voter| voter != me)
            .max_by_key(|&voter| matched(&metrics, voter));
        let to = best?;
        match hand_over(&name, &raft, &proposer, &*transport, to).await {
            HandOver::Done => {
                tracing::info!(group = name, leader = to, "leadership handed over");
                return Some(GroupLeader { group: name, leader: to });
            }
            outcome => tracing::info!(group = name, ?outcome, "leadership not handed over"),
        }
    }
    None
}

/// Hand group `name`'s leadership over to voter `to`, on its leader. openraft 0.9 has no leader
/// transfer, and a voter refuses to vote while it hears from a leader (the leader lease), so
/// the leader stands still instead: it holds its group commit until every entry in flight is
/// answered, waits for `to` to hold its whole log, asks the other voters to hold back their own
/// candidacies for a while, stops its heartbeats and elections, and asks `to` to stand at once.
/// The leader's own vote goes to `to` (a leader keeps no lease against candidates), and the
/// others' once their leases lapse. Heartbeats, elections and the group commit resume whatever
/// the outcome; commands held meanwhile then go to the new leader.
pub(crate) async fn hand_over<C, S>(
    name: &str,
    raft: &Raft<C>,
    proposer: &Proposer<S>,
    transport: &dyn Transport,
    to: u64,
) -> HandOver
where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>>,
{
    let metrics = match leading(raft) {
        Ok(metrics) => metrics,
        Err(leader) => return HandOver::NotLeader { leader },
    };
    let me = metrics.id;
    if to == me {
        return HandOver::Done;
    }
    let membership = metrics.membership_config.membership().clone();
    let Some(target) = membership.get_node(&to).filter(|_| membership.voter_ids().any(|v| v == to)).cloned() else {
        return HandOver::Refused(format!("node {to} is not a voter of group {name}"));
    };
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let step = lease * HAND_OVER_LEASES;
    let Ok(Ok(held)) = tokio::time::timeout(step, proposer.hold()).await else {
        return HandOver::Retry("the entries in flight were not answered in time".into());
    };
    let last = raft.metrics().borrow().last_log_index;
    let caught_up = raft.wait(Some(step)).metrics(|m| matched(m, to) >= last, "the target holds the log").await;
    if caught_up.is_err() {
        return HandOver::Retry(format!("node {to} did not catch up with the log in time"));
    }
    for voter in membership.voter_ids().filter(|&voter| voter != me && voter != to) {
        let node = membership.get_node(&voter).cloned().unwrap_or_default();
        let pause = ElectionStep::Pause { ms: u64::try_from((step * 2).as_millis()).unwrap_or(u64::MAX) };
        // Best effort: a voter not reached is down, and stands for nothing anyway.
        let _ = call_encoded(transport, voter, &node, name, RpcKind::Election, &pause, lease).await;
    }
    raft.runtime_config().heartbeat(false);
    raft.runtime_config().elect(false);
    let asked = call_encoded(transport, to, &target, name, RpcKind::Election, &ElectionStep::ElectNow, lease).await;
    let elected = match asked {
        Ok(_) => raft
            .wait(Some(step))
            .metrics(|m| m.current_leader.is_some_and(|leader| leader != me), "another leader")
            .await
            .ok()
            .and_then(|m| m.current_leader),
        Err(_) => None,
    };
    raft.runtime_config().heartbeat(true);
    raft.runtime_config().elect(true);
    drop(held);
    match elected {
        Some(leader) if leader == to => HandOver::Done,
        Some(leader) => HandOver::Retry(format!("node {leader} was elected instead of node {to}")),
        None => HandOver::Retry(format!("node {to} was not elected in time")),
    }
}
