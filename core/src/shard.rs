//! The state of one shard Raft group: the queue partitions placed on it, and the commands that
//! change them. Deterministic (see [`crate::raft::ReplicatedState`]); touches only `queue` and
//! `model`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::model::{MessageRef, QueueArgs, QueueId, QueueName, TxnId};
use crate::queue::{
    AttachError, AttachRules, ConsumerId, DeadLetter, Delivery, Effect, Enqueued, Outcome, Partition, PartitionCaps,
};
use crate::raft::ReplicatedState;

/// A partition's address within a shard.
pub type PartitionKey = (QueueId, u32);

/// A publish staged in a transaction, for the partitions of one shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagedPublish {
    /// Partitions (on this shard) it goes to.
    pub targets: Vec<PartitionKey>,
    /// The message.
    pub message: MessageRef,
}

/// Acknowledgements staged in a transaction, for one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagedAck {
    /// The consumer (or `basic.get` holder) holding the deliveries.
    pub consumer: ConsumerId,
    /// Partition.
    pub target: PartitionKey,
    /// Offsets acknowledged.
    pub offsets: Vec<u64>,
}

/// A transaction's operations on one shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TxnOps {
    /// Publishes, in order.
    pub publishes: Vec<StagedPublish>,
    /// Acknowledgements.
    pub acks: Vec<StagedAck>,
}

impl TxnOps {
    /// Payload bytes carried (for batch limits).
    pub fn size_bytes(&self) -> u64 {
        self.publishes.iter().map(|p| p.message.size_bytes() + 12 * p.targets.len() as u64).sum::<u64>()
            + self.acks.iter().map(|a| 8 * a.offsets.len() as u64 + 32).sum::<u64>()
    }
}

/// A transaction prepared on this shard, waiting for its decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreparedTxn {
    /// What it will do when committed.
    pub ops: TxnOps,
    /// Committed time of the prepare.
    pub prepared_ms: u64,
}

/// A command applied by a shard group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Create a partition (idempotent: an existing one is kept and touched).
    CreatePartition {
        /// Queue.
        queue: QueueId,
        /// Partition number.
        partition: u32,
        /// The queue's name (for dead-letter headers).
        name: QueueName,
        /// The queue's arguments.
        args: QueueArgs,
        /// Capacity bounds.
        caps: PartitionCaps,
    },
    /// Delete a partition, its messages, and cancel its consumers.
    DeletePartition {
        /// Queue.
        queue: QueueId,
        /// Partition number.
        partition: u32,
    },
    /// Store one message in one or more partitions of this shard.
    Publish {
        /// The partitions it goes to.
        targets: Vec<PartitionKey>,
        /// The message.
        message: MessageRef,
    },
    /// Attach a consumer to a partition.
    Attach {
        /// Consumer.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// Prefetch, no-ack and credit, priority, exclusivity.
        rules: AttachRules,
    },
    /// Detach a consumer or `basic.get` holder: its unacked deliveries return.
    Detach {
        /// Consumer.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
    },
    /// Change a consumer's prefetch.
    SetPrefetch {
        /// Consumer.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// New prefetch.
        prefetch: u32,
    },
    /// Grant a no-ack or credit-limited consumer more credit.
    Credit {
        /// Consumer.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// Credit to add.
        credit: u32,
    },
    /// Settle deliveries.
    Settle {
        /// Consumer (or `basic.get` holder) holding them.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// Offsets.
        offsets: Vec<u64>,
        /// Outcome.
        outcome: Outcome,
    },
    /// `basic.get`.
    Get {
        /// Holder of the delivery until settled (ignored with `no_ack`).
        holder: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// Remove at once.
        no_ack: bool,
    },
    /// Remove every ready message.
    Purge {
        /// Partition.
        target: PartitionKey,
    },
    /// Advance time: delays, TTLs.
    Tick,
    /// A node (re)started with this incarnation: consumers of its earlier incarnations are gone.
    NodeUp {
        /// Node.
        node: u64,
        /// Its new incarnation.
        incarnation: u64,
    },
    /// These dead-lettered messages were republished: forget them.
    DeadLettered {
        /// Partition.
        target: PartitionKey,
        /// Offsets.
        offsets: Vec<u64>,
    },
    /// Phase one of a transaction: check that its operations can be done, record them (invisible
    /// to consumers) and lock the acknowledged deliveries. Fails as a whole, with the reason.
    TxnPrepare {
        /// Transaction.
        txn: TxnId,
        /// Its operations on this shard.
        ops: TxnOps,
    },
    /// Phase two, commit: do the prepared operations. A transaction not prepared here (already
    /// done) is a no-op, so the decision can be delivered more than once.
    TxnCommit {
        /// Transaction.
        txn: TxnId,
    },
    /// Phase two, abort: forget the prepared operations, give locked deliveries back.
    TxnAbort {
        /// Transaction.
        txn: TxnId,
    },
    /// A transaction whose operations all fall on this shard: prepare and commit in one entry.
    TxnAtomic {
        /// Transaction.
        txn: TxnId,
        /// Its operations.
        ops: TxnOps,
    },
    /// Stop a consumer without detaching it (AMQP `basic.cancel`): it receives nothing more and
    /// keeps the deliveries in `keep` (those its client has) until they are settled; whatever else
    /// it holds returns to the queue.
    Stop {
        /// Consumer.
        consumer: ConsumerId,
        /// Partition.
        target: PartitionKey,
        /// The deliveries it keeps: offset and delivery count.
        keep: Vec<(u64, u32)>,
    },
}

