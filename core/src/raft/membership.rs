//! Membership changes of one Raft group, as its leader makes them: add a node (a learner first,
//! a voter once it has caught up) or remove one, through openraft's joint consensus. What a
//! change is on the wire ([`MembershipChange`], carried as an [`super::transport::RpcKind::Membership`]
//! RPC to the group's leader) and its answer ([`MembershipAnswer`]). Touches the group's `Raft`
//! handle only.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::impls::OneshotResponder;
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics, RaftTypeConfig};
use serde::{Deserialize, Serialize};

/// A change of a group's members, made by its leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add node `id`, reached at `addr`, as a voter: first as a learner, promoted once its
    /// replica has caught up with the log (at most `catch_up_timeout_ms`), so that the group
    /// never counts on a voter that cannot vote yet.
    Add {
        /// The node.
        id: u64,
        /// Its cluster address, `host:port`.
        addr: String,
        /// How long it may take to catch up.
        catch_up_timeout_ms: u64,
    },
    /// Remove node `id` (voter or learner) from the group.
    Remove {
        /// The node.
        id: u64,
    },
}

/// What the leader made of a [`MembershipChange`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipAnswer {
    /// The change is committed (or there was nothing to change): the group's voters now.
    Done {
        /// Voters, ascending.
        voters: Vec<u64>,
    },
    /// This node does not lead the group: the leader it knows of, if any.
    NotLeader {
        /// The leader.
        leader: Option<u64>,
    },
    /// Not done now, and worth trying again: another change in progress, a new node that has
    /// not caught up yet, a group stopping.
    Retry(String),
    /// Refused: trying again would not help.
    Refused(String),
}

/// Longest wait for one membership entry of openraft's to be committed (a majority is up: it
/// takes milliseconds).
const MEMBERSHIP_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a membership write may still be answered after this node's leadership moved.
const ANSWER_AFTER_DEPOSED: Duration = Duration::from_secs(3);

/// Run one of openraft's membership writes on this leader, within [`MEMBERSHIP_WRITE_TIMEOUT`];
/// `None` when it is not answered in time, or soon after this node stopped leading. openraft 0.9
/// keeps the answer channel by log index and may never answer an entry whose log a new leader
/// replaced (see the proposer's `deposed`): the change is then asked of the new leader, which
/// the idempotent changes allow.
async fn as_leader<C, T>(raft: &Raft<C>, write: impl Future<Output = T>) -> Option<T>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    let me = raft.metrics().borrow().id;
    let deposed = async {
        let moved = raft.wait(None).metrics(|m| m.current_leader != Some(me), "leadership moved").await;
        if moved.is_ok() {
            tokio::time::sleep(ANSWER_AFTER_DEPOSED).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        answer = write => Some(answer),
        () = deposed => None,
        () = tokio::time::sleep(MEMBERSHIP_WRITE_TIMEOUT) => None,
    }
}

/// The answer when a membership write of openraft's got none.
fn unanswered() -> MembershipAnswer {
    MembershipAnswer::Retry("the membership entry was not answered (the leadership moved, or no majority)".into())
}

