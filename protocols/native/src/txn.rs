//! The native API's transactions and check-back streams. Transactions live in a node-wide table
//! between calls (begun → staged → prepared → committed or aborted); check-back questions of the
//! core are dispatched to the producer streams registered for their group. Reaches the core only
//! through `wharf_core::Core`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use wharf_core::CoreError;
use wharf_core::model::TxnId;
use wharf_core::node::{PreparedTxn, Txn, TxnCommitted};

use crate::mapping::{core_status, invalid, message_out, precondition, published_out, status};
use crate::{Native, proto};

/// Questions waiting to be written to one check-back stream.
const QUESTIONS_BUFFERED: usize = 256;
/// How often at most the table is swept of abandoned transactions.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A transaction between calls.
#[derive(Debug)]
enum TxnState {
    /// Begun; operations are staged here, nothing is sent to the core yet.
    Open { txn: Txn, group: Option<String> },
    /// Prepared on its participants, waiting for Commit or Abort.
    Prepared { prepared: PreparedTxn, deadline: Instant },
    /// A call is preparing, committing or aborting it.
    Busy,
}

#[derive(Debug)]
struct Entry {
    state: TxnState,
    last_used: Instant,
}

/// The node's open and prepared native transactions.
#[derive(Debug, Default)]
pub(crate) struct Transactions {
    table: Mutex<HashMap<TxnId, Entry>>,
    last_sweep: Mutex<Option<Instant>>,
}

/// Producer streams registered for check-back questions, per group.
#[derive(Debug, Default)]
pub(crate) struct CheckBacks {
    groups: Mutex<BTreeMap<String, Group>>,
    /// Questions sent and not answered yet, by question id.
    pending: Mutex<HashMap<u64, Pending>>,
    question_seq: AtomicU64,
    stream_seq: AtomicU64,
}

/// A question sent on a stream (by id) and where its answer goes.
type Pending = (u64, oneshot::Sender<Option<bool>>);

#[derive(Debug, Default)]
struct Group {
    streams: Vec<(u64, mpsc::Sender<proto::CheckBackQuestion>)>,
    next: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few map operations that leave the map consistent.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_txn(text: &str) -> Result<TxnId, Status> {
    text.parse::<TxnId>().map_err(|error| invalid(error.to_string()))
}

fn aborted(message: String) -> Status {
    status(Code::Aborted, "ABORTED", message, false, &[])
}

fn committed_out(committed: &TxnCommitted) -> proto::CommitReply {
    proto::CommitReply { published: committed.published.iter().map(published_out).collect() }
}

impl Native {
    /// Begin a transaction (BeginTransaction).
    pub(crate) fn begin_txn(&self, group: String) -> Result<proto::BeginTransactionReply, Status> {
        self.sweep_txns();
        let max = self.config.transactions_open_max;
        let mut table = lock(&self.txns.table);
        if table.len() >= max as usize {
            return Err(core_status(CoreError::LimitExceeded {
                limit: "native.transactions_open_max",
                value: table.len() as u64 + 1,
                max: max.into(),
            }));
        }
        let txn = self.core.begin_txn();
        let id = txn.id();
        let group = (!group.is_empty()).then_some(group);
        table.insert(id, Entry { state: TxnState::Open { txn, group }, last_used: Instant::now() });
        metrics::gauge!("wharf_native_transactions_open").set(table.len() as f64);
        Ok(proto::BeginTransactionReply { txn_id: id.to_string() })
    }

    /// Stage operations (Stage).
    pub(crate) fn stage(&self, request: proto::StageRequest) -> Result<proto::StageReply, Status> {
        let id = parse_txn(&request.txn_id)?;
        // Translate everything first: a malformed operation stages nothing.
        let mut publishes = Vec::with_capacity(request.publishes.len());
        for publish in request.publishes {
            let vhost = crate::mapping::vhost(&publish.vhost).to_owned();
            publishes.push((vhost, crate::mapping::message_in(publish.message)?));
        }
        let mut acks = Vec::with_capacity(request.acks.len());
        for ack in request.acks {
            let consumer = ack.consumer_id.parse().map_err(|e: CoreError| invalid(e.to_string()))?;
            let positions: Vec<_> = ack.positions.iter().map(crate::mapping::position_in).collect();
            acks.push((consumer, positions));
        }
        let operations_max = self.core.config().limits.txn_operations_max;
        let mut table = lock(&self.txns.table);
        let entry = table.get_mut(&id).ok_or_else(|| not_open(id))?;
        let TxnState::Open { txn, .. } = &mut entry.state else {
            return Err(precondition(format!("{id} is prepared or being decided: nothing more can be staged")));
        };
        let staged = txn.len() + publishes.len() + acks.iter().map(|(_, p)| p.len()).sum::<usize>();
        if staged > operations_max as usize {
            return Err(core_status(CoreError::LimitExceeded {
                limit: "limits.txn_operations_max",
                value: staged as u64,
                max: operations_max.into(),
            }));
        }
        for (vhost, message) in publishes {
            txn.publish(&vhost, message);
        }
        for (consumer, positions) in acks {
            txn.ack(consumer, &positions);
        }
        entry.last_used = Instant::now();
        Ok(proto::StageReply { operations: u32::try_from(txn.len()).unwrap_or(u32::MAX) })
    }