impl ShardCommand {
    /// Payload bytes the command carries (for batch size limits).
    pub fn size_bytes(&self) -> u64 {
        match self {
            Self::Publish { message, targets } => message.size_bytes() + 12 * targets.len() as u64,
            Self::Settle { offsets, .. } | Self::DeadLettered { offsets, .. } => 8 * offsets.len() as u64 + 32,
            Self::Stop { keep, .. } => 12 * keep.len() as u64 + 32,
            Self::TxnPrepare { ops, .. } | Self::TxnAtomic { ops, .. } => ops.size_bytes() + 64,
            _ => 64,
        }
    }
}

/// What became of a message offered to one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PublishOutcome {
    /// Stored at this offset.
    Stored(u64),
    /// Not stored: its idempotency key was committed before, at this offset.
    Duplicate(u64),
    /// Refused (overflow policy or capacity).
    Rejected,
    /// The partition does not exist (the queue was deleted meanwhile).
    NoPartition,
}

/// The reply to one [`ShardCommand`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShardReply {
    /// Done, nothing to report.
    Done,
    /// A partition was created (`false`: it existed).
    Created(bool),
    /// A partition was deleted with this many messages (`None`: it did not exist).
    Deleted(Option<u64>),
    /// Per target, in order.
    Published(Vec<PublishOutcome>),
    /// A consumer attached; `active` is false while another single active consumer serves.
    Attached {
        /// Whether it receives messages now.
        active: bool,
    },
    /// A consumer detached; consumers left on the partition.
    Detached {
        /// Whether it was attached.
        existed: bool,
        /// Pushing consumers left.
        consumers_left: u32,
    },
    /// Settled; offsets the consumer did not hold.
    Settled {
        /// Offsets not held.
        unknown: Vec<u64>,
    },
    /// `basic.get` result.
    Got(Option<Delivery>),
    /// Ready messages removed.
    Purged(u64),
    /// A transaction was prepared here.
    TxnPrepared,
    /// A transaction committed here: per staged publish, per target, what became of it.
    TxnCommitted(Vec<Vec<PublishOutcome>>),
    /// The command failed.
    Error(CoreError),
}

/// The state of one shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardState {
    partitions: BTreeMap<PartitionKey, Partition>,
    /// Transactions prepared here and not yet decided.
    prepared: BTreeMap<TxnId, PreparedTxn>,
}

fn no_partition(target: PartitionKey) -> CoreError {
    CoreError::NotFound(format!("no partition {} of queue {} on this shard", target.1, target.0))
}

impl ShardState {
    /// A partition, if placed here.
    pub fn partition(&self, key: PartitionKey) -> Option<&Partition> {
        self.partitions.get(&key)
    }

    /// Every partition.
    pub fn partitions(&self) -> impl Iterator<Item = (&PartitionKey, &Partition)> {
        self.partitions.iter()
    }

