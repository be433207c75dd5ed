//! Transactions: publishes and acknowledgements staged by a client and made durable all together
//! or not at all, across queues, partitions and shards. A transaction on one shard commits in one
//! Raft entry; one on several shards runs two-phase commit with the meta group as coordinator
//! (begin, prepare on every participant, a recorded decision, commit or abort on every
//! participant, forget). `resolve_in_doubt` finishes what a crash left prepared. Touches the
//! node's proposers and state readers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::proposer::now_ms;
use super::{Core, Published};
use crate::catalogue::{HalfSpec, MetaCommand, MetaReply, RoutedQueue};
use crate::error::{CoreError, CoreResult};
use crate::model::{Message, MessageRef, Position, TxnId};
use crate::placement::partition_for;
use crate::queue::ConsumerId;
use crate::shard::{PartitionKey, PublishOutcome, ShardCommand, ShardReply, StagedAck, StagedPublish, TxnOps};

/// A transaction being built. Nothing is sent before [`Core::commit_txn`]; dropping it (or
/// [`Txn::rollback`]) discards it, as AMQP's `tx.rollback` does.
#[derive(Debug)]
pub struct Txn {
    id: TxnId,
    publishes: Vec<(String, Message)>,
    acks: Vec<(ConsumerId, Position)>,
}

impl Txn {
    /// Its id.
    pub fn id(&self) -> TxnId {
        self.id
    }

    /// Stage a publish.
    pub fn publish(&mut self, vhost: &str, message: Message) {
        self.publishes.push((vhost.to_owned(), message));
    }

    /// Stage the acknowledgement of deliveries held by `consumer` (a consumer or `basic.get`
    /// holder).
    pub fn ack(&mut self, consumer: ConsumerId, positions: &[Position]) {
        self.acks.extend(positions.iter().map(|p| (consumer, *p)));
    }

    /// Publishes staged (the index the next one will have among them).
    pub fn publish_count(&self) -> usize {
        self.publishes.len()
    }

    /// Operations staged.
    pub fn len(&self) -> usize {
        self.publishes.len() + self.acks.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Discard everything staged.
    pub fn rollback(&mut self) {
        self.publishes.clear();
        self.acks.clear();
    }
}

/// A committed transaction: what became of each staged publish, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnCommitted {
    /// One per staged publish.
    pub published: Vec<Published>,
}

/// A transaction prepared on every participant ([`Core::prepare_txn`]), waiting for the decision
/// of [`Core::finish_txn`].
pub struct PreparedTxn {
    id: TxnId,
    participants: Vec<usize>,
    routed: Vec<RoutedPublish>,
    timeout_ms: u64,
    checked_back: bool,
}

impl PreparedTxn {
    /// Its id.
    pub fn id(&self) -> TxnId {
        self.id
    }

    /// How long the broker waits for the decision before it rolls the transaction back
    /// (`limits.txn_timeout_ms`, or `limits.half_message_age_max_ms` with a check-back group).
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
}

impl std::fmt::Debug for PreparedTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedTxn")
            .field("id", &self.id)
            .field("participants", &self.participants)
            .field("publishes", &self.routed.len())
            .field("checked_back", &self.checked_back)
            .finish()
    }
}

/// A check-back question: a half message's producer stayed silent, and the broker asks its group
/// whether the producer's local transaction committed.
#[derive(Debug)]
pub struct CheckBack {
    /// The half message's transaction.
    pub txn: TxnId,
    /// The half message (as published).
    pub message: Option<MessageRef>,
    /// The answer: commit (`Some(true)`), roll back (`Some(false)`), or not known yet (`None`:
    /// asked again after `limits.half_message_check_interval_ms`).
    pub reply: oneshot::Sender<Option<bool>>,
}

/// Check-back questions waiting for a group's handler before new ones are refused.
const CHECK_BACK_QUEUE_MAX: usize = 1_024;
/// How long the resolver waits for a check-back answer.
const CHECK_BACK_ANSWER_SECS: u64 = 10;

/// Where [`Core::commit_txn_until`] stops: the points at which a crash leaves a transaction in
/// doubt. For crash tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStop {
    /// Run to the end.
    Never,
    /// After the coordinator recorded the start, before any prepare.
    AfterBegin,
    /// After this many participants prepared.
    AfterPrepared(usize),
    /// After the decision was recorded, before any participant applied it.
    AfterDecision,
}