    /// Take a transaction out of the table for a deciding call, leaving it marked busy.
    fn take_txn(&self, id: TxnId) -> Result<Option<TxnState>, Status> {
        let mut table = lock(&self.txns.table);
        let Some(entry) = table.get_mut(&id) else { return Ok(None) };
        if matches!(entry.state, TxnState::Busy) {
            return Err(precondition(format!("{id} is being prepared, committed or aborted by another call")));
        }
        entry.last_used = Instant::now();
        Ok(Some(std::mem::replace(&mut entry.state, TxnState::Busy)))
    }

    fn forget_txn(&self, id: TxnId) {
        let mut table = lock(&self.txns.table);
        table.remove(&id);
        metrics::gauge!("wharf_native_transactions_open").set(table.len() as f64);
    }

    /// Prepare a transaction (Prepare).
    pub(crate) async fn prepare(&self, txn_id: &str) -> Result<proto::PrepareReply, Status> {
        let id = parse_txn(txn_id)?;
        let (txn, group) = match self.take_txn(id)? {
            Some(TxnState::Open { txn, group }) => (txn, group),
            Some(state) => {
                self.put_back(id, state);
                return Err(precondition(format!("{id} is prepared already")));
            }
            None => return Err(not_open(id)),
        };
        match self.core.prepare_txn(txn, group.as_deref()).await {
            Ok(prepared) => {
                let timeout_ms = prepared.timeout_ms();
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                self.put_back(id, TxnState::Prepared { prepared, deadline });
                Ok(proto::PrepareReply { decision_timeout_ms: timeout_ms })
            }
            Err(error) => {
                // Refused by a participant (or the core is going away): it is rolled back.
                self.forget_txn(id);
                Err(refused(id, error))
            }
        }
    }

    fn put_back(&self, id: TxnId, state: TxnState) {
        if let Some(entry) = lock(&self.txns.table).get_mut(&id) {
            entry.state = state;
            entry.last_used = Instant::now();
        }
    }

    /// Commit a transaction (Commit).
    pub(crate) async fn commit(&self, txn_id: &str) -> Result<proto::CommitReply, Status> {
        let id = parse_txn(txn_id)?;
        let result = match self.take_txn(id)? {
            Some(TxnState::Open { txn, .. }) => self.core.commit_txn(txn).await.map(Some),
            Some(TxnState::Prepared { prepared, .. }) => self.core.finish_txn(prepared, true).await,
            Some(TxnState::Busy) => unreachable!("take_txn never hands out a busy transaction"),
            // Not here: prepared by an earlier run of this node (a half message survives restarts)
            // or decided by a check-back answer and forgotten.
            None => {
                return match self.core.end_half(id, true).await {
                    Ok(true) => Ok(proto::CommitReply { published: Vec::new() }),
                    Ok(false) => Err(aborted(format!("{id} was rolled back (past its age limit)"))),
                    Err(CoreError::NotFound(_)) => Err(not_open(id)),
                    Err(error) => Err(core_status(error)),
                };
            }
        };
        self.forget_txn(id);
        match result {
            Ok(Some(committed)) => Ok(committed_out(&committed)),
            Ok(None) => Err(aborted(format!("{id} was rolled back: no decision within its deadline"))),
            Err(error) => Err(refused(id, error)),
        }
    }

    /// Abort a transaction (Abort).
    pub(crate) async fn abort(&self, txn_id: &str) -> Result<proto::AbortReply, Status> {
        let id = parse_txn(txn_id)?;
        // Whether it turned out committed (by a check-back answer) rather than aborted.
        let committed = match self.take_txn(id)? {
            Some(TxnState::Open { .. }) => Ok(false),
            Some(TxnState::Prepared { prepared, .. }) => {
                self.core.finish_txn(prepared, false).await.map(|committed| committed.is_some())
            }
            Some(TxnState::Busy) => unreachable!("take_txn never hands out a busy transaction"),
            // Not here: prepared by an earlier run of this node, or decided by check-back.
            None => match self.core.end_half(id, false).await {
                Err(CoreError::NotFound(_)) => return Err(not_open(id)),
                other => other,
            },
        };
        self.forget_txn(id);
        match committed {
            Ok(false) => Ok(proto::AbortReply {}),
            Ok(true) => Err(precondition(format!("{id} was committed already (by a check-back answer)"))),
            Err(error) => Err(core_status(error)),
        }
    }