/// Make `change` to `raft`'s group if this node leads it. Idempotent: adding a voter or removing
/// a node that is not a member is `Done` at once, so a change whose answer was lost is simply
/// asked again.
pub async fn change_here<C>(raft: &Raft<C>, change: &MembershipChange) -> MembershipAnswer
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Responder = OneshotResponder<C>>,
{
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(metrics.id) {
        return MembershipAnswer::NotLeader { leader: metrics.current_leader };
    }
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    match change {
        MembershipChange::Add { id, addr, catch_up_timeout_ms } => {
            match membership.get_node(id) {
                Some(node) if node.addr != *addr => {
                    return MembershipAnswer::Refused(format!("node {id} is already a member, at {}", node.addr));
                }
                Some(_) if voters.contains(id) => return done(raft),
                Some(_) => {}
                None => match as_leader(raft, raft.add_learner(*id, BasicNode::new(addr), false)).await {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return refusal(error),
                    None => return unanswered(),
                },
            }
            // Caught up: the learner holds everything the leader had when it was added (or found).
            let target = raft.metrics().borrow().last_log_index;
            let timeout = Duration::from_millis(*catch_up_timeout_ms);
            let caught_up = raft
                .wait(Some(timeout))
                .metrics(|m| matched(m, *id) >= target, "the new node caught up with the log")
                .await;
            if caught_up.is_err() {
                return MembershipAnswer::Retry(format!(
                    "node {id} (at {addr}) has not caught up with the group's log within {timeout:?}: is it \
                     running, reachable there, started with cluster.join and the cluster's core.shard_count?"
                ));
            }
            let promote = raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false);
            match as_leader(raft, promote).await {
                Some(Ok(_)) => done(raft),
                Some(Err(error)) => refusal(error),
                None => unanswered(),
            }
        }
        MembershipChange::Remove { id } => {
            let changes = if voters.contains(id) {
                if voters.len() == 1 {
                    return MembershipAnswer::Refused(format!("node {id} is the group's last voter"));
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
            } else if membership.get_node(id).is_some() {
                ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
            } else {
                return done(raft);
            };
            // `retain: false`: a removed voter does not stay on as a learner.
            match as_leader(raft, raft.change_membership(changes, false)).await {
                Some(Ok(_)) => done(raft),
                Some(Err(error)) => refusal(error),
                None => unanswered(),
            }
        }
    }
}

/// The log index node `id`'s replica is known (by this leader) to hold, if any.
pub(crate) fn matched(metrics: &RaftMetrics<u64, BasicNode>, id: u64) -> Option<u64> {
    let replication = metrics.replication.as_ref()?;
    replication.get(&id).copied().flatten().map(|log_id| log_id.index)
}

/// `Done` with the group's voters as this node sees them now.
fn done<C: RaftTypeConfig<NodeId = u64>>(raft: &Raft<C>) -> MembershipAnswer {
    MembershipAnswer::Done { voters: raft.metrics().borrow().membership_config.membership().voter_ids().collect() }
}

/// openraft's refusal of a membership change, as an answer.
fn refusal(error: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> MembershipAnswer {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            MembershipAnswer::NotLeader { leader: forward.leader_id }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(busy))) => {
            MembershipAnswer::Retry(busy.to_string())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(other)) => {
            MembershipAnswer::Refused(other.to_string())
        }
        RaftError::Fatal(fatal) => MembershipAnswer::Retry(format!("the group stopped: {fatal}")),
    }
}

impl std::fmt::Display for MembershipAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done { voters } => write!(f, "done, voters {voters:?}"),
            Self::NotLeader { leader: Some(leader) } => write!(f, "not the leader (node {leader} is)"),
            Self::NotLeader { leader: None } => write!(f, "no leader known"),
            Self::Retry(reason) => write!(f, "not now: {reason}"),
            Self::Refused(reason) => write!(f, "refused: {reason}"),
        }
    }
}

/// A step a voter takes in a leadership hand-over (carried as an
/// [`super::transport::RpcKind::Election`] RPC): openraft 0.9 has no leader transfer, so the
/// leader hands over by standing still (no heartbeats, no new entries) while the target stands
/// for election at once and the other voters hold back their own candidacies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ElectionStep {
    /// Stand for no election of one's own for `ms` (votes are still given).
    Pause {
        /// How long.
        ms: u64,
    },
    /// Stand for election now.
    ElectNow,
}

/// Take `step` in `raft`'s group; `Err` when the group has stopped.
pub async fn election_step<C>(raft: &Raft<C>, step: ElectionStep) -> Result<(), String>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    match step {
        ElectionStep::Pause { ms } => {
            raft.runtime_config().elect(false);
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                raft.runtime_config().elect(true);
            });
            Ok(())
        }
        ElectionStep::ElectNow => raft.trigger().elect().await.map_err(|fatal| fatal.to_string()),
    }
}