/// One staged publish, routed: which shard carries it at which index of that shard's publishes.
struct RoutedPublish {
    queues: Vec<RoutedQueue>,
    parts: Vec<PublishPart>,
}

/// The part of a staged publish carried by one shard.
struct PublishPart {
    shard: usize,
    /// Index among that shard's staged publishes.
    at: usize,
    /// The routed queue index and partition of each of its targets, in order.
    targets: Vec<(usize, PartitionKey)>,
}

impl Core {
    /// Start a transaction.
    pub fn begin_txn(&self) -> Txn {
        let id = TxnId {
            node: self.inner.config.node_id,
            incarnation: self.inner.incarnation,
            seq: self.inner.txn_seq.fetch_add(1, Ordering::Relaxed),
        };
        Txn { id, publishes: Vec::new(), acks: Vec::new() }
    }

    /// Commit a transaction: every staged publish is stored and every staged acknowledgement done,
    /// or none. Fails as a whole, with the reason, if an acknowledged delivery is not held by its
    /// consumer, if an idempotency key was committed already, or if the decision did not come
    /// within `limits.txn_timeout_ms`.
    pub async fn commit_txn(&self, txn: Txn) -> CoreResult<TxnCommitted> {
        self.commit_txn_until(txn, TxnStop::Never)
            .await?
            .ok_or_else(|| CoreError::Internal("a transaction run to the end stopped early".into()))
    }

    /// [`Core::commit_txn`], stopping at `stop` (then `None`) as a crash there would: for crash tests.
    #[doc(hidden)]
    pub async fn commit_txn_until(&self, txn: Txn, stop: TxnStop) -> CoreResult<Option<TxnCommitted>> {
        self.check_open()?;
        let limits = &self.inner.config.limits;
        check_txn_len(&txn, limits.txn_operations_max)?;
        let (per_shard, routed) = self.stage(txn.publishes, txn.acks)?;
        let id = txn.id;
        let participants: Vec<usize> = per_shard.keys().copied().collect();
        let mut outcomes: BTreeMap<usize, Vec<Vec<PublishOutcome>>> = BTreeMap::new();
        match participants.as_slice() {
            [] => {}
            [shard] => {
                // One shard: prepare and commit are one entry, no coordinator needed.
                let ops = per_shard.into_values().next().unwrap_or_default();
                let command = ShardCommand::TxnAtomic { txn: id, ops };
                let size = command.size_bytes();
                match self.inner.shards[*shard].proposer.call(command, size).await? {
                    ShardReply::TxnCommitted(result) => {
                        outcomes.insert(*shard, result);
                    }
                    ShardReply::Error(error) => return Err(error),
                    other => return Err(CoreError::Internal(format!("atomic commit answered {other:?}"))),
                }
            }
            _ => {
                let shards = participants.iter().map(|s| *s as u32).collect();
                let timeout_ms = limits.txn_timeout_ms;
                self.meta(MetaCommand::TxnBegin { txn: id, participants: shards, timeout_ms, half: None }).await?;
                if stop == TxnStop::AfterBegin {
                    return Ok(None);
                }
                let prepare_count = match stop {
                    TxnStop::AfterPrepared(count) => count.min(participants.len()),
                    _ => participants.len(),
                };
                let refusal = self.prepare_all(id, per_shard.into_iter().take(prepare_count)).await;
                if matches!(stop, TxnStop::AfterPrepared(_)) {
                    return Ok(None);
                }
                let commit = refusal.is_none();
                let decision = self.decide(id, commit).await?;
                tracing::debug!(txn = %id, commit, decision, refusal = ?refusal, "transaction decided");
                if stop == TxnStop::AfterDecision {
                    return Ok(None);
                }
                outcomes = self.apply_decision(id, &participants, decision).await?;
                if !decision {
                    return Err(refusal.unwrap_or_else(|| {
                        CoreError::PreconditionFailed(format!(
                            "{id} aborted: no decision within limits.txn_timeout_ms ({timeout_ms} ms)"
                        ))
                    }));
                }
            }
        }
        Ok(Some(assemble(routed, &outcomes)))
    }

