//! Group commit in front of one Raft group: requests queue here, and one task packs whatever is
//! waiting into a single Raft entry, keeping up to `pipeline_entries_max` entries in flight. A
//! request's reply is sent only after its entry is committed and applied, which on every group
//! means fsynced on a majority. On a node that does not lead the group, the batch is forwarded to
//! the leader over the cluster transport instead (one batch at a time, so that commands keep their
//! order), and its replies are given once this node's replica has applied them too. Touches the
//! group's `Raft` handle and the cluster transport only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::impls::OneshotResponder;
use openraft::{BasicNode, Raft, RaftTypeConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::Limits;
use crate::error::{CoreError, CoreResult};
use crate::model::ConnectionId;
use crate::raft::runtime::{WharfRuntime, wall_clock_ms};
use crate::raft::transport::{GroupRpc, RpcKind, Transport, TransportError, call_encoded};
use crate::raft::{GroupConfig, Proposal, ReplicatedState, Replies};

/// How long a batch forwarded to the leader may take, commit included, before its callers are
/// told the group is unavailable (they retry; their idempotency keys make that safe).
const FORWARD_TIMEOUT_SECS: u64 = 10;
/// How long one attempt of a request that may be sent again (a read barrier) waits for its
/// answer before it is sent again.
const RESEND_ATTEMPT_MS: u64 = 1_000;
/// How long an entry proposed by this node while it led may still wait for its answer once the
/// leadership moved (see [`deposed`]).
const ABANDON_AFTER_DEPOSED_MS: u64 = 3_000;
/// How long a fence raised for a connection (see [`Fences`]) lasts when nobody lowers it.
const FENCE_SECS: u64 = 60;
/// Pause before sending a forwarded batch again after it could not be delivered.
const FORWARD_RETRY_MS: u64 = 50;

/// Receives one command's reply.
pub(crate) type ReplyReceiver<R> = oneshot::Receiver<CoreResult<R>>;

struct Pending<S: ReplicatedState> {
    command: S::Command,
    size_bytes: u64,
    reply: oneshot::Sender<CoreResult<S::Reply>>,
    /// Forwarded here by another node: proposed here or refused, never forwarded again.
    forwarded: bool,
    /// The connection that submitted it, when its commands must keep their order (see [`Fences`]),
    /// and the command's place among everything queued here.
    order: Order,
}

/// A command's connection, when its commands keep their order, and its place in the queue.
type Order = Option<(ConnectionId, u64)>;

/// Connections whose commands must keep their order, and one of whose commands failed with an
/// error that may be retried (not stored, or its outcome unknown). Their later commands are
/// refused rather than committed ahead of the failed one: the client sends it again, and what
/// followed it, in order (an MQTT connection closes on such a failure and its client resends in
/// order, [MQTT-4.6.0-6]). Without the fence, a batch cut after the failed one could still commit
/// (sent to a new leader, say), and the failed message would arrive after it. Commands queued
/// before the failed one are not held back: they come first anyway. A fence lasts until the
/// connection is closed ([`Proposer::lower_fence`]) or [`FENCE_SECS`] pass.
#[derive(Clone, Default)]
struct Fences(Arc<Mutex<HashMap<ConnectionId, Fence>>>);

/// A connection's fence: the place of its latest failed command, and when it failed.
#[derive(Clone, Copy)]
struct Fence {
    after: u64,
    raised: Instant,
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, Fence>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fence the connection of each of `orders`, commands that failed with `error`, when it may be
    /// retried.
    fn raise<'a>(&self, orders: impl IntoIterator<Item = &'a Order>, error: &CoreError) {
        if !error.is_retryable() {
            return;
        }
        let raised = Instant::now();
        let mut fences = self.lock();
        for &(source, place) in orders.into_iter().flatten() {
            let fence = fences.entry(source).or_insert(Fence { after: place, raised });
            *fence = Fence { after: fence.after.max(place), raised };
        }
    }

    /// Whether a command at `order` is held back by a fence (forgetting fences past [`FENCE_SECS`]).
    fn holds(&self, order: Order) -> bool {
        let Some((source, place)) = order else { return false };
        let mut fences = self.lock();
        if fences.is_empty() {
            return false;
        }
        let now = Instant::now();
        fences.retain(|_, fence| now.duration_since(fence.raised) < Duration::from_secs(FENCE_SECS));
        fences.get(&source).is_some_and(|fence| place > fence.after)
    }
}