    /// The earliest time a tick would change something.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.partitions.values().filter_map(Partition::next_deadline_ms).min()
    }

    /// Dead-letter republishing still to be done (for a new leader).
    pub fn dead_lettering(&self) -> Vec<DeadLetter> {
        self.partitions.values().flat_map(Partition::dead_lettering).collect()
    }

    /// Transactions prepared here and waiting for their decision.
    pub fn prepared(&self) -> impl Iterator<Item = (&TxnId, &PreparedTxn)> {
        self.prepared.iter()
    }

    /// Why `ops` cannot be prepared now, if it cannot: an acknowledged delivery not held by its
    /// consumer (or locked by another transaction), or an idempotency key already committed or
    /// staged by another prepared transaction (or twice in this one).
    fn refuse(&self, ops: &TxnOps, now_ms: u64) -> Option<String> {
        for ack in &ops.acks {
            let Some(partition) = self.partitions.get(&ack.target) else {
                return Some(format!("no partition {} of queue {} for an acknowledgement", ack.target.1, ack.target.0));
            };
            let missing = partition.not_held(ack.consumer, &ack.offsets);
            if !missing.is_empty() {
                return Some(format!(
                    "unknown delivery tag: offsets {missing:?} of queue {} are not held by {}",
                    ack.target.0, ack.consumer
                ));
            }
        }
        let mut keys = std::collections::BTreeSet::new();
        for publish in &ops.publishes {
            let Some(key) = publish.message.idempotency_key.as_deref() else { continue };
            for target in &publish.targets {
                if !keys.insert((*target, key)) {
                    return Some(format!("idempotency key '{key}' appears twice in the transaction"));
                }
                if self.partitions.get(target).is_some_and(|p| p.has_key(key, now_ms)) {
                    return Some(format!("duplicate idempotency key '{key}': already committed to queue {}", target.0));
                }
                let staged = self.prepared.values().any(|t| {
                    t.ops
                        .publishes
                        .iter()
                        .any(|p| p.targets.contains(target) && p.message.idempotency_key.as_deref() == Some(key))
                });
                if staged {
                    return Some(format!("duplicate idempotency key '{key}': staged by another prepared transaction"));
                }
            }
        }
        None
    }

    fn lock_acks(&mut self, txn: TxnId, ops: &TxnOps) {
        for ack in &ops.acks {
            if let Some(partition) = self.partitions.get_mut(&ack.target) {
                partition.lock(txn, ack.consumer, &ack.offsets);
            }
        }
    }

    /// Do a transaction's operations: acknowledge its locked deliveries, store its publishes.
    fn commit_ops(&mut self, now_ms: u64, txn: TxnId, ops: TxnOps, effects: &mut Vec<Effect>) -> ShardReply {
        let targets: std::collections::BTreeSet<PartitionKey> = ops.acks.iter().map(|a| a.target).collect();
        for target in targets {
            if let Some(partition) = self.partitions.get_mut(&target) {
                partition.commit_locked(now_ms, txn, effects);
            }
        }
        let outcomes = ops
            .publishes
            .into_iter()
            .map(|publish| self.publish_to(now_ms, &publish.targets, &publish.message, effects))
            .collect();
        ShardReply::TxnCommitted(outcomes)
    }

    fn publish_to(
        &mut self,
        now_ms: u64,
        targets: &[PartitionKey],
        message: &MessageRef,
        effects: &mut Vec<Effect>,
    ) -> Vec<PublishOutcome> {
        targets
            .iter()
            .map(|target| match self.partitions.get_mut(target) {
                Some(partition) => match partition.publish(now_ms, message.clone(), effects) {
                    Enqueued::Stored(offset) => PublishOutcome::Stored(offset),
                    Enqueued::Duplicate(offset) => PublishOutcome::Duplicate(offset),
                    Enqueued::Rejected => PublishOutcome::Rejected,
                },
                None => PublishOutcome::NoPartition,
            })
            .collect()
    }

    /// Partitions whose queue's `x-expires` has passed.
    pub fn expired(&self, now_ms: u64) -> Vec<PartitionKey> {
        self.partitions.iter().filter(|(_, p)| p.expired(now_ms)).map(|(k, _)| *k).collect()
    }

    fn with<R>(
        &mut self,
        target: PartitionKey,
        f: impl FnOnce(&mut Partition) -> R,
        reply: impl FnOnce(R) -> ShardReply,
    ) -> ShardReply {
        match self.partitions.get_mut(&target) {
            Some(partition) => reply(f(partition)),
            None => ShardReply::Error(no_partition(target)),
        }
    }
}

impl ReplicatedState for ShardState {
    type Command = ShardCommand;
    type Reply = ShardReply;
    type Effect = Effect;