    /// Ask the coordinator to record `commit` (or abort) for `txn`: the decision in force, which
    /// is the first one recorded (and abort past the deadline, or for a forgotten transaction).
    async fn decide(&self, txn: TxnId, commit: bool) -> CoreResult<bool> {
        match self.meta(MetaCommand::TxnDecide { txn, commit }).await? {
            MetaReply::TxnDecision(decision) => Ok(decision),
            other => Err(CoreError::Internal(format!("decision answered {other:?}"))),
        }
    }

    /// Send a recorded decision to every participant, then let the coordinator forget the
    /// transaction. Returns the participants' publish outcomes (on commit).
    async fn apply_decision(
        &self,
        txn: TxnId,
        participants: &[usize],
        decision: bool,
    ) -> CoreResult<BTreeMap<usize, Vec<Vec<PublishOutcome>>>> {
        let command = || if decision { ShardCommand::TxnCommit { txn } } else { ShardCommand::TxnAbort { txn } };
        let shards: Vec<usize> =
            participants.iter().copied().filter(|&shard| shard < self.inner.shards.len()).collect();
        let replies = self.on_shards(shards.iter().map(|&shard| (shard, command()))).await?;
        let mut outcomes = BTreeMap::new();
        for (shard, reply) in shards.into_iter().zip(replies) {
            if let ShardReply::TxnCommitted(result) = reply {
                outcomes.insert(shard, result);
            }
        }
        self.meta(MetaCommand::TxnForget { txn }).await?;
        Ok(outcomes)
    }

    /// Prepare a transaction on these participants, in parallel; the first refusal, if any.
    async fn prepare_all(&self, txn: TxnId, per_shard: impl IntoIterator<Item = (usize, TxnOps)>) -> Option<CoreError> {
        // A refusal, or a prepare that could not even be queued: either way the caller aborts, and
        // its abort is queued behind any prepare already sent.
        let replies = match self
            .on_shards(per_shard.into_iter().map(|(shard, ops)| (shard, ShardCommand::TxnPrepare { txn, ops })))
            .await
        {
            Ok(replies) => replies,
            Err(error) => return Some(error),
        };
        replies.into_iter().find_map(|reply| match reply {
            ShardReply::TxnPrepared => None,
            ShardReply::Error(error) => Some(error),
            other => Some(CoreError::Internal(format!("prepare answered {other:?}"))),
        })
    }

    /// Prepare a transaction (the first phase of two-phase commit) and leave its decision to the
    /// caller ([`Core::finish_txn`]): every participant durably records the staged operations,
    /// invisible to consumers, and locks the acknowledged deliveries. With a `check_back_group` it
    /// is a half message: if its producer stays silent the broker asks that group every
    /// `limits.half_message_check_interval_ms` (through [`Core::register_check_back`]) and rolls
    /// it back once older than `limits.half_message_age_max_ms`. Without one it is aborted once
    /// older than `limits.txn_timeout_ms`. A refusal by any participant aborts it at once.
    pub async fn prepare_txn(&self, txn: Txn, check_back_group: Option<&str>) -> CoreResult<PreparedTxn> {
        self.check_open()?;
        let limits = &self.inner.config.limits;
        check_txn_len(&txn, limits.txn_operations_max)?;
        let id = txn.id;
        let (per_shard, routed) = self.stage(txn.publishes, txn.acks)?;
        let participants: Vec<usize> = per_shard.keys().copied().collect();
        let (timeout_ms, half) = match check_back_group {
            Some(group) => (
                limits.half_message_age_max_ms,
                Some(HalfSpec { group: group.to_owned(), check_interval_ms: limits.half_message_check_interval_ms }),
            ),
            None => (limits.txn_timeout_ms, None),
        };
        let checked_back = half.is_some();
        if !participants.is_empty() {
            let shards = participants.iter().map(|s| *s as u32).collect();
            self.meta(MetaCommand::TxnBegin { txn: id, participants: shards, timeout_ms, half }).await?;
            if let Some(error) = self.prepare_all(id, per_shard).await {
                self.decide(id, false).await?;
                self.apply_decision(id, &participants, false).await?;
                return Err(error);
            }
        }
        tracing::debug!(txn = %id, participants = participants.len(), checked_back, "transaction prepared");
        Ok(PreparedTxn { id, participants, routed, timeout_ms, checked_back })
    }

