//! Local consumers: the registry that routes delivery effects from shard state machines to the
//! consumers attached on this node, and the `Consumer` handle a front-end reads deliveries from.
//! Touches the node's proposers (attach, detach, credit) and nothing else.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::error::CoreResult;
use crate::model::{Position, QueueName};
use crate::queue::{ConsumerId, Delivery};
use crate::shard::{PartitionKey, ShardCommand, ShardReply};

use super::Core;

/// Something that happens to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerEvent {
    /// A message for it.
    Delivery(Delivery),
    /// The broker cancelled it (its queue was deleted): AMQP's consumer cancel notification.
    Cancelled,
}

/// How to consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumeOptions {
    /// Unacked deliveries allowed per partition (0: `limits.consumer_inflight_max`).
    pub prefetch: u32,
    /// Deliveries are settled when sent (AMQP `no-ack`, MQTT QoS 0).
    pub no_ack: bool,
    /// Consumer priority (AMQP `x-priority`): higher ones are served first.
    pub priority: i32,
    /// No other consumer may attach to the queue while this one is (AMQP exclusive consume);
    /// refused with `AccessRefused` when others are attached.
    pub exclusive: bool,
    /// Explicit credit: each partition delivers at most this many messages (in either mode, on
    /// top of the prefetch) until [`Core::grant_credit`] grants more, so that a consumer holds
    /// nothing it was not granted (the native API's flow control). `None`: no-ack consumers are
    /// granted credit automatically as they read, ack-mode ones are bounded by prefetch alone.
    pub credit: Option<u32>,
}

/// Where deliveries of locally attached consumers go. Apply runs on the Raft state machine task,
/// so sending never blocks: the channel is unbounded, and its length is bounded by prefetch (ack
/// mode) or granted credit (no-ack mode), both enforced by the state machine.
///
/// Events travel boxed: an unbounded channel allocates room for 32 of its items when it is
/// made, and every consumer (every MQTT session, idle or not) has one.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    consumers: Mutex<HashMap<ConsumerId, EventSender>>,
}

type EventSender = mpsc::UnboundedSender<Box<ConsumerEvent>>;
pub(crate) type EventReceiver = mpsc::UnboundedReceiver<Box<ConsumerEvent>>;

impl Registry {
    pub(crate) fn register(&self, id: ConsumerId) -> EventReceiver {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(id, tx);
        rx
    }

    pub(crate) fn unregister(&self, id: ConsumerId) {
        self.lock().remove(&id);
    }

    /// Hand a delivery to its consumer. A delivery for a consumer that is not here (replayed after
    /// a restart, or already gone) is dropped: the state machine still holds the message, and it
    /// returns to the queue when that consumer is detached.
    pub(crate) fn deliver(&self, delivery: Delivery) {
        let consumers = self.lock();
        if let Some(tx) = consumers.get(&delivery.consumer) {
            let _ = tx.send(Box::new(ConsumerEvent::Delivery(delivery)));
        }
    }