/// How a node that does not lead a group reaches its leader.
#[derive(Clone)]
pub(crate) struct Forwarder {
    /// This node.
    pub(crate) me: u64,
    /// The node's cluster transport.
    pub(crate) transport: Arc<dyn Transport>,
}

/// Commands forwarded to a group's leader, with their sizes, in order.
#[derive(Debug, Serialize, Deserialize)]
struct ForwardRequest<Cmd> {
    commands: Vec<(Cmd, u64)>,
}

/// The leader's answer: a reply per command, and the index the leader had applied when the last
/// reply came (the forwarding node waits for its own replica to reach it).
#[derive(Debug, Serialize, Deserialize)]
struct ForwardReply<R> {
    replies: Vec<CoreResult<R>>,
    applied_index: u64,
}

/// The entrance to one group's group commit. Cheap to clone.
pub(crate) struct Proposer<S: ReplicatedState> {
    name: Arc<str>,
    tx: mpsc::Sender<Pending<S>>,
    fences: Fences,
    /// The place of the next command queued (see [`Order`]).
    next_place: Arc<AtomicU64>,
    /// The pipeline's slots (`pipeline_entries_max`): each entry in flight, and each forwarded
    /// batch, holds one. Holding them all holds the group commit ([`Proposer::hold`]).
    in_flight: Arc<Semaphore>,
    slots: u32,
}

impl<S: ReplicatedState> Clone for Proposer<S> {
    fn clone(&self) -> Self {
        Self {
            name: Arc::clone(&self.name),
            tx: self.tx.clone(),
            fences: self.fences.clone(),
            next_place: Arc::clone(&self.next_place),
            in_flight: Arc::clone(&self.in_flight),
            slots: self.slots,
        }
    }
}

impl<S: ReplicatedState> std::fmt::Debug for Proposer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").field("name", &self.name).finish()
    }
}

/// Milliseconds since the Unix epoch, the clock carried in proposals.
pub(crate) fn now_ms() -> u64 {
    wall_clock_ms()
}

impl<S: ReplicatedState> Proposer<S> {
    /// Start the group-commit task for `raft`. It ends when every `Proposer` clone is dropped.
    /// `forwarder` is how this node reaches the group's leader when it does not lead (`None` on a
    /// single node).
    pub(crate) fn spawn<C>(
        name: &str,
        raft: Raft<C>,
        limits: &Limits,
        forwarder: Option<Forwarder>,
    ) -> (Self, tokio::task::JoinHandle<()>)
    where
        C: GroupConfig<S, Responder = OneshotResponder<C>, AsyncRuntime = WharfRuntime>,
    {
        let (tx, rx) = mpsc::channel(limits.pending_requests_max as usize);
        let name: Arc<str> = Arc::from(name);
        let fences = Fences::default();
        let slots = limits.pipeline_entries_max;
        let in_flight = Arc::new(Semaphore::new(slots as usize));
        let task = tokio::spawn(run::<C, S>(
            Arc::clone(&name),
            raft,
            rx,
            limits.clone(),
            forwarder,
            fences.clone(),
            Arc::clone(&in_flight),
        ));
        (Self { name, tx, fences, next_place: Arc::default(), in_flight, slots }, task)
    }

