//! Background work of a node, each decided by committed state and carried out by proposing
//! commands: time ticks (delays, TTLs), queue expiry (`x-expires`), and republishing dead-lettered
//! messages to their dead-letter exchange. Touches the node's proposers and state readers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::proposer::{ReplyReceiver, now_ms, wait};
use super::{Core, Inner};
use crate::error::CoreError;
use crate::model::QueueId;
use crate::queue::DeadLetter;
use crate::shard::{PartitionKey, ShardCommand, ShardReply};

/// Most dead-letter jobs republished together.
const DEAD_LETTER_BATCH_MAX: usize = 1_024;
/// Pause before retrying a dead-letter republish that failed with a retryable error.
const DEAD_LETTER_RETRY_MS: u64 = 200;

pub(super) fn spawn(core: &Core, dead_letters: mpsc::UnboundedReceiver<DeadLetter>) -> Vec<JoinHandle<()>> {
    let weak = Arc::downgrade(&core.inner);
    // Dead-lettering still pending from before a restart is announced again here; the worker
    // skips anything already done, so a job announced twice is republished once.
    let (resume_tx, resume_rx) = mpsc::unbounded_channel();
    for shard in &core.inner.shards {
        for job in shard.reader.read(|s| s.dead_lettering()) {
            let _ = resume_tx.send(job);
        }
    }
    drop(resume_tx);
    vec![tokio::spawn(ticker(weak.clone())), tokio::spawn(dead_letter_worker(weak, resume_rx, dead_letters))]
}

fn upgrade(weak: &Weak<Inner>) -> Option<Core> {
    let inner = weak.upgrade()?;
    let core = Core { inner };
    (!core.inner.closing.load(std::sync::atomic::Ordering::Acquire)).then_some(core)
}

async fn ticker(weak: Weak<Inner>) {
    let interval_ms = match weak.upgrade() {
        Some(inner) => inner.config.tick_interval_ms,
        None => return,
    };
    let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outstanding: BTreeMap<usize, ReplyReceiver<ShardReply>> = BTreeMap::new();
    loop {
        interval.tick().await;
        let Some(core) = upgrade(&weak) else { return };
        let now = now_ms();
        for (index, shard) in core.inner.shards.iter().enumerate() {
            // Time advances where the group is led: a follower's tick would only be refused.
            if !core.leads(&shard.raft) {
                continue;
            }
            // At most one tick in flight per shard: a slow commit must not pile ticks up.
            if let Some(rx) = outstanding.get_mut(&index) {
                match rx.try_recv() {
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                    _ => {
                        outstanding.remove(&index);
                    }
                }
            }
            let due = shard.reader.read(|s| s.next_deadline_ms()).is_some_and(|deadline| deadline <= now);
            if due && let Ok(rx) = shard.proposer.submit(ShardCommand::Tick, 64) {
                outstanding.insert(index, rx);
            }
        }
        expire_queues(&core, now).await;
        if let Err(error) = core.resolve_in_doubt().await {
            tracing::warn!(%error, "resolving in-doubt transactions failed; retrying at the next tick");
        }
    }
}

/// Delete queues whose `x-expires` passed on every partition.
async fn expire_queues(core: &Core, now: u64) {
    let mut expired: BTreeMap<QueueId, u32> = BTreeMap::new();
    for shard in &core.inner.shards {
        for (queue, _) in shard.reader.read(|s| s.expired(now)) {
            *expired.entry(queue).or_insert(0) += 1;
        }
    }
    for (id, count) in expired {
        let Some(queue) = core.with_catalogue(|c| c.queue_by_id(id).cloned()) else { continue };
        if count < queue.args.partitions {
            continue;
        }
        tracing::info!(queue = %queue.name, "deleting queue: x-expires passed");
        match core.delete_queue(&queue.name.vhost, &queue.name.name, false, false, None).await {
            Ok(_) | Err(CoreError::NotFound(_)) => {}
            Err(error) => tracing::warn!(queue = %queue.name, %error, "queue expiry failed"),
        }
    }
}

