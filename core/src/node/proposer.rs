//! Group commit in front of one Raft group: requests queue here, and one task packs whatever is
//! waiting into a single Raft entry, keeping up to `pipeline_entries_max` entries in flight. A
//! request's reply is sent only after its entry is committed and applied, which on every group
//! means fsynced on a majority. Touches the group's `Raft` handle only.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use openraft::error::ClientWriteError;
use openraft::impls::OneshotResponder;
use openraft::{Raft, RaftTypeConfig, TokioRuntime};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::Limits;
use crate::error::{CoreError, CoreResult};
use crate::raft::{GroupConfig, Proposal, ReplicatedState, Replies};

/// Receives one command's reply.
pub(crate) type ReplyReceiver<R> = oneshot::Receiver<CoreResult<R>>;

struct Pending<S: ReplicatedState> {
    command: S::Command,
    size_bytes: u64,
    reply: oneshot::Sender<CoreResult<S::Reply>>,
}

/// The entrance to one group's group commit. Cheap to clone.
pub(crate) struct Proposer<S: ReplicatedState> {
    name: Arc<str>,
    tx: mpsc::Sender<Pending<S>>,
}

impl<S: ReplicatedState> Clone for Proposer<S> {
    fn clone(&self) -> Self {
        Self { name: Arc::clone(&self.name), tx: self.tx.clone() }
    }
}

impl<S: ReplicatedState> std::fmt::Debug for Proposer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").field("name", &self.name).finish()
    }
}

/// Milliseconds since the Unix epoch, the clock carried in proposals.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl<S: ReplicatedState> Proposer<S> {
    /// Start the group-commit task for `raft`. It ends when every `Proposer` clone is dropped.
    pub(crate) fn spawn<C>(name: &str, raft: Raft<C>, limits: &Limits) -> (Self, tokio::task::JoinHandle<()>)
    where
        C: GroupConfig<S, Responder = OneshotResponder<C>, AsyncRuntime = TokioRuntime>,
    {
        let (tx, rx) = mpsc::channel(limits.pending_requests_max as usize);
        let name: Arc<str> = Arc::from(name);
        let task = tokio::spawn(run::<C, S>(Arc::clone(&name), raft, rx, limits.clone()));
        (Self { name, tx }, task)
    }

    /// Queue a command. Commands queued by one caller are applied in the order queued. Fails with
    /// `Overloaded` when `pending_requests_max` requests are already waiting.
    pub(crate) fn submit(&self, command: S::Command, size_bytes: u64) -> CoreResult<ReplyReceiver<S::Reply>> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Pending { command, size_bytes, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("wharf_core_overloaded_total", "group" => self.name.to_string()).increment(1);
                CoreError::Overloaded(format!(
                    "{} requests already wait for group {}",
                    self.tx.max_capacity(),
                    self.name
                ))
            }
            mpsc::error::TrySendError::Closed(_) => CoreError::Unavailable(format!("group {} is stopped", self.name)),
        })?;
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

async fn run<C, S>(name: Arc<str>, raft: Raft<C>, mut rx: mpsc::Receiver<Pending<S>>, limits: Limits)
where
    S: ReplicatedState,
    C: GroupConfig<S, Responder = OneshotResponder<C>, AsyncRuntime = TokioRuntime>,
{
    let in_flight = Arc::new(Semaphore::new(limits.pipeline_entries_max as usize));
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
        metrics::histogram!("wharf_core_batch_commands", "group" => group.clone()).record(batch.len() as f64);
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let started = Instant::now();
        match raft.client_write_ff(Proposal { time_ms: now_ms(), commands }).await {
            Ok(receiver) => {
                let group = group.clone();
                tokio::spawn(async move {
                    let result = receiver.await;
                    metrics::histogram!("wharf_core_commit_seconds", "group" => group.clone())
                        .record(started.elapsed().as_secs_f64());
                    deliver_replies::<C, S>(&group, result, replies);
                    // Freed only after the replies went out, so that callers woken by them can
                    // queue their next requests before the next entry is cut.
                    drop(permit);
                });
            }
            Err(fatal) => {
                for reply in replies {
                    let _ = reply.send(Err(CoreError::Unavailable(format!("group {group} stopped: {fatal}"))));
                }
            }
        }
    }
    // Whatever is still queued gets a clear answer rather than a dropped channel.
    rx.close();
    while let Ok(pending) = rx.try_recv() {
        let _ = pending.reply.send(Err(CoreError::Unavailable(format!("group {name} is shutting down"))));
    }
}

type WriteOutcome<C> = Result<
    Result<
        openraft::raft::ClientWriteResponse<C>,
        ClientWriteError<<C as RaftTypeConfig>::NodeId, <C as RaftTypeConfig>::Node>,
    >,
    oneshot::error::RecvError,
>;

fn deliver_replies<C, S>(group: &str, result: WriteOutcome<C>, replies: Vec<oneshot::Sender<CoreResult<S::Reply>>>)
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
                return;
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
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}