    /// Hold the group commit: once every entry in flight has been answered, nothing more is
    /// proposed or forwarded until the returned guard is dropped (requests keep queueing). For a
    /// leadership hand-over, during which a new entry would only be refused.
    pub(crate) async fn hold(&self) -> CoreResult<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.in_flight)
            .acquire_many_owned(self.slots)
            .await
            .map_err(|_| CoreError::Unavailable(format!("group {} is stopped", self.name)))
    }

    /// Queue a command. Commands queued by one caller are applied in the order queued. Fails with
    /// `Overloaded` when `pending_requests_max` requests are already waiting.
    pub(crate) fn submit(&self, command: S::Command, size_bytes: u64) -> CoreResult<ReplyReceiver<S::Reply>> {
        self.enqueue(command, size_bytes, false, None)
    }

    /// [`Proposer::submit`] for `source`, whose commands keep their order across failures: after
    /// one fails with an error that may be retried, its later ones are refused (see [`Fences`]).
    pub(crate) fn submit_ordered(
        &self,
        command: S::Command,
        size_bytes: u64,
        source: Option<ConnectionId>,
    ) -> CoreResult<ReplyReceiver<S::Reply>> {
        self.enqueue(command, size_bytes, false, source)
    }

    /// `source` is closed: nothing it sends any more needs fencing.
    pub(crate) fn lower_fence(&self, source: ConnectionId) {
        self.fences.lock().remove(&source);
    }

    fn enqueue(
        &self,
        command: S::Command,
        size_bytes: u64,
        forwarded: bool,
        source: Option<ConnectionId>,
    ) -> CoreResult<ReplyReceiver<S::Reply>> {
        let (reply, rx) = oneshot::channel();
        let order = source.map(|source| (source, self.next_place.fetch_add(1, Ordering::Relaxed)));
        let queued = self.tx.try_send(Pending { command, size_bytes, reply, forwarded, order }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("wharf_core_overloaded_total", "group" => self.name.to_string()).increment(1);
                CoreError::Overloaded(format!(
                    "{} requests already wait for group {}",
                    self.tx.max_capacity(),
                    self.name
                ))
            }
            mpsc::error::TrySendError::Closed(_) => CoreError::Unavailable(format!("group {} is stopped", self.name)),
        });
        if let Err(error) = &queued {
            self.fences.raise([&order], error);
        }
        queued?;
        Ok(rx)
    }

    /// Queue a command and wait for its reply.
    pub(crate) async fn call(&self, command: S::Command, size_bytes: u64) -> CoreResult<S::Reply> {
        wait(self.submit(command, size_bytes)?).await
    }
}

/// Wait for a queued command's reply.
pub(crate) async fn wait<R>(rx: ReplyReceiver<R>) -> CoreResult<R> {
    rx.await.unwrap_or_else(|_| Err(CoreError::Unavailable("the group stopped before replying".into())))
}