    /// Decide a transaction prepared by [`Core::prepare_txn`]: commit (`Some` with what each
    /// staged publish became) or roll back (`None`). The decision in force wins: a transaction
    /// past its deadline is rolled back whatever is asked. A half message may have been decided
    /// by a check-back answer meanwhile; if that decision was carried out and forgotten already,
    /// this fails with `NotFound`, since the outcome is no longer known here.
    pub async fn finish_txn(&self, prepared: PreparedTxn, commit: bool) -> CoreResult<Option<TxnCommitted>> {
        self.check_open()?;
        let PreparedTxn { id, participants, routed, checked_back, .. } = prepared;
        if participants.is_empty() {
            return Ok(commit.then(|| assemble(routed, &BTreeMap::new())));
        }
        if checked_back && self.with_catalogue(|c| c.txn(id).is_none()) {
            return Err(CoreError::NotFound(format!(
                "{id} is no longer pending: a check-back answer or its age limit decided it"
            )));
        }
        let decision = self.decide(id, commit).await?;
        let outcomes = self.apply_decision(id, &participants, decision).await?;
        tracing::debug!(txn = %id, commit = decision, "prepared transaction finished");
        Ok(decision.then(|| assemble(routed, &outcomes)))
    }

    /// A half message (RocketMQ's transactional message): one publish prepared on its queues now,
    /// invisible to consumers, until its producer ends it with [`Core::end_half`] after running
    /// its own local transaction ([`Core::prepare_txn`] with a check-back group).
    pub async fn prepare_half(&self, vhost: &str, message: Message, group: &str) -> CoreResult<TxnId> {
        let mut txn = self.begin_txn();
        txn.publish(vhost, message);
        let prepared = self.prepare_txn(txn, Some(group)).await?;
        if prepared.participants.is_empty() {
            return Err(CoreError::PreconditionFailed(format!("half message {} routes to no queue", prepared.id)));
        }
        tracing::info!(txn = %prepared.id, group, "half message prepared");
        Ok(prepared.id)
    }

    /// End a half message: commit makes it visible, roll back discards it. Returns the decision in
    /// force, which is a rollback if the message was already rolled back (too old).
    pub async fn end_half(&self, txn: TxnId, commit: bool) -> CoreResult<bool> {
        self.check_open()?;
        let Some(record) = self.with_catalogue(|c| c.txn(txn).cloned()) else {
            return Err(CoreError::NotFound(format!("no pending half message {txn}")));
        };
        let decision = self.decide(txn, commit).await?;
        let participants: Vec<usize> = record.participants.iter().map(|s| *s as usize).collect();
        self.apply_decision(txn, &participants, decision).await?;
        tracing::info!(%txn, commit = decision, "half message ended");
        Ok(decision)
    }

    /// Handle check-backs for a producer group on this node: the returned stream receives a
    /// [`CheckBack`] for each undecided half message of the group that is due. Registering again
    /// replaces the previous handler.
    pub fn register_check_back(&self, group: &str) -> mpsc::Receiver<CheckBack> {
        let (tx, rx) = mpsc::channel(CHECK_BACK_QUEUE_MAX);
        self.inner.check_backs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(group.to_owned(), tx);
        rx
    }