async fn dead_letter_worker(
    weak: Weak<Inner>,
    mut resumed: mpsc::UnboundedReceiver<DeadLetter>,
    mut jobs: mpsc::UnboundedReceiver<DeadLetter>,
) {
    loop {
        let first = match resumed.recv().await {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < DEAD_LETTER_BATCH_MAX {
            match resumed.try_recv().or_else(|_| jobs.try_recv()) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(core) = upgrade(&weak) else { return };
        republish(&core, batch).await;
    }
}

/// Republish a batch of dead-lettered messages, then tell their partitions they are done. Only
/// messages still marked as dead-lettering are republished, so a job seen twice goes out once.
async fn republish(core: &Core, batch: Vec<DeadLetter>) {
    let mut seen = BTreeSet::new();
    let mut pending = Vec::new();
    for job in batch {
        let target = (job.position.queue, job.position.partition);
        // Only the shard's leader republishes, so that replicas do not each send a copy. (A new
        // leader finds the pending ones in its state when it starts: `spawn` scans for them.)
        if !core.leads(&core.inner.shards[core.shard_index(target)].raft) {
            continue;
        }
        let still = core
            .shard_reader(target)
            .read(|s| s.partition(target).is_some_and(|p| p.is_dead_lettering(job.position.offset)));
        if still && seen.insert(job.position) {
            pending.push(job);
        }
    }
    let mut done: BTreeMap<PartitionKey, Vec<u64>> = BTreeMap::new();
    let mut confirms = Vec::new();
    for job in pending {
        let target = (job.position.queue, job.position.partition);
        let Some(vhost) = core.with_catalogue(|c| c.queue_by_id(job.position.queue).map(|q| q.name.vhost.clone()))
        else {
            continue;
        };
        let mut message = (*job.message).clone();
        message.exchange = job.exchange.clone();
        message.routing_key = job.routing_key.clone();
        loop {
            match core.publish_to(&vhost, message.clone(), None, |queue| !is_cycle(&message, &queue.name.name)).await {
                Ok(pending) => {
                    confirms.push((target, job.position.offset, pending));
                    break;
                }
                Err(error) if error.is_retryable() => {
                    if upgrade(&Arc::downgrade(&core.inner)).is_none() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(DEAD_LETTER_RETRY_MS)).await;
                }
                Err(error) => {
                    // RabbitMQ drops a dead-lettered message whose exchange does not exist.
                    tracing::warn!(exchange = %job.exchange, %error, "dead-lettered message dropped");
                    done.entry(target).or_default().push(job.position.offset);
                    break;
                }
            }
        }
    }
    for (target, offset, pending) in confirms {
        match pending.confirm().await {
            Ok(_) => done.entry(target).or_default().push(offset),
            // Not marked done: it stays dead-lettering and is retried after the next restart.
            Err(error) => tracing::warn!(%error, "dead-letter republish not confirmed"),
        }
    }
    let mut waits = Vec::new();
    for (target, offsets) in done {
        let command = ShardCommand::DeadLettered { target, offsets };
        let size = command.size_bytes();
        if let Ok(rx) = core.shard_for(target).submit(command, size) {
            waits.push(rx);
        }
    }
    for rx in waits {
        let _ = wait(rx).await;
    }
}

/// Whether dead-lettering `message` into `queue` closes a cycle that no consumer took part in.
/// RabbitMQ drops such a message for that queue, or a queue dead-lettering into itself (say, with
/// a TTL and no dead-letter routing key) would loop forever: walking the `x-death` history from
/// the newest entry, a rejection first means a consumer was involved (not a cycle); the queue first
/// means it would come back without one (a cycle).
fn is_cycle(message: &crate::model::Message, queue: &str) -> bool {
    use crate::model::FieldValue;
    let Some(FieldValue::Array(deaths)) = message.headers.get("x-death") else { return false };
    for death in deaths {
        let FieldValue::Table(death) = death else { continue };
        if death.get("reason").and_then(FieldValue::as_str) == Some("rejected") {
            return false;
        }
        if death.get("queue").and_then(FieldValue::as_str) == Some(queue) {
            return true;
        }
    }
    false
}