    fn apply(&mut self, now_ms: u64, command: ShardCommand, effects: &mut Vec<Effect>) -> ShardReply {
        match command {
            ShardCommand::CreatePartition { queue, partition, name, args, caps } => {
                let key = (queue, partition);
                if let Some(existing) = self.partitions.get_mut(&key) {
                    existing.touch(now_ms);
                    return ShardReply::Created(false);
                }
                self.partitions.insert(key, Partition::new(queue, partition, name, args, caps, now_ms));
                ShardReply::Created(true)
            }
            ShardCommand::DeletePartition { queue, partition } => match self.partitions.remove(&(queue, partition)) {
                Some(mut removed) => {
                    removed.cancel_all(effects);
                    ShardReply::Deleted(Some(removed.len()))
                }
                None => ShardReply::Deleted(None),
            },
            ShardCommand::Publish { targets, message } => {
                ShardReply::Published(self.publish_to(now_ms, &targets, &message, effects))
            }
            ShardCommand::TxnPrepare { txn, ops } => {
                if self.prepared.contains_key(&txn) {
                    // Delivered twice (a retried prepare): the first one counts.
                    return ShardReply::TxnPrepared;
                }
                if let Some(reason) = self.refuse(&ops, now_ms) {
                    return ShardReply::Error(CoreError::PreconditionFailed(format!("{txn} cannot prepare: {reason}")));
                }
                self.lock_acks(txn, &ops);
                self.prepared.insert(txn, PreparedTxn { ops, prepared_ms: now_ms });
                ShardReply::TxnPrepared
            }
            ShardCommand::TxnCommit { txn } => match self.prepared.remove(&txn) {
                Some(prepared) => self.commit_ops(now_ms, txn, prepared.ops, effects),
                None => ShardReply::TxnCommitted(Vec::new()),
            },
            ShardCommand::TxnAbort { txn } => {
                if let Some(prepared) = self.prepared.remove(&txn) {
                    let targets: std::collections::BTreeSet<PartitionKey> =
                        prepared.ops.acks.iter().map(|a| a.target).collect();
                    for target in targets {
                        if let Some(partition) = self.partitions.get_mut(&target) {
                            partition.abort_locked(now_ms, txn, effects);
                        }
                    }
                }
                ShardReply::Done
            }
            ShardCommand::TxnAtomic { txn, ops } => {
                if let Some(reason) = self.refuse(&ops, now_ms) {
                    return ShardReply::Error(CoreError::PreconditionFailed(format!("{txn} cannot commit: {reason}")));
                }
                self.lock_acks(txn, &ops);
                self.commit_ops(now_ms, txn, ops, effects)
            }
            ShardCommand::Attach { consumer, target, rules } => self.with(
                target,
                |p| {
                    let attached = p.attach_with(now_ms, consumer, rules, effects);
                    attached.map(|()| p.is_active(consumer)).map_err(|error| (error, p.queue_name().clone()))
                },
                |result| match result {
                    Ok(active) => ShardReply::Attached { active },
                    Err((AttachError::Duplicate, _)) => ShardReply::Error(CoreError::PreconditionFailed(format!(
                        "consumer {consumer} is already attached"
                    ))),
                    Err((AttachError::TooMany(max), _)) => ShardReply::Error(CoreError::LimitExceeded {
                        limit: "limits.consumers_per_queue_max",
                        value: u64::from(max) + 1,
                        max: max.into(),
                    }),
                    // RabbitMQ's text, naming the queue.
                    Err((AttachError::ExclusiveInUse, name)) => ShardReply::Error(CoreError::AccessRefused(format!(
                        "queue '{}' in vhost '{}' in exclusive use",
                        name.name, name.vhost
                    ))),
                },
            ),
            ShardCommand::Detach { consumer, target } => match self.partitions.get_mut(&target) {
                Some(p) => {
                    let existed = p.detach(now_ms, consumer, effects);
                    ShardReply::Detached { existed, consumers_left: p.consumer_count() }
                }
                // Detaching from a deleted queue is not an error: the consumer is gone either way.
                None => ShardReply::Detached { existed: false, consumers_left: 0 },
            },
            ShardCommand::Stop { consumer, target, keep } => match self.partitions.get_mut(&target) {
                Some(p) => {
                    let existed = p.stop(now_ms, consumer, &keep, effects);
                    ShardReply::Detached { existed, consumers_left: p.consumer_count() }
                }
                None => ShardReply::Detached { existed: false, consumers_left: 0 },
            },
            ShardCommand::SetPrefetch { consumer, target, prefetch } => {
                self.with(target, |p| p.set_prefetch(now_ms, consumer, prefetch, effects), |_| ShardReply::Done)
            }
            ShardCommand::Credit { consumer, target, credit } => {
                self.with(target, |p| p.add_credit(now_ms, consumer, credit, effects), |_| ShardReply::Done)
            }
            ShardCommand::Settle { consumer, target, offsets, outcome } => self.with(
                target,
                |p| p.settle(now_ms, consumer, &offsets, outcome, effects),
                |unknown| ShardReply::Settled { unknown },
            ),
            ShardCommand::Get { holder, target, no_ack } => {
                self.with(target, |p| p.get(now_ms, holder, no_ack, effects), ShardReply::Got)
            }
            ShardCommand::Purge { target } => self.with(target, Partition::purge, ShardReply::Purged),
            ShardCommand::Tick => {
                for partition in self.partitions.values_mut() {
                    partition.tick(now_ms, effects);
                }
                ShardReply::Done
            }
            ShardCommand::NodeUp { node, incarnation } => {
                for partition in self.partitions.values_mut() {
                    for consumer in partition.stale_consumers(node, incarnation) {
                        partition.detach(now_ms, consumer, effects);
                    }
                }
                ShardReply::Done
            }
            ShardCommand::DeadLettered { target, offsets } => {
                if let Some(p) = self.partitions.get_mut(&target) {
                    p.dead_lettered(&offsets);
                }
                ShardReply::Done
            }
        }
    }
}