    /// Ask the producers of due half messages (recording each check-back in the coordinator).
    async fn check_back_due(&self, now: u64) -> CoreResult<()> {
        let due: Vec<(TxnId, String, Vec<u32>)> = self.with_catalogue(|c| {
            c.txns()
                .filter_map(|(t, r)| {
                    let half = r.half.as_ref()?;
                    (r.decision.is_none() && half.next_check_ms <= now && r.deadline_ms > now)
                        .then(|| (*t, half.group.clone(), r.participants.clone()))
                })
                .collect()
        });
        for (txn, group, participants) in due {
            // Recorded first, so that the next tick does not ask again meanwhile.
            self.meta(MetaCommand::TxnChecked { txn }).await?;
            let handler =
                self.inner.check_backs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&group).cloned();
            let Some(handler) = handler else {
                tracing::info!(%txn, group, "half message due for check-back, but no handler for its group here");
                continue;
            };
            let message = participants.iter().find_map(|&shard| {
                self.inner.shards.get(shard as usize)?.reader.read(|s| {
                    s.prepared().find(|(t, _)| **t == txn).and_then(|(_, p)| {
                        p.ops.publishes.first().map(|publish| std::sync::Arc::clone(&publish.message))
                    })
                })
            });
            let (reply, answer) = oneshot::channel();
            if handler.try_send(CheckBack { txn, message, reply }).is_err() {
                tracing::warn!(%txn, group, "check-back handler full or gone");
                continue;
            }
            let core = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(CHECK_BACK_ANSWER_SECS), answer).await {
                    Ok(Ok(Some(commit))) => {
                        tracing::info!(%txn, commit, "check-back answered");
                        if let Err(error) = core.end_half(txn, commit).await {
                            tracing::warn!(%txn, %error, "applying a check-back answer failed");
                        }
                    }
                    _ => tracing::info!(%txn, "check-back: outcome not known yet"),
                }
            });
        }
        Ok(())
    }

    /// Route the staged publishes and group everything per shard.
    fn stage(
        &self,
        publishes: Vec<(String, Message)>,
        acks: Vec<(ConsumerId, Position)>,
    ) -> CoreResult<(BTreeMap<usize, TxnOps>, Vec<RoutedPublish>)> {
        let mut per_shard: BTreeMap<usize, TxnOps> = BTreeMap::new();
        let mut routed = Vec::with_capacity(publishes.len());
        for (vhost, mut message) in publishes {
            let route = self.route_message(&vhost, &mut message)?;
            let key = message.partition_key.as_deref().unwrap_or(&message.routing_key);
            let mut by_shard: BTreeMap<usize, Vec<(usize, PartitionKey)>> = BTreeMap::new();
            for (index, queue) in route.queues.iter().enumerate() {
                let target = (queue.id, partition_for(key, queue.partitions));
                by_shard.entry(self.shard_index(target)).or_default().push((index, target));
            }
            let message = std::sync::Arc::new(message);
            let mut parts = Vec::new();
            for (shard, indexes) in by_shard {
                let ops = per_shard.entry(shard).or_default();
                let targets = indexes.iter().map(|(_, target)| *target).collect();
                parts.push(PublishPart { shard, at: ops.publishes.len(), targets: indexes });
                ops.publishes.push(StagedPublish { targets, message: std::sync::Arc::clone(&message) });
            }
            routed.push(RoutedPublish { queues: route.queues, parts });
        }
        let mut grouped: BTreeMap<(ConsumerId, PartitionKey), Vec<u64>> = BTreeMap::new();
        for (consumer, position) in acks {
            grouped.entry((consumer, (position.queue, position.partition))).or_default().push(position.offset);
        }
        for ((consumer, target), offsets) in grouped {
            per_shard.entry(self.shard_index(target)).or_default().acks.push(StagedAck { consumer, target, offsets });
        }
        Ok((per_shard, routed))
    }

    /// Finish transactions a crash left prepared on this node's shards. A transaction whose
    /// coordinator was an earlier run of this node is resolved at once (nobody else will); others
    /// once they are older than `limits.txn_timeout_ms` (their coordinator had its chance). The
    /// recorded decision is applied; without one, abort is decided (after the deadline, the only
    /// decision the coordinator accepts). Decided records no participant still holds are forgotten.
    pub(crate) async fn resolve_in_doubt(&self) -> CoreResult<()> {
        let now = now_ms();
        let timeout_ms = self.inner.config.limits.txn_timeout_ms;
        let me = (self.inner.config.node_id, self.inner.incarnation);
        // Undecided records whose coordinator is gone (an earlier run of this node) or whose
        // deadline passed: decide abort, the only decision left (the first recorded one wins).
        // (Not the orphan rule for half messages: their producer decides, not their coordinator.)
        let abandoned: Vec<TxnId> = self.with_catalogue(|c| {
            c.txns()
                .filter(|(t, r)| {
                    r.decision.is_none()
                        && (r.deadline_ms <= now || (r.half.is_none() && t.node == me.0 && t.incarnation < me.1))
                })
                .map(|(t, _)| *t)
                .collect()
        });
        for &txn in &abandoned {
            self.decide(txn, false).await?;
        }
        for (index, shard) in self.inner.shards.iter().enumerate() {
            if !self.leads(&shard.raft) {
                continue;
            }
            let prepared: Vec<(TxnId, u64)> =
                shard.reader.read(|s| s.prepared().map(|(txn, p)| (*txn, p.prepared_ms)).collect());
            for (txn, prepared_ms) in prepared {
                let record = self.with_catalogue(|c| c.txn(txn).cloned());
                if record.as_ref().is_some_and(|r| r.half.is_some() && r.decision.is_none()) {
                    // A pending half message: its producer decides (check-back asks it), and its
                    // age limit was applied above.
                    continue;
                }
                // Applied at once: a decision this pass made, a decided half message (no live
                // coordinator waits on its outcomes), or an orphan's. Otherwise the live
                // coordinator applies its own decision; step in only once it is overdue.
                let orphan = txn.node == me.0 && txn.incarnation < me.1;
                let ours = abandoned.contains(&txn) || record.as_ref().is_some_and(|r| r.half.is_some());
                if !orphan && !ours && now.saturating_sub(prepared_ms) < timeout_ms {
                    continue;
                }
                let decision = match record.and_then(|r| r.decision) {
                    Some(decision) => decision,
                    None => self.decide(txn, false).await?,
                };
                tracing::info!(%txn, shard = index, commit = decision, "resolving an in-doubt transaction");
                let command = if decision { ShardCommand::TxnCommit { txn } } else { ShardCommand::TxnAbort { txn } };
                shard.proposer.call(command, 64).await?;
            }
        }
        self.check_back_due(now).await?;
        // A decided transaction that no participant holds any more is done everywhere. The
        // participants are read on this node's replicas, which in a cluster may be behind their
        // leaders: a replica that has not applied the prepare yet would make a committed
        // transaction look done, and forgetting it would have its participants abort it. So
        // before one that looks done is forgotten, its participants' replicas catch up with their
        // leaders (a read barrier) and are read again. A commit is decided only after every
        // prepare was applied, so a caught-up replica that holds nothing has applied the decision
        // too; an abort forgotten early is still an abort.
        let held = |txn: TxnId, participants: &[u32]| {
            participants.iter().any(|&shard| {
                self.inner
                    .shards
                    .get(shard as usize)
                    .is_none_or(|s| s.reader.read(|s| s.prepared().any(|(t, _)| *t == txn)))
            })
        };
        let mut done: Vec<(TxnId, Vec<u32>)> = self.with_catalogue(|c| {
            c.txns().filter(|(_, r)| r.decision.is_some()).map(|(t, r)| (*t, r.participants.clone())).collect()
        });
        done.retain(|(txn, participants)| !held(*txn, participants));
        let participants: std::collections::BTreeSet<u32> =
            done.iter().flat_map(|(_, participants)| participants.iter().copied()).collect();
        for shard in participants {
            self.catch_up_shard(shard as usize).await?;
        }
        for (txn, participants) in done {
            if !held(txn, &participants) {
                self.meta(MetaCommand::TxnForget { txn }).await?;
            }
        }
        Ok(())
    }
}