    /// Drop open transactions idle for longer than `native.txn_idle_secs` (a client that went
    /// away) and prepared ones past their deadline (the core rolls those back itself).
    fn sweep_txns(&self) {
        let now = Instant::now();
        {
            let mut last = lock(&self.txns.last_sweep);
            if last.is_some_and(|last| now.duration_since(last) < SWEEP_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        let idle = Duration::from_secs(self.config.txn_idle_secs.into());
        let mut table = lock(&self.txns.table);
        table.retain(|id, entry| {
            let keep = match &entry.state {
                TxnState::Open { .. } => now.duration_since(entry.last_used) < idle,
                TxnState::Prepared { deadline, .. } => now < *deadline,
                TxnState::Busy => true,
            };
            if !keep {
                tracing::debug!(txn = %id, "native transaction abandoned by its client: discarded");
            }
            keep
        });
        metrics::gauge!("wharf_native_transactions_open").set(table.len() as f64);
    }

    // ----- check-back ---------------------------------------------------------------------

    /// Register a producer stream for `group`: returns its id and the questions for it. The
    /// first stream of a group on this node registers the group's handler with the core.
    pub(crate) fn register_producer(self: &Arc<Self>, group: &str) -> (u64, mpsc::Receiver<proto::CheckBackQuestion>) {
        let id = self.check_backs.stream_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUESTIONS_BUFFERED);
        let mut groups = lock(&self.check_backs.groups);
        let first = !groups.contains_key(group);
        groups.entry(group.to_owned()).or_default().streams.push((id, tx));
        drop(groups);
        if first {
            let questions = self.core.register_check_back(group);
            tokio::spawn(dispatch(Arc::downgrade(self), group.to_owned(), questions));
        }
        (id, rx)
    }

    /// A producer stream ended: its unanswered questions count as "not known yet".
    pub(crate) fn unregister_producer(&self, group: &str, stream: u64) {
        if let Some(entry) = lock(&self.check_backs.groups).get_mut(group) {
            entry.streams.retain(|(id, _)| *id != stream);
        }
        lock(&self.check_backs.pending).retain(|_, (owner, _)| *owner != stream);
    }

    /// A producer's answer; refused when the question was not asked on its stream.
    pub(crate) fn answer(&self, stream: u64, answer: &proto::CheckBackAnswer) -> Result<(), Status> {
        let mut pending = lock(&self.check_backs.pending);
        match pending.get(&answer.question_id) {
            Some((owner, _)) if *owner == stream => {}
            _ => {
                return Err(invalid(format!(
                    "question {} was not asked on this stream, or is answered already",
                    answer.question_id
                )));
            }
        }
        let Some((_, reply)) = pending.remove(&answer.question_id) else { return Ok(()) };
        let decision = match proto::Decision::try_from(answer.decision) {
            Ok(proto::Decision::Commit) => Some(true),
            Ok(proto::Decision::Rollback) => Some(false),
            Ok(proto::Decision::Unknown) => None,
            Err(_) => return Err(invalid(format!("unknown decision {}", answer.decision))),
        };
        // The core stopped waiting (after its answer timeout): it asks again later.
        let _ = reply.send(decision);
        Ok(())
    }
}

fn not_open(id: TxnId) -> Status {
    status(
        Code::NotFound,
        "NOT_FOUND",
        format!("no transaction {id} here: finished, discarded after native.txn_idle_secs, or never begun"),
        false,
        &[],
    )
}

/// A transaction the core refused to prepare or commit: it is rolled back. Refusals that are the
/// client's to fix (a delivery not held, a key committed already) are ABORTED; the others keep
/// their own status.
fn refused(id: TxnId, error: CoreError) -> Status {
    match error {
        CoreError::PreconditionFailed(reason) => aborted(format!("{id} rolled back: {reason}")),
        other => core_status(other),
    }
}

/// Hand the core's check-back questions of `group` to its producer streams, in turn.
async fn dispatch(
    native: std::sync::Weak<Native>,
    group: String,
    mut questions: mpsc::Receiver<wharf_core::node::CheckBack>,
) {
    while let Some(question) = questions.recv().await {
        let Some(native) = native.upgrade() else { return };
        let question_id = native.check_backs.question_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = {
            let mut groups = lock(&native.check_backs.groups);
            let Some(entry) = groups.get_mut(&group) else { continue };
            entry.streams.retain(|(_, tx)| !tx.is_closed());
            let count = entry.streams.len();
            let mut target = None;
            for step in 0..count {
                let (stream, tx) = &entry.streams[(entry.next + step) % count];
                let message = proto::CheckBackQuestion {
                    question_id,
                    txn_id: question.txn.to_string(),
                    message: question.message.as_deref().map(message_out),
                };
                if tx.try_send(message).is_ok() {
                    entry.next = (entry.next + step + 1) % count;
                    target = Some(*stream);
                    break;
                }
            }
            target
        };
        match sent {
            Some(stream) => {
                let mut pending = lock(&native.check_backs.pending);
                // Questions the core stopped waiting for are dropped as new ones come.
                pending.retain(|_, (_, reply)| !reply.is_closed());
                pending.insert(question_id, (stream, question.reply));
            }
            // No producer of the group here (or all of them are behind): not known yet.
            None => {
                tracing::info!(txn = %question.txn, group, "check-back: no producer stream of the group on this node");
                let _ = question.reply.send(None);
            }
        }
    }
}
