//! An async Rust client of Wharf's native gRPC API (`protocols/native/proto/wharf/v1/wharf.proto`):
//! publishing with retries that reuse the idempotency key (so a retry never stores a message
//! twice), consuming with credit, transactions (including the consume-transform-produce helper)
//! and check-back answers. [`proto`] is the generated code, for everything this API does not wrap.
//!
//! ```no_run
//! # async fn run() -> Result<(), wharf_client::Error> {
//! use wharf_client::{Client, ConsumeOptions, MessageExt, message};
//!
//! let client = Client::connect("http://127.0.0.1:7654").await?;
//! client.declare_queue("orders").await?;
//! // Published with an idempotency key: retried after a lost reply, it is stored once.
//! let reply = client.publish("/", message("", "orders", "order 17").key("order-17")).await?;
//! assert!(!reply.duplicate);
//!
//! let mut orders = client.consume("/", "orders", ConsumeOptions::default()).await?;
//! if let Some(delivery) = orders.next().await? {
//!     // Ack the order and publish its ledger entry in one transaction: both or neither.
//!     let entry = message("", "ledger", "debit 17").key("ledger-17");
//!     client.consume_transform_produce(&orders, &delivery, vec![("/".into(), entry)]).await?;
//! }
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

/// The messages and the client of the native API, as generated from its `.proto`.
#[allow(
    missing_docs,
    unused_qualifications,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]
pub mod proto {
    tonic::include_proto!("wharf.v1");
}

use proto::wharf_client::WharfClient;

/// Requests buffered towards the broker on a consume or check-back stream.
const STREAM_REQUESTS_BUFFERED: usize = 64;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker answered with an error.
    #[error("{code:?} {reason}: {message}")]
    Broker {
        /// The gRPC code.
        code: tonic::Code,
        /// The broker's error code (NOT_FOUND, LIMIT_EXCEEDED, ABORTED, ...), from the status's
        /// ErrorInfo detail; empty when the status had none (a transport-level failure).
        reason: String,
        /// What the broker said.
        message: String,
        /// Whether the same request may succeed later.
        retryable: bool,
    },
    /// The broker could not be reached.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The broker broke the API's contract (a stream ended early, a reply was empty).
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether the same request may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Broker { retryable, .. } => *retryable,
            Self::Transport(_) => true,
            Self::Protocol(_) => false,
        }
    }

    /// The broker's error code, if the broker gave one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Broker { reason, .. } if !reason.is_empty() => Some(reason),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let info = status.get_details_error_info();
        let (reason, retryable) = match &info {
            Some(info) => (info.reason.clone(), info.metadata.get("retryable").is_some_and(|r| r == "true")),
            // No detail: the call did not get an answer from the broker's handlers (the
            // connection was refused or broke, a deadline passed): worth a retry, which the
            // idempotency key makes safe. Codes that say the request itself is wrong are not.
            None => (
                String::new(),
                matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                        | tonic::Code::Cancelled
                ),
            ),
        };
        Self::Broker { code: status.code(), reason, message: status.message().to_owned(), retryable }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A message to publish, with its routing address and payload; see [`MessageExt`] for the rest.
pub fn message(exchange: &str, routing_key: &str, payload: impl Into<Bytes>) -> proto::Message {
    proto::Message {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        payload: payload.into(),
        ..proto::Message::default()
    }
}

/// Builder-style setters on [`proto::Message`].
pub trait MessageExt {
    /// Set the idempotency key.
    fn key(self, key: impl Into<String>) -> Self;
    /// Set the partition key.
    fn partition_key(self, key: impl Into<String>) -> Self;
    /// Append a string header.
    fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self;
}

impl MessageExt for proto::Message {
    fn key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let value = proto::Value { kind: Some(proto::value::Kind::String(value.into())) };
        self.headers.push(proto::Header { name: name.into(), value: Some(value) });
        self
    }
}

/// How publishes are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubled at each one.
    pub backoff: Duration,
    /// Longest wait between two attempts.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { retries: 8, backoff: Duration::from_millis(50), backoff_max: Duration::from_secs(2) }
    }
}

/// A connection to a Wharf node. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    raw: WharfClient<Channel>,
    retry: RetryPolicy,
}

/// Unique suffixes of generated idempotency keys within this process.
static KEY_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh idempotency key, unique with overwhelming likelihood: process id, start time and a
/// counter.
pub fn new_key() -> String {
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("wc-{}-{start:x}-{}", std::process::id(), KEY_SEQ.fetch_add(1, Ordering::Relaxed))
}

/// `message`, with a fresh idempotency key if it has none.
fn keyed(mut message: proto::Message) -> proto::Message {
    if message.idempotency_key.is_none() {
        message.idempotency_key = Some(new_key());
    }
    message
}

