//! Transactions: publishes and acknowledgements staged by a client and made durable all together
//! or not at all, across queues, partitions and shards. A transaction on one shard commits in one
//! Raft entry; one on several shards runs two-phase commit with the meta group as coordinator
//! (begin, prepare on every participant, a recorded decision, commit or abort on every
//! participant, forget). `resolve_in_doubt` finishes what a crash left prepared. Touches the
//! node's proposers and state readers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::proposer::{ReplyReceiver, now_ms, wait};
use super::{Core, Published};
use crate::catalogue::{MetaCommand, MetaReply, RoutedQueue};
use crate::error::{CoreError, CoreResult};
use crate::model::{Message, Position, TxnId};
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
        if txn.len() as u64 > u64::from(limits.txn_operations_max) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.txn_operations_max",
                value: txn.len() as u64,
                max: limits.txn_operations_max.into(),
            });
        }
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
                self.meta(MetaCommand::TxnBegin { txn: id, participants: shards, timeout_ms }).await?;
                if stop == TxnStop::AfterBegin {
                    return Ok(None);
                }
                let prepare_count = match stop {
                    TxnStop::AfterPrepared(count) => count.min(participants.len()),
                    _ => participants.len(),
                };
                let mut waits = Vec::new();
                for (shard, ops) in per_shard.into_iter().take(prepare_count) {
                    let command = ShardCommand::TxnPrepare { txn: id, ops };
                    let size = command.size_bytes();
                    waits.push(self.inner.shards[shard].proposer.submit(command, size));
                }
                let mut refusal = None;
                for rx in waits {
                    let reply = match rx {
                        Ok(rx) => wait(rx).await,
                        Err(error) => Err(error),
                    };
                    match reply {
                        Ok(ShardReply::TxnPrepared) => {}
                        Ok(ShardReply::Error(error)) | Err(error) => refusal = refusal.or(Some(error)),
                        Ok(other) => {
                            refusal = refusal.or(Some(CoreError::Internal(format!("prepare answered {other:?}"))))
                        }
                    }
                }
                if matches!(stop, TxnStop::AfterPrepared(_)) {
                    return Ok(None);
                }
                let commit = refusal.is_none();
                let decision = match self.meta(MetaCommand::TxnDecide { txn: id, commit }).await? {
                    MetaReply::TxnDecision(decision) => decision,
                    other => return Err(CoreError::Internal(format!("decision answered {other:?}"))),
                };
                if stop == TxnStop::AfterDecision {
                    return Ok(None);
                }
                let command =
                    |txn| if decision { ShardCommand::TxnCommit { txn } } else { ShardCommand::TxnAbort { txn } };
                let waits: Vec<(usize, ReplyReceiver<ShardReply>)> = participants
                    .iter()
                    .map(|&shard| Ok((shard, self.inner.shards[shard].proposer.submit(command(id), 64)?)))
                    .collect::<CoreResult<_>>()?;
                for (shard, rx) in waits {
                    if let ShardReply::TxnCommitted(result) = wait(rx).await? {
                        outcomes.insert(shard, result);
                    }
                }
                self.meta(MetaCommand::TxnForget { txn: id }).await?;
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

    /// Route the staged publishes and group everything per shard.
    fn stage(
        &self,
        publishes: Vec<(String, Message)>,
        acks: Vec<(ConsumerId, Position)>,
    ) -> CoreResult<(BTreeMap<usize, TxnOps>, Vec<RoutedPublish>)> {
        let mut per_shard: BTreeMap<usize, TxnOps> = BTreeMap::new();
        let mut routed = Vec::with_capacity(publishes.len());
        for (vhost, message) in publishes {
            self.check_message(&message)?;
            let route =
                self.with_catalogue(|c| c.route(&vhost, &message.exchange, &message.routing_key, &message.headers))?;
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
        let abandoned: Vec<TxnId> = self.with_catalogue(|c| {
            c.txns()
                .filter(|(t, r)| {
                    r.decision.is_none() && (r.deadline_ms <= now || (t.node == me.0 && t.incarnation < me.1))
                })
                .map(|(t, _)| *t)
                .collect()
        });
        for txn in abandoned {
            self.meta(MetaCommand::TxnDecide { txn, commit: false }).await?;
        }
        for (index, shard) in self.inner.shards.iter().enumerate() {
            if !self.leads(&shard.raft) {
                continue;
            }
            let prepared: Vec<(TxnId, u64)> =
                shard.reader.read(|s| s.prepared().map(|(txn, p)| (*txn, p.prepared_ms)).collect());
            for (txn, prepared_ms) in prepared {
                let orphan = txn.node == me.0 && txn.incarnation < me.1;
                if !orphan && now.saturating_sub(prepared_ms) < timeout_ms {
                    continue;
                }
                let record = self.with_catalogue(|c| c.txn(txn).cloned());
                let decision = match record.and_then(|r| r.decision) {
                    Some(decision) => decision,
                    None => match self.meta(MetaCommand::TxnDecide { txn, commit: false }).await? {
                        MetaReply::TxnDecision(decision) => decision,
                        other => return Err(CoreError::Internal(format!("decision answered {other:?}"))),
                    },
                };
                tracing::info!(%txn, shard = index, commit = decision, "resolving an in-doubt transaction");
                let command = if decision { ShardCommand::TxnCommit { txn } } else { ShardCommand::TxnAbort { txn } };
                shard.proposer.call(command, 64).await?;
            }
        }
        // A decided transaction that no participant holds any more is done everywhere.
        let decided: Vec<(TxnId, Vec<u32>)> = self.with_catalogue(|c| {
            c.txns().filter(|(_, r)| r.decision.is_some()).map(|(t, r)| (*t, r.participants.clone())).collect()
        });
        for (txn, participants) in decided {
            let held = participants.iter().any(|&shard| {
                self.inner
                    .shards
                    .get(shard as usize)
                    .is_none_or(|s| s.reader.read(|s| s.prepared().any(|(t, _)| *t == txn)))
            });
            if !held {
                self.meta(MetaCommand::TxnForget { txn }).await?;
            }
        }
        Ok(())
    }
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