/// Refuse a transaction staging more than `limits.txn_operations_max` operations.
fn check_txn_len(txn: &Txn, operations_max: u32) -> CoreResult<()> {
    if txn.len() as u64 > u64::from(operations_max) {
        return Err(CoreError::LimitExceeded {
            limit: "limits.txn_operations_max",
            value: txn.len() as u64,
            max: operations_max.into(),
        });
    }
    Ok(())
}

/// Put each staged publish's outcome together from the shards' replies.
fn assemble(routed: Vec<RoutedPublish>, outcomes: &BTreeMap<usize, Vec<Vec<PublishOutcome>>>) -> TxnCommitted {
    let published = routed
        .into_iter()
        .map(|publish| {
            let mut result = Published { routed: publish.queues.len(), ..Published::default() };
            for part in publish.parts {
                let Some(targets) = outcomes.get(&part.shard).and_then(|o| o.get(part.at)) else { continue };
                for ((index, target), outcome) in part.targets.into_iter().zip(targets) {
                    let at = |offset| Position { queue: target.0, partition: target.1, offset };
                    match *outcome {
                        PublishOutcome::Stored(offset) => result.positions.push(at(offset)),
                        PublishOutcome::Duplicate(offset) => result.duplicates.push(at(offset)),
                        PublishOutcome::Rejected => result.rejected.push(publish.queues[index].name.clone()),
                        PublishOutcome::NoPartition => {}
                    }
                }
            }
            result
        })
        .collect();
    TxnCommitted { published }
}