async fn run<C, S>(
    name: Arc<str>,
    raft: Raft<C>,
    mut rx: mpsc::Receiver<Pending<S>>,
    limits: Limits,
    forwarder: Option<Forwarder>,
    fences: Fences,
    in_flight: Arc<Semaphore>,
) where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>, AsyncRuntime = WharfRuntime>,
{
    let commands_max = limits.batch_commands_max as usize;
    let mut carry: Option<Pending<S>> = None;
    let group = name.to_string();
    loop {
        let first = match carry.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        // Waiting for a pipeline slot is what makes batches grow under load: requests keep
        // queueing meanwhile, and the next entry takes them all.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
        // Let tasks that were just woken (by the previous entry's replies) run and queue first.
        tokio::task::yield_now().await;
        let mut bytes = first.size_bytes;
        let mut batch = vec![first];
        while batch.len() < commands_max {
            match rx.try_recv() {
                Ok(next) if bytes + next.size_bytes > limits.batch_bytes_max => {
                    carry = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.size_bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (fenced, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|pending| fences.holds(pending.order));
        let refused = CoreError::Unavailable(format!(
            "group {group}: an earlier command of this connection failed; this one is refused to keep their order"
        ));
        answer_all(fenced.into_iter().map(|pending| pending.reply), &refused);
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("wharf_core_batch_commands", "group" => group.clone()).record(batch.len() as f64);
        if let Some(forwarder) = &forwarder
            && let Some((leader, node)) = leader_elsewhere(&raft, forwarder.me).await
        {
            // Inline: the next batch waits, so commands reach the leader in the order queued.
            forward::<C, S>(&group, &raft, forwarder, (leader, &node), batch, &fences).await;
            drop(permit);
            continue;
        }
        let orders: Vec<Order> = batch.iter().map(|p| p.order).collect();
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let started = Instant::now();
        let proposed_by = leader_term(&raft);
        match raft.client_write_ff(Proposal { time_ms: now_ms(), commands }).await {
            Ok(receiver) => {
                let group = group.clone();
                let raft = raft.clone();
                let fences = fences.clone();
                tokio::spawn(async move {
                    let result = tokio::select! {
                        biased;
                        result = receiver => Some(result),
                        () = deposed(&raft, proposed_by) => None,
                    };
                    metrics::histogram!("wharf_core_commit_seconds", "group" => group.clone())
                        .record(started.elapsed().as_secs_f64());
                    let failed = match result {
                        Some(result) => deliver_replies::<C, S>(&group, result, replies),
                        None => {
                            metrics::counter!("wharf_core_entries_abandoned_total", "group" => group.clone())
                                .increment(1);
                            tracing::warn!(group, "leadership moved and no answer came for an entry proposed before");
                            let error = CoreError::Unavailable(format!(
                                "group {group}: leadership moved before the commit was confirmed; the outcome is unknown"
                            ));
                            answer_all(replies, &error);
                            Some(error)
                        }
                    };
                    // Before the permit is freed: the next batch is cut after the fences are up.
                    if let Some(error) = failed {
                        fences.raise(&orders, &error);
                    }
                    // Freed only after the replies went out, so that callers woken by them can
                    // queue their next requests before the next entry is cut.
                    drop(permit);
                });
            }
            Err(fatal) => {
                let error = CoreError::Unavailable(format!("group {group} stopped: {fatal}"));
                fences.raise(&orders, &error);
                answer_all(replies, &error);
            }
        }
    }
    // Whatever is still queued gets a clear answer rather than a dropped channel.
    rx.close();
    while let Ok(pending) = rx.try_recv() {
        let _ = pending.reply.send(Err(CoreError::Unavailable(format!("group {name} is shutting down"))));
    }
}

/// The term and leader of the vote this node holds (which leadership an entry proposed now
/// belongs to).
fn leader_term<C: RaftTypeConfig<NodeId = u64>>(raft: &Raft<C>) -> (u64, Option<u64>) {
    vote_leadership(&raft.metrics().borrow().vote)
}

fn vote_leadership(vote: &openraft::Vote<u64>) -> (u64, Option<u64>) {
    (vote.leader_id().term, vote.leader_id().voted_for())
}

/// Resolves once `raft`'s metrics satisfy `holds` (within `timeout`, if given); never otherwise,
/// shut-down groups included.
async fn until<C: RaftTypeConfig<NodeId = u64>>(
    raft: &Raft<C>,
    timeout: Option<Duration>,
    holds: impl Fn(&openraft::RaftMetrics<u64, C::Node>) -> bool + Send,
    what: &str,
) {
    if raft.wait(timeout).metrics(holds, what).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves [`ABANDON_AFTER_DEPOSED_MS`] after this node's vote left `proposed_by`; never while
/// it holds it. Within that grace an entry proposed under the old leadership is normally answered:
/// applied (it survived) or refused (the new leader's log replaced it). But openraft 0.9 keeps the
/// answer channel by log index and drops none when a snapshot from the new leader replaces the
/// log below it: such an entry is never answered, and the group commit, which keeps
/// `pipeline_entries_max` entries in flight, would wait for it for ever, and every later command
/// of the group on this node behind it.
async fn deposed<C: RaftTypeConfig<NodeId = u64>>(raft: &Raft<C>, proposed_by: (u64, Option<u64>)) {
    // A group shutting down never resolves this: its answer channels are dropped, which answers
    // the entry.
    until(raft, None, |m| vote_leadership(&m.vote) != proposed_by, "the leadership an entry was proposed under moved")
        .await;
    tokio::time::sleep(Duration::from_millis(ABANDON_AFTER_DEPOSED_MS)).await;
}

/// Whether node `me` leads the group.
pub(crate) fn leads<C: RaftTypeConfig<NodeId = u64>>(raft: &Raft<C>, me: u64) -> bool {
    raft.metrics().borrow().current_leader == Some(me)
}

/// The group's leader and its address, when it is known and is another node.
fn remote_leader<C: RaftTypeConfig<NodeId = u64, Node = BasicNode>>(
    raft: &Raft<C>,
    me: u64,
) -> Option<(u64, BasicNode)> {
    let metrics = raft.metrics().borrow().clone();
    let leader = metrics.current_leader.filter(|&leader| leader != me)?;
    let node = metrics.membership_config.membership().get_node(&leader)?.clone();
    Some((leader, node))
}

/// The group's leader, when it is another node; waits a little for an election in progress (a
/// batch proposed here meanwhile would only be refused).
async fn leader_elsewhere<C>(raft: &Raft<C>, me: u64) -> Option<(u64, BasicNode)>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode>,
{
    let known = raft
        .wait(Some(Duration::from_secs(FORWARD_TIMEOUT_SECS)))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await;
    if known.is_err() {
        return None;
    }
    remote_leader(raft, me)
}

/// Forward `batch` to `leader` and answer it. Commands forwarded here already are refused with
/// `NotLeader` rather than sent on: leadership moved while they travelled, and their sender retries.
async fn forward<C, S>(
    group: &str,
    raft: &Raft<C>,
    forwarder: &Forwarder,
    (leader, node): (u64, &BasicNode),
    batch: Vec<Pending<S>>,
    fences: &Fences,
) where
    S: ReplicatedState,
    C: GroupConfig<S>,
{
    let (relayed, sent): (Vec<_>, Vec<_>) = batch.into_iter().partition(|pending| pending.forwarded);
    for pending in relayed {
        let _ = pending.reply.send(Err(CoreError::NotLeader { leader: Some(leader) }));
    }
    if sent.is_empty() {
        return;
    }
    let orders: Vec<Order> = sent.iter().map(|p| p.order).collect();
    let (commands, replies): (Vec<_>, Vec<_>) = sent.into_iter().map(|p| ((p.command, p.size_bytes), p.reply)).unzip();
    let request = ForwardRequest { commands };
    let outcome = match ask_leader::<S>(group, raft, forwarder, (leader, node.clone()), &request, false).await {
        Ok((_, answer)) if answer.replies.len() == replies.len() => Ok(answer),
        Ok((leader, answer)) => Err(CoreError::Internal(format!(
            "group {group}: leader {leader} answered {} of {} forwarded commands",
            answer.replies.len(),
            replies.len()
        ))),
        Err(error) => Err(error),
    };
    let answer = match outcome {
        Ok(answer) => answer,
        Err(error) => {
            fences.raise(&orders, &error);
            answer_all(replies, &error);
            return;
        }
    };
    // Read-your-writes on this node: what the caller does next reads this replica.
    let applied = raft
        .wait(Some(Duration::from_secs(FORWARD_TIMEOUT_SECS)))
        .applied_index_at_least(Some(answer.applied_index), "forwarded commands applied here")
        .await;
    if let Err(error) = applied {
        tracing::warn!(group, %error, "forwarded commands committed, but this replica has not applied them yet");
    }
    for ((reply, answer), order) in replies.into_iter().zip(answer.replies).zip(&orders) {
        if let Err(error) = &answer {
            fences.raise([order], error);
        }
        let _ = reply.send(answer);
    }
}

/// Bring this node's replica of the group up to what its leader had applied when asked (a read
/// barrier): after it, reads here see every write confirmed anywhere before the call. Nothing to
/// do on the leader, or with no peers.
pub(crate) async fn catch_up<C, S>(group: &str, raft: &Raft<C>, forwarder: &Forwarder) -> CoreResult<()>
where
    S: ReplicatedState,
    C: GroupConfig<S>,
{
    let Some(target) = leader_elsewhere(raft, forwarder.me).await else { return Ok(()) };
    // An empty batch: the leader proposes nothing and answers with its applied index. Nothing is
    // written, so an attempt whose answer was lost is simply made again.
    let request = ForwardRequest::<S::Command> { commands: Vec::new() };
    let (leader, answer) = match ask_leader::<S>(group, raft, forwarder, target, &request, true).await {
        Ok(asked) => asked,
        // Leadership came here meanwhile: this replica is the leader's.
        Err(_) if leads(raft, forwarder.me) => return Ok(()),
        Err(error) => return Err(error),
    };
    raft.wait(Some(Duration::from_secs(FORWARD_TIMEOUT_SECS)))
        .applied_index_at_least(Some(answer.applied_index), "caught up with the leader")
        .await
        .map(drop)
        .map_err(|e| CoreError::Unavailable(format!("group {group}: catching up with leader {leader}: {e}")))
}

/// Send `request` to the group's leader (`target` first) until the deadline, again to whoever
/// leads by then each time it was not delivered and, with `resend_lost` (for a request that writes
/// nothing), each time its answer was lost. Returns the leader that answered, and its answer.
async fn ask_leader<S: ReplicatedState>(
    group: &str,
    raft: &Raft<impl RaftTypeConfig<NodeId = u64, Node = BasicNode>>,
    forwarder: &Forwarder,
    mut target: (u64, BasicNode),
    request: &ForwardRequest<S::Command>,
    resend_lost: bool,
) -> CoreResult<(u64, ForwardReply<S::Reply>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(FORWARD_TIMEOUT_SECS);
    loop {
        let (leader, node) = &target;
        let unavailable = |reason: String| CoreError::Unavailable(format!("group {group}: leader {leader}: {reason}"));
        let mut timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        if resend_lost {
            // Safe to send again: wait for one answer only so long, not the whole deadline.
            timeout = timeout.min(Duration::from_millis(RESEND_ATTEMPT_MS));
        }
        let call = call_encoded(&*forwarder.transport, *leader, node, group, RpcKind::Forward, request, timeout);
        // A leader that stopped answering (crashed, frozen, cut off) is replaced within a few
        // election timeouts: stop waiting for it then, rather than for the whole timeout, during
        // which every later batch of this group waits too.
        let sent = tokio::select! {
            biased;
            sent = call => sent,
            () = leadership_moved(raft, *leader, timeout) => Err(TransportError::Lost {
                target: *leader,
                reason: "leadership moved while it was being waited for".into(),
            }),
        };
        let error = match sent {
            Ok(reply) => {
                // The leader acted on it: a reply that does not decode leaves the outcome unknown.
                return postcard::from_bytes(&reply)
                    .map(|answer| (*leader, answer))
                    .map_err(|e| unavailable(format!("malformed answer: {e}")));
            }
            Err(error @ TransportError::Unreachable { .. }) => unavailable(error.to_string()),
            Err(error) if resend_lost => unavailable(error.to_string()),
            Err(error) => return Err(unavailable(error.to_string())),
        };
        tokio::time::sleep(Duration::from_millis(FORWARD_RETRY_MS)).await;
        match remote_leader(raft, forwarder.me) {
            Some(next) if tokio::time::Instant::now() < deadline => target = next,
            _ => return Err(error),
        }
    }
}

/// Resolves once this node knows of a leader other than `leader`, within `timeout`; never
/// otherwise.
async fn leadership_moved(raft: &Raft<impl RaftTypeConfig<NodeId = u64>>, leader: u64, timeout: Duration) {
    until(raft, Some(timeout), |m| m.current_leader.is_some_and(|now| now != leader), "another leader").await;
}

/// A group's side of the cluster transport on this node: Raft's RPCs go to openraft, forwarded
/// commands to the proposer (proposed here if this node leads, refused otherwise).
pub(crate) struct GroupEndpoint<C: RaftTypeConfig, S: ReplicatedState> {
    pub(crate) name: String,
    pub(crate) raft: Raft<C>,
    pub(crate) proposer: Proposer<S>,
    /// Reaches the other voters, for a leadership hand-over.
    pub(crate) transport: Arc<dyn Transport>,
}

#[async_trait::async_trait]
impl<C, S> GroupRpc for GroupEndpoint<C, S>
where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>>,
{
    async fn serve(&self, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, String> {
        if kind == RpcKind::Transfer {
            let to: u64 = postcard::from_bytes(body).map_err(|e| format!("malformed hand-over: {e}"))?;
            let answer =
                super::membership::hand_over(&self.name, &self.raft, &self.proposer, &*self.transport, to).await;
            return postcard::to_allocvec(&answer).map_err(|e| format!("encode: {e}"));
        }
        if kind != RpcKind::Forward {
            return self.raft.serve(kind, body).await;
        }
        let request: ForwardRequest<S::Command> =
            postcard::from_bytes(body).map_err(|e| format!("malformed forwarded commands: {e}"))?;
        let waits: Vec<_> = request
            .commands
            .into_iter()
            .map(|(command, size)| self.proposer.enqueue(command, size, true, None))
            .collect();
        let mut replies = Vec::with_capacity(waits.len());
        for queued in waits {
            replies.push(match queued {
                Ok(rx) => wait(rx).await,
                Err(error) => Err(error),
            });
        }
        let applied_index = self.raft.metrics().borrow().last_applied.map_or(0, |id| id.index);
        postcard::to_allocvec(&ForwardReply { replies, applied_index }).map_err(|e| format!("encode: {e}"))
    }
}

type WriteOutcome<C> = Result<
    Result<
        openraft::raft::ClientWriteResponse<C>,
        ClientWriteError<<C as RaftTypeConfig>::NodeId, <C as RaftTypeConfig>::Node>,
    >,
    oneshot::error::RecvError,
>;

/// Answer an entry's commands; returns the error they all got, if they failed.
fn deliver_replies<C, S>(
    group: &str,
    result: WriteOutcome<C>,
    replies: Vec<oneshot::Sender<CoreResult<S::Reply>>>,
) -> Option<CoreError>
where
    S: ReplicatedState,
    C: RaftTypeConfig<D = Proposal<S::Command>, R = Replies<S::Reply>, NodeId = u64>,
{
    let error = match result {
        Ok(Ok(response)) => {
            let Replies(answers) = response.data;
            if answers.len() == replies.len() {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A caller that stopped waiting is not an error: the command is committed.
                    let _ = reply.send(Ok(answer));
                }
                return None;
            }
            CoreError::Internal(format!(
                "group {group}: {} replies for {} commands in one entry",
                answers.len(),
                replies.len()
            ))
        }
        Ok(Err(ClientWriteError::ForwardToLeader(forward))) => CoreError::NotLeader { leader: forward.leader_id },
        Ok(Err(other)) => CoreError::Unavailable(format!("group {group}: {other}")),
        Err(_) => CoreError::Unavailable(format!("group {group} stopped before committing")),
    };
    answer_all(replies, &error);
    Some(error)
}

/// Answer every one of `replies` with `error` (a caller that stopped waiting is no error).
fn answer_all<R>(replies: impl IntoIterator<Item = oneshot::Sender<CoreResult<R>>>, error: &CoreError) {
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}