impl Client {
    /// Connect to `endpoint` (`http://host:7654`, or `https://` for a TLS listener).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        let channel = Endpoint::from_shared(endpoint.into())?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// A client over a channel made elsewhere (TLS settings, timeouts, load balancing).
    pub fn from_channel(channel: Channel) -> Self {
        Self { raw: WharfClient::new(channel), retry: RetryPolicy::default() }
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The generated client, for calls this API does not wrap.
    pub fn raw(&self) -> WharfClient<Channel> {
        self.raw.clone()
    }

    /// `message`, with a fresh idempotency key if it has none and publishes are retried.
    fn keyed_for_retries(&self, message: proto::Message) -> proto::Message {
        if self.retry.retries > 0 { keyed(message) } else { message }
    }

    /// Run `call` with the retry policy: retryable errors are retried with back-off.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut(WharfClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut wait = self.retry.backoff;
        let mut attempt = 0;
        loop {
            match call(self.raw.clone()).await.map_err(Error::from) {
                Err(error) if error.is_retryable() && attempt < self.retry.retries => {
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.retry.backoff_max);
                }
                other => return other,
            }
        }
    }

    /// Publish a message and wait until it is committed. A message without an idempotency key
    /// gets a fresh one, so that the retries of a publish whose reply was lost cannot store it
    /// twice; every retry carries the same key. The reply's `duplicate` tells a message stored
    /// before (by an earlier call with the same key) from a new one.
    pub async fn publish(&self, vhost: &str, message: proto::Message) -> Result<proto::PublishReply> {
        let message = self.keyed_for_retries(message);
        let request = proto::PublishRequest { vhost: vhost.to_owned(), message: Some(message), mandatory: false };
        self.retrying(|mut raw| {
            let request = request.clone();
            async move { raw.publish(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Publish several messages in one call (each on its own, in order), with the same keys
    /// and retries as [`Client::publish`]: on a retryable failure of the whole call, the batch is
    /// sent again and messages stored the first time come back as duplicates.
    pub async fn publish_batch(&self, vhost: &str, messages: Vec<proto::Message>) -> Result<Vec<proto::PublishResult>> {
        let messages = messages.into_iter().map(|message| self.keyed_for_retries(message)).collect();
        let request = proto::PublishBatchRequest { vhost: vhost.to_owned(), messages, mandatory: false };
        self.retrying(|mut raw| {
            let request = request.clone();
            async move { raw.publish_batch(request).await.map(|r| r.into_inner().results) }
        })
        .await
    }

    /// Consume a queue.
    pub async fn consume(&self, vhost: &str, queue: &str, options: ConsumeOptions) -> Result<Consumer> {
        let (tx, rx) = mpsc::channel(STREAM_REQUESTS_BUFFERED);
        let subscribe = proto::Subscribe {
            vhost: vhost.to_owned(),
            queue: queue.to_owned(),
            credit: options.credit,
            prefetch: options.prefetch,
            no_ack: options.no_ack,
            priority: options.priority,
            exclusive: options.exclusive,
        };
        let first = proto::ConsumeRequest { request: Some(proto::consume_request::Request::Subscribe(subscribe)) };
        tx.send(first).await.map_err(|_| Error::Protocol("the request stream closed".into()))?;
        let mut events = self.raw.clone().consume(ReceiverStream::new(rx)).await?.into_inner();
        let subscribed = match events.message().await? {
            Some(proto::ConsumeEvent { event: Some(proto::consume_event::Event::Subscribed(subscribed)) }) => {
                subscribed
            }
            other => return Err(Error::Protocol(format!("expected subscribed, got {other:?}"))),
        };
        Ok(Consumer {
            requests: tx,
            events,
            consumer_id: subscribed.consumer_id,
            auto_credit: options.auto_credit && options.credit > 0,
            window: options.credit,
            received: 0,
            request_seq: 0,
        })
    }

    /// Begin a transaction. With a `check_back_group`, a prepared transaction whose producer goes
    /// silent is decided by asking that group ([`Client::check_back`]).
    pub async fn begin(&self, check_back_group: Option<&str>) -> Result<Transaction> {
        let request = proto::BeginTransactionRequest { check_back_group: check_back_group.unwrap_or("").to_owned() };
        let reply = self.raw.clone().begin_transaction(request).await?.into_inner();
        Ok(Transaction { raw: self.raw.clone(), id: reply.txn_id })
    }

    /// Acknowledge `input` (held by `consumer`) and publish `outputs`, all in one transaction: the
    /// consume-transform-produce step, exactly once. Outputs without an idempotency key get one.
    /// If the transaction is rolled back (for example `input` was redelivered to another consumer
    /// after this one's stream broke), the error is ABORTED and nothing was published. After a
    /// retryable error (the connection broke during Commit) the outcome is not known: the
    /// outputs' idempotency keys tell ([`Client::query_key`]), and publishing them again with
    /// the same keys cannot store them twice.
    pub async fn consume_transform_produce(
        &self,
        consumer: &Consumer,
        input: &proto::Delivery,
        outputs: Vec<(String, proto::Message)>,
    ) -> Result<proto::CommitReply> {
        let position = input.position.ok_or_else(|| Error::Protocol("a delivery without a position".into()))?;
        let txn = self.begin(None).await?;
        let publishes = outputs
            .into_iter()
            .map(|(vhost, message)| proto::StagedPublish { vhost, message: Some(keyed(message)) })
            .collect();
        let acks = vec![proto::StagedAck { consumer_id: consumer.consumer_id.clone(), positions: vec![position] }];
        if let Err(error) = txn.stage(publishes, acks).await {
            let _ = txn.abort().await;
            return Err(error);
        }
        txn.commit().await
    }

    /// Answer check-back questions for `group`.
    pub async fn check_back(&self, group: &str) -> Result<CheckBack> {
        let (tx, rx) = mpsc::channel(STREAM_REQUESTS_BUFFERED);
        let register = proto::check_back_request::Request::Register(proto::Register { group: group.to_owned() });
        tx.send(proto::CheckBackRequest { request: Some(register) })
            .await
            .map_err(|_| Error::Protocol("the request stream closed".into()))?;
        let questions = self.raw.clone().check_back(ReceiverStream::new(rx)).await?.into_inner();
        Ok(CheckBack { answers: tx, questions })
    }

    /// Was a message with idempotency key `key` committed to `queue`? Where and when (ms since the
    /// Unix epoch), if so.
    pub async fn query_key(&self, vhost: &str, queue: &str, key: &str) -> Result<Option<(proto::Position, u64)>> {
        let request = proto::QueryKeyRequest { vhost: vhost.to_owned(), queue: queue.to_owned(), key: key.to_owned() };
        let reply = self
            .retrying(|mut raw| {
                let request = request.clone();
                async move { raw.query_key(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        Ok(reply.committed.then_some(reply.position.map(|p| (p, reply.committed_ms))).flatten())
    }

    /// Declare a durable queue in the default vhost (nothing changes if it exists alike).
    pub async fn declare_queue(&self, name: &str) -> Result<proto::DeclareQueueReply> {
        let request = proto::DeclareQueueRequest { name: name.to_owned(), durable: true, ..Default::default() };
        Ok(self.raw.clone().declare_queue(request).await?.into_inner())
    }

    /// Bind a queue to an exchange in the default vhost.
    pub async fn bind_queue(&self, queue: &str, exchange: &str, routing_key: &str) -> Result<()> {
        let request = proto::BindRequest {
            source: exchange.to_owned(),
            destination: Some(proto::bind_request::Destination::Queue(queue.to_owned())),
            routing_key: routing_key.to_owned(),
            ..Default::default()
        };
        self.raw.clone().bind(request).await?;
        Ok(())
    }
}

/// How to consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Deliveries the broker may send before more credit is granted (0: none until
    /// [`Consumer::grant`]).
    pub credit: u32,
    /// Grant credit again as deliveries are read, keeping `credit` deliveries in flight.
    pub auto_credit: bool,
    /// Unsettled deliveries per partition (0: the broker's limit).
    pub prefetch: u32,
    /// Deliveries are settled when sent (at most once).
    pub no_ack: bool,
    /// Consumer priority.
    pub priority: i32,
    /// No other consumer on the queue meanwhile.
    pub exclusive: bool,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self { credit: 100, auto_credit: true, prefetch: 0, no_ack: false, priority: 0, exclusive: false }
    }
}

/// A consumer: one Consume stream.
#[derive(Debug)]
pub struct Consumer {
    requests: mpsc::Sender<proto::ConsumeRequest>,
    events: tonic::Streaming<proto::ConsumeEvent>,
    consumer_id: String,
    auto_credit: bool,
    window: u32,
    received: u32,
    request_seq: u64,
}

impl Consumer {
    /// Its id, for staging acknowledgements in a transaction.
    pub fn id(&self) -> &str {
        &self.consumer_id
    }

    async fn send(&self, request: proto::consume_request::Request) -> Result<()> {
        self.requests
            .send(proto::ConsumeRequest { request: Some(request) })
            .await
            .map_err(|_| Error::Protocol("the consume stream is closed".into()))
    }

    /// The next delivery; `None` when the broker cancelled the consumer (its queue was deleted)
    /// or ended the stream. `settled` answers are skipped (see [`Consumer::ack_confirmed`]).
    pub async fn next(&mut self) -> Result<Option<proto::Delivery>> {
        loop {
            let Some(event) = self.events.message().await? else { return Ok(None) };
            match event.event {
                Some(proto::consume_event::Event::Delivery(delivery)) => {
                    self.received += 1;
                    if self.auto_credit && self.received >= self.window.div_ceil(2) {
                        let credit = std::mem::take(&mut self.received);
                        self.send(proto::consume_request::Request::Credit(credit)).await?;
                    }
                    return Ok(Some(delivery));
                }
                Some(proto::consume_event::Event::Cancelled(_)) => return Ok(None),
                _ => {}
            }
        }
    }

    /// Grant `credit` more deliveries.
    pub async fn grant(&self, credit: u32) -> Result<()> {
        self.send(proto::consume_request::Request::Credit(credit)).await
    }

    /// Settle deliveries (queued; committed in order with later settles).
    pub async fn settle(&self, positions: Vec<proto::Position>, outcome: proto::Outcome) -> Result<()> {
        let settle = proto::Settle { positions, outcome: outcome.into(), request_id: 0 };
        self.send(proto::consume_request::Request::Settle(settle)).await
    }

    /// Acknowledge one delivery.
    pub async fn ack(&self, delivery: &proto::Delivery) -> Result<()> {
        let position = delivery.position.ok_or_else(|| Error::Protocol("a delivery without a position".into()))?;
        self.settle(vec![position], proto::Outcome::Ack).await
    }

    /// Acknowledge deliveries and wait until the acknowledgement is committed. Returns the
    /// positions this consumer did not hold, and the deliveries that arrived while waiting (in
    /// order: they are the caller's to handle).
    pub async fn ack_confirmed(
        &mut self,
        positions: Vec<proto::Position>,
    ) -> Result<(Vec<proto::Position>, Vec<proto::Delivery>)> {
        self.request_seq += 1;
        let request_id = self.request_seq;
        let settle = proto::Settle { positions, outcome: proto::Outcome::Ack.into(), request_id };
        self.send(proto::consume_request::Request::Settle(settle)).await?;
        let mut arrived = Vec::new();
        loop {
            let Some(event) = self.events.message().await? else {
                return Err(Error::Protocol("the consume stream ended before the settle was answered".into()));
            };
            match event.event {
                Some(proto::consume_event::Event::Settled(settled)) if settled.request_id == request_id => {
                    return Ok((settled.unknown, arrived));
                }
                Some(proto::consume_event::Event::Delivery(delivery)) => arrived.push(delivery),
                Some(proto::consume_event::Event::Cancelled(cancelled)) => {
                    return Err(Error::Protocol(format!("the consumer was cancelled: {}", cancelled.reason)));
                }
                _ => {}
            }
        }
    }
}

/// A transaction begun with [`Client::begin`].
#[derive(Debug)]
pub struct Transaction {
    raw: WharfClient<Channel>,
    id: String,
}

impl Transaction {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stage publishes and acknowledgements; returns the operations staged so far.
    pub async fn stage(&self, publishes: Vec<proto::StagedPublish>, acks: Vec<proto::StagedAck>) -> Result<u32> {
        let request = proto::StageRequest { txn_id: self.id.clone(), publishes, acks };
        Ok(self.raw.clone().stage(request).await?.into_inner().operations)
    }

    /// Prepare it; returns how long the broker waits for the decision, in milliseconds.
    pub async fn prepare(&self) -> Result<u64> {
        let request = proto::PrepareRequest { txn_id: self.id.clone() };
        Ok(self.raw.clone().prepare(request).await?.into_inner().decision_timeout_ms)
    }

    /// Commit it (prepared or not).
    pub async fn commit(self) -> Result<proto::CommitReply> {
        Ok(self.raw.clone().commit(proto::CommitRequest { txn_id: self.id }).await?.into_inner())
    }

    /// Abort it.
    pub async fn abort(self) -> Result<()> {
        self.raw.clone().abort(proto::AbortRequest { txn_id: self.id }).await?;
        Ok(())
    }
}

/// A producer's check-back stream: questions about its group's prepared transactions.
#[derive(Debug)]
pub struct CheckBack {
    answers: mpsc::Sender<proto::CheckBackRequest>,
    questions: tonic::Streaming<proto::CheckBackQuestion>,
}

impl CheckBack {
    /// The next question; `None` when the broker ended the stream.
    pub async fn next(&mut self) -> Result<Option<proto::CheckBackQuestion>> {
        Ok(self.questions.message().await?)
    }

    /// Answer a question.
    pub async fn answer(&self, question: &proto::CheckBackQuestion, decision: proto::Decision) -> Result<()> {
        let answer = proto::CheckBackAnswer { question_id: question.question_id, decision: decision.into() };
        self.answers
            .send(proto::CheckBackRequest { request: Some(proto::check_back_request::Request::Answer(answer)) })
            .await
            .map_err(|_| Error::Protocol("the check-back stream is closed".into()))
    }
}