    pub(crate) fn cancelled(&self, id: ConsumerId) {
        if let Some(tx) = self.lock().remove(&id) {
            let _ = tx.send(Box::new(ConsumerEvent::Cancelled));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConsumerId, EventSender>> {
        // A poisoned lock only means another thread panicked while holding it; the map is still
        // consistent (every operation is a single insert/remove/get).
        self.consumers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A consumer attached to every partition of a queue. Read deliveries with [`Consumer::recv`];
/// settle them with [`Core::settle`]; end it with [`Consumer::cancel`] (dropping it detaches it
/// in the background).
#[derive(Debug)]
pub struct Consumer {
    pub(crate) core: Core,
    pub(crate) id: ConsumerId,
    pub(crate) queue: QueueName,
    pub(crate) targets: Vec<PartitionKey>,
    pub(crate) rx: EventReceiver,
    pub(crate) options: ConsumeOptions,
    /// No-ack mode: deliveries received per partition since credit was last granted.
    pub(crate) since_credit: BTreeMap<PartitionKey, u32>,
    pub(crate) credit_window: u32,
    pub(crate) detached: bool,
}

impl Consumer {
    /// This consumer's id.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The queue it consumes.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }

    /// The partitions of its queue it is attached to (all of them).
    pub fn partitions(&self) -> u32 {
        u32::try_from(self.targets.len()).unwrap_or(u32::MAX)
    }

    /// The next event; `None` once cancelled by the broker or after the node shut down.
    pub async fn recv(&mut self) -> Option<ConsumerEvent> {
        let event = *self.rx.recv().await?;
        if let ConsumerEvent::Delivery(delivery) = &event
            && self.options.no_ack
            && self.options.credit.is_none()
        {
            let key = (delivery.position.queue, delivery.position.partition);
            let received = self.since_credit.entry(key).or_insert(0);
            *received += 1;
            // Grant again once half the window is used, so the stream never stalls waiting.
            if *received >= self.credit_window / 2 {
                let credit = std::mem::take(received);
                let command = ShardCommand::Credit { consumer: self.id, target: key, credit };
                // Fire and forget: if it fails the node is stopping, and the stream ends anyway.
                let _ = self.core.shard_for(key).submit(command, 64);
            }
        }
        if matches!(event, ConsumerEvent::Cancelled) {
            self.detached = true;
        }
        Some(event)
    }

    /// Detach from every partition: unacked deliveries return to the queue. Returns the number of
    /// consumers left on the queue.
    pub async fn cancel(mut self) -> CoreResult<u32> {
        self.detached = true;
        self.core.inner.registry.unregister(self.id);
        let left = detach_until_done(&self.core, self.id, &self.targets).await?;
        self.core.after_cancel(&self.queue, left).await;
        Ok(left)
    }

    /// Stop receiving without giving back what the client has (AMQP `basic.cancel`): the
    /// deliveries in `keep` (position and the delivery count they were delivered with, so that a
    /// message requeued and delivered again meanwhile is told apart) stay held by this consumer's
    /// id, to be settled with [`Core::settle`] as before (or returned when the connection
    /// closes); every other delivery it holds returns to the queue as never delivered. Also returns the deliveries that reached this handle but
    /// were not read yet: for a no-ack consumer they are settled already and must still go to
    /// the client; for an ack-mode one they are back in the queue (unless in `keep`).
    pub async fn stop(mut self, keep: &[(Position, u32)]) -> CoreResult<Stopped> {
        self.detached = true;
        let core = self.core.clone();
        let commands: Vec<_> = self
            .targets
            .iter()
            .map(|&target| {
                let kept = keep
                    .iter()
                    .filter(|(position, _)| (position.queue, position.partition) == target)
                    .map(|(position, count)| (position.offset, *count))
                    .collect();
                (core.shard_index(target), ShardCommand::Stop { consumer: self.id, target, keep: kept })
            })
            .collect();
        // Tried again until committed, as a detach is: a stop that was lost would leave the
        // consumer attached (Drop does not detach it any more).
        let replies =
            core.retry_uncommitted("consumer stop", u32::MAX, || core.on_shards(commands.iter().cloned())).await;
        // Every delivery applied before the stop is in the channel now; none comes after it.
        core.inner.registry.unregister(self.id);
        let replies = replies?;
        let mut unread = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            if let ConsumerEvent::Delivery(delivery) = *event {
                unread.push(delivery);
            }
        }
        // Held deliveries are released with the connection, like basic.get ones.
        core.hold_for_connection(self.id, &self.targets);
        let consumers_left = consumers_left(&replies);
        core.after_cancel(&self.queue, consumers_left).await;
        Ok(Stopped { consumers_left, unread })
    }
}

/// What [`Consumer::stop`] leaves.
#[derive(Debug)]
pub struct Stopped {
    /// Pushing consumers left on the queue.
    pub consumers_left: u32,
    /// Deliveries that reached the consumer but were not read (see [`Consumer::stop`]).
    pub unread: Vec<Delivery>,
}

pub(crate) async fn detach_all(core: &Core, id: ConsumerId, targets: &[PartitionKey]) -> CoreResult<u32> {
    let replies = core
        .on_shards(
            targets.iter().map(|&target| (core.shard_index(target), ShardCommand::Detach { consumer: id, target })),
        )
        .await?;
    Ok(consumers_left(&replies))
}

/// Undoes a consumer's attach that did not finish ([`Core::consume`] failed or was dropped
/// half-way): unregisters it and detaches it from every partition an attach was sent to. Detach
/// commands queue behind the attaches on the same groups, so they are applied after them.
pub(crate) struct AttachUndo {
    core: Core,
    id: ConsumerId,
    sent: Vec<PartitionKey>,
    armed: bool,
}

impl AttachUndo {
    pub(crate) fn new(core: Core, id: ConsumerId) -> Self {
        Self { core, id, sent: Vec::new(), armed: true }
    }

    /// An attach to `target` is about to be sent.
    pub(crate) fn sent(&mut self, target: PartitionKey) {
        self.sent.push(target);
    }

    /// The consumer is complete: nothing to undo.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AttachUndo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.core.inner.registry.unregister(self.id);
        let (core, id, targets) = (self.core.clone(), self.id, std::mem::take(&mut self.sent));
        if targets.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { detach_until_done(&core, id, &targets).await });
        }
    }
}

impl std::fmt::Debug for AttachUndo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachUndo").field("id", &self.id).field("sent", &self.sent).finish()
    }
}

/// [`detach_all`], tried again after a retryable failure (no leader, a lost forward) until it is
/// committed or this node stops. A consumer whose detach was lost would otherwise stay attached
/// for as long as the node runs, holding its unacknowledged deliveries from every other consumer.
pub(crate) async fn detach_until_done(core: &Core, id: ConsumerId, targets: &[PartitionKey]) -> CoreResult<u32> {
    core.retry_uncommitted("detach", u32::MAX, || detach_all(core, id, targets))
        .await
        .inspect_err(|error| tracing::warn!(%error, consumer = ?id, "detaching a consumer failed"))
}

/// Pushing consumers left on a queue, from its partitions' detach (or stop) replies.
fn consumers_left(replies: &[ShardReply]) -> u32 {
    replies
        .iter()
        .map(|reply| if let ShardReply::Detached { consumers_left, .. } = reply { *consumers_left } else { 0 })
        .sum()
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.core.inner.registry.unregister(self.id);
        let core = self.core.clone();
        let id = self.id;
        let targets = std::mem::take(&mut self.targets);
        let queue = self.queue.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(left) = detach_until_done(&core, id, &targets).await {
                    core.after_cancel(&queue, left).await;
                }
            });
        }
    }
}
