//! One AMQP 0-9-1 connection: the handshake (protocol header, start/start-ok, tune/tune-ok,
//! open), heartbeats, the channel state machines, content assembly, deliveries, settlements,
//! publisher confirms and transactions, translated into calls on `wharf_core::Core`. Owns the
//! byte stream it is given; reaches the core only through its public API.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue, tx};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use wharf_core::alarms::Alarms;
use wharf_core::catalogue::{BindingSpec, Destination, ExchangeKind};
use wharf_core::model::{ConnectionId, Message, Position};
use wharf_core::node::{
    ConsumeOptions, ConsumerEvent, ExchangeSpec, PendingPublish, PendingSettle, Published, QueueSpec, Txn,
};
use wharf_core::queue::{ConsumerId, Delivery, Outcome};
use wharf_core::{CoreError, CoreResult};

use crate::broker::Broker;
use crate::frame::{self, FrameError};
use crate::mapping::{self, AmqpError, short};

/// How long a closing connection waits for the peer's close-ok.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// RabbitMQ's text for content frames that no basic.publish announced (505).
const EXPECTED_METHOD_FRAME: &str = "expected method frame, got non method frame instead";

/// Output gathered from waiting events before it is written (one write for many confirms or
/// deliveries).
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Serve one AMQP connection on `stream` until it closes. `peer` names the client in logs.
pub async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(broker: Arc<Broker>, stream: S, peer: String) {
    let _open = broker.track();
    let (reader, writer) = tokio::io::split(stream);
    let mut connection = Connection::new(Arc::clone(&broker), peer);
    let result = connection.run(reader, writer).await;
    if let Err(error) = &result {
        tracing::debug!(peer = %connection.peer, %error, "amqp connection ended");
    }
    connection.teardown().await;
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the protocol header.
    Header,
    /// connection.start sent.
    StartOk,
    /// connection.tune sent.
    TuneOk,
    /// Tuned; waiting for connection.open.
    Open,
    /// Open: channels may be used.
    Active,
    /// connection.close sent; waiting for close-ok.
    Closing,
}

/// What the tasks of a connection report to it.
#[derive(Debug)]
enum Event {
    /// A consumer's delivery.
    Delivery { channel: u16, generation: u64, tag: String, delivery: Delivery },
    /// The broker ended a consumer (its queue was deleted).
    ConsumerGone { channel: u16, generation: u64, tag: String },
    /// A consumer's stop (basic.cancel) is done: every delivery it produced came before this.
    Stopped { channel: u16, generation: u64, tag: String },
    /// A publish is committed (or failed).
    Confirmed { channel: u16, generation: u64, job: PublishJob, result: CoreResult<Published> },
}

/// A publish awaiting its confirmation, in publish order.
#[derive(Debug)]
struct PublishJob {
    /// Publisher-confirm sequence number (0 when the channel is not in confirm mode).
    seq: u64,
    /// The message, kept to return it when mandatory and unroutable.
    returnable: Option<Box<Message>>,
}

/// A consumer as its channel sees it.
#[derive(Debug)]
struct ConsumerHandle {
    /// Orders for its task; dropping it cancels the consumer, returning everything it holds.
    control: mpsc::UnboundedSender<Control>,
    id: ConsumerId,
    no_ack: bool,
    /// The channel's per-consumer prefetch when it started (0: none).
    prefetch: u16,
    /// basic.cancel received, its core stop under way: `Some(nowait)`. cancel-ok goes out when
    /// the stop is done, after the deliveries a no-ack consumer was still owed.
    cancelling: Option<bool>,
    /// Fires when that stop is applied (a channel closing meanwhile waits for it).
    stopped: Option<oneshot::Receiver<()>>,
    _gauge: GaugeGuard,
}

/// One unit of a per-vhost gauge (`wharf_amqp_connections`, `_channels`, `_consumers`) for as
/// long as it lives: counting by guards keeps the gauges right on every path that ends a
/// channel or consumer.
#[derive(Debug)]
struct GaugeGuard {
    name: &'static str,
    vhost: String,
}

impl GaugeGuard {
    fn new(name: &'static str, vhost: &str) -> Self {
        metrics::gauge!(name, "vhost" => vhost.to_owned()).increment(1.0);
        Self { name, vhost: vhost.to_owned() }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.name, "vhost" => self.vhost.clone()).decrement(1.0);
    }
}

/// Count `n` events of a per-vhost counter.
fn count(name: &'static str, vhost: &str, n: u64) {
    metrics::counter!(name, "vhost" => vhost.to_owned()).increment(n);
}

/// What a connection tells a consumer's task.
#[derive(Debug)]
enum Control {
    /// basic.cancel or channel close: stop, keeping these deliveries (the client has them, still
    /// to settle: position and delivery count); `done` fires once the core applied the stop.
    Stop(Vec<(Position, u32)>, oneshot::Sender<()>),
    /// The prefetch the core applies changed (a global basic.qos).
    Prefetch(u32),
}

/// The prefetch the core applies to a consumer: its own, capped by the channel's global one (a
/// consumer never needs more than the channel may have unacked).
fn core_prefetch(consumer: u16, global: u16) -> u32 {
    match (consumer, global) {
        (0, global) => global.into(),
        (consumer, 0) => consumer.into(),
        (consumer, global) => consumer.min(global).into(),
    }
}

/// A basic.publish waiting for its content.
#[derive(Debug)]
struct PendingContent {
    publish: basic::Publish,
    /// The content header's body size and properties, once received.
    header: Option<(u64, AMQPProperties)>,
    body: Vec<u8>,
}

/// One open channel.
#[derive(Debug)]
struct Channel {
    /// Told apart from an earlier channel with the same number, so stale events are dropped.
    generation: u64,
    /// channel.close sent; waiting for close-ok.
    closing: bool,
    pending: Option<PendingContent>,
    next_delivery_tag: u64,
    /// Delivery tag → who holds it and where the message is.
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<String, ConsumerHandle>,
    /// basic.qos with global=false: the prefetch of consumers started afterwards.
    prefetch: u16,
    /// basic.qos with global=true: most unacked deliveries on the channel, all consumers together
    /// (0: no limit).
    prefetch_global: u16,
    /// channel.flow active=false from the client: deliveries wait in `held` until it is true
    /// again (what the specification asks; RabbitMQ refuses it with 540).
    flow_paused: bool,
    /// Deliveries waiting for the channel's window (global prefetch) to open or for
    /// channel.flow to resume, in arrival order.
    held: VecDeque<(String, Delivery)>,
    /// Publisher confirms on; the next sequence number.
    confirm: Option<u64>,
    txn: Option<Txn>,
    /// The mandatory publishes staged in `txn`, by their index among its publishes: returned
    /// (basic.return) at tx.commit when unroutable.
    txn_mandatory: Vec<(usize, Box<Message>)>,
    /// Deliveries settled in `txn`: acks are staged in it, nacks and rejects applied after its
    /// commit; at tx.rollback all are back among the unacked (the spec's "abandon
    /// acknowledgements"); they are requeued if the channel closes first.
    txn_settled: Vec<(u64, Unacked, Outcome)>,
    /// The holder of this channel's basic.get deliveries.
    getter: ConsumerId,
    _gauge: GaugeGuard,
}

/// A delivery the client has not settled yet.
#[derive(Debug, Clone, Copy)]
struct Unacked {
    holder: ConsumerId,
    position: Position,
    /// The delivery count it was delivered with (tells this delivery from a later one).
    delivery_count: u32,
}

impl Channel {
    /// Whether another delivery may go to the client now under the channel-wide prefetch
    /// (`no_ack` deliveries only wait for channel.flow).
    fn window_open(&self, no_ack: bool) -> bool {
        !self.flow_paused
            && (no_ack || self.prefetch_global == 0 || self.unacked.len() < usize::from(self.prefetch_global))
    }

    /// Record a delivery the client must settle.
    fn track(&mut self, tag: u64, holder: ConsumerId, delivery: &Delivery) {
        self.unacked
            .insert(tag, Unacked { holder, position: delivery.position, delivery_count: delivery.delivery_count });
    }
}

/// A connection's state.
struct Connection {
    broker: Arc<Broker>,
    peer: String,
    id: ConnectionId,
    phase: Phase,
    /// Negotiated limits (before tune-ok: the server's).
    frame_max: u32,
    channel_max: u16,
    heartbeat_secs: u16,
    user: String,
    vhost: String,
    channels: HashMap<u16, Channel>,
    next_generation: u64,
    next_consumer_seq: u64,
    next_ctag: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    confirm_tx: mpsc::UnboundedSender<(u16, u64, PublishJob, PendingPublish)>,
    /// Settles queued for commit, awaited in order by the settler task.
    settle_tx: mpsc::UnboundedSender<SettleJob>,
    started: Instant,
    closing_since: Option<Instant>,
    last_read: Instant,
    last_write: Instant,
    /// Bytes to write at the end of this turn.
    out: Vec<u8>,
    /// Counts this connection in `wharf_amqp_connections` once open.
    open_gauge: Option<GaugeGuard>,
    /// The core's alarms as last seen.
    alarms: Alarms,
    /// The client understands connection.blocked (its capabilities say so).
    blocked_capability: bool,
    /// connection.blocked was sent and not yet followed by connection.unblocked.
    blocked_sent: bool,
    /// The client published while an alarm was raised: its socket is not read until the alarm
    /// clears (RabbitMQ's "blocked" state; a connection that only consumes goes on).
    publisher_held: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.peer).field("id", &self.id).finish()
    }
}

/// How a turn ended when the connection must stop.
#[derive(Debug)]
enum Stop {
    /// Close the socket after writing what is queued.
    Close(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Close(reason) => f.write_str(reason),
        }
    }
}

/// Negotiate a tune value as RabbitMQ does: 0 from either side means the other's value, else the
/// smaller.
pub fn negotiate<T: Copy + Ord + Default>(server: T, client: T) -> T {
    let zero = T::default();
    if server == zero {
        client
    } else if client == zero {
        server
    } else {
        server.min(client)
    }
}

/// Check a PLAIN or AMQPLAIN response; returns the user.
fn authenticate(mechanism: &str, response: &[u8], user: &str, pass: &str) -> Result<String, AmqpError> {
    let refused = || {
        AmqpError::new(
            mapping::ACCESS_REFUSED,
            format!(
                "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
            ),
        )
    };
    let (login, password) = match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next();
            let login = parts.next().ok_or_else(refused)?;
            let password = parts.next().ok_or_else(refused)?;
            (login.to_vec(), password.to_vec())
        }
        "AMQPLAIN" => amqplain(response).ok_or_else(refused)?,
        other => {
            return Err(AmqpError::new(
                mapping::COMMAND_INVALID,
                format!("unknown authentication mechanism '{other}'"),
            ));
        }
    };
    if login == user.as_bytes() && password == pass.as_bytes() { Ok(user.to_owned()) } else { Err(refused()) }
}

/// LOGIN and PASSWORD from an AMQPLAIN response (a field table without its length prefix).
fn amqplain(mut bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut login = None;
    let mut password = None;
    while !bytes.is_empty() {
        let name_len = usize::from(*bytes.first()?);
        let name = bytes.get(1..1 + name_len)?;
        let kind = *bytes.get(1 + name_len)?;
        let rest = bytes.get(2 + name_len..)?;
        let (value, used) = match kind {
            b'S' => {
                let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                (rest.get(4..4 + len)?.to_vec(), 4 + len)
            }
            b's' => {
                let len = usize::from(*rest.first()?);
                (rest.get(1..1 + len)?.to_vec(), 1 + len)
            }
            _ => return None,
        };
        match name {
            b"LOGIN" => login = Some(value),
            b"PASSWORD" => password = Some(value),
            _ => {}
        }
        bytes = rest.get(used..)?;
    }
    Some((login?, password?))
}

/// The server-properties of connection.start.
fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        capabilities.insert(name.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    properties.insert("product".into(), AMQPValue::LongString("Wharf".into()));
    properties.insert("version".into(), AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()));
    properties.insert("platform".into(), AMQPValue::LongString("Rust".into()));
    properties
}

fn method(channel: u16, class: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(channel, class)
}

fn class_method_ids(class: &AMQPClass) -> (u16, u16) {
    (class.get_amqp_class_id(), class.get_amqp_method_id())
}

impl Connection {
    fn new(broker: Arc<Broker>, peer: String) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (confirm_tx, confirm_rx) = mpsc::unbounded_channel();
        tokio::spawn(confirmer(confirm_rx, events_tx.clone()));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        tokio::spawn(settler(settle_rx));
        let id = broker.core.new_connection();
        let now = Instant::now();
        Self {
            frame_max: broker.config.frame_max_bytes,
            channel_max: broker.config.channel_max,
            heartbeat_secs: 0,
            broker,
            peer,
            id,
            phase: Phase::Header,
            user: String::new(),
            vhost: String::new(),
            channels: HashMap::new(),
            next_generation: 0,
            next_consumer_seq: 1,
            next_ctag: 1,
            events_tx,
            events_rx,
            confirm_tx,
            settle_tx,
            started: now,
            closing_since: None,
            last_read: now,
            last_write: now,
            out: Vec::new(),
            open_gauge: None,
            alarms: Alarms::default(),
            blocked_capability: false,
            blocked_sent: false,
            publisher_held: false,
        }
    }

    async fn run<R, W>(&mut self, mut reader: R, mut writer: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut shutdown = self.broker.shutdown.subscribe();
        let mut shutdown_seen = false;
        let mut alarms = self.broker.core.alarms().subscribe();
        self.alarms = *alarms.borrow_and_update();
        let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            if !shutdown_seen && *shutdown.borrow_and_update() {
                shutdown_seen = true;
                if let Err(stop) = self.forced_close() {
                    break Err(stop);
                }
            }
            let held = self.publisher_held;
            let turn: Result<(), Stop> = tokio::select! {
                read = read_some(&mut reader, &mut inbuf), if !held => match read {
                    Ok(0) => Err(Stop::Close("peer closed the socket".into())),
                    Ok(_) => {
                        self.last_read = Instant::now();
                        self.on_bytes(&mut inbuf).await
                    }
                    Err(error) => Err(Stop::Close(format!("read failed: {error}"))),
                },
                Some(event) = self.events_rx.recv() => self.on_events(event).await,
                _ = shutdown.changed(), if !shutdown_seen => Ok(()),
                changed = alarms.changed() => {
                    if changed.is_ok() {
                        let now = *alarms.borrow_and_update();
                        self.on_alarms(now);
                    }
                    // Frames that arrived behind the publish that held the connection.
                    if !self.publisher_held && !inbuf.is_empty() { self.on_bytes(&mut inbuf).await } else { Ok(()) }
                }
                _ = tick.tick() => self.on_tick(),
            };
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                if let Err(error) = writer.write_all(&out).await {
                    break Err(Stop::Close(format!("write failed: {error}")));
                }
                let _ = writer.flush().await;
                self.last_write = Instant::now();
            }
            if let Err(stop) = turn {
                break Err(stop);
            }
        };
        let _ = writer.shutdown().await;
        result.map_err(|stop| stop.to_string())
    }

    /// The broker is shutting down.
    fn forced_close(&mut self) -> Result<(), Stop> {
        if self.phase == Phase::Active {
            let error =
                AmqpError::new(mapping::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'");
            self.close_connection(&error, (0, 0));
            Ok(())
        } else {
            Err(Stop::Close("broker shutting down".into()))
        }
    }

    fn on_tick(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if self.phase != Phase::Active && self.phase != Phase::Closing {
            let timeout = Duration::from_secs(self.broker.config.connect_timeout_secs.into());
            if now.duration_since(self.started) > timeout {
                return Err(Stop::Close("handshake timeout".into()));
            }
        }
        if let Some(since) = self.closing_since
            && now.duration_since(since) > CLOSE_OK_TIMEOUT
        {
            return Err(Stop::Close("no connection.close-ok".into()));
        }
        if self.heartbeat_secs > 0 {
            let interval = Duration::from_secs(self.heartbeat_secs.into());
            // A held publisher's socket is not read, so its heartbeats are not seen: RabbitMQ does
            // not time out blocked connections either.
            if !self.publisher_held && now.duration_since(self.last_read) > interval * 2 {
                return Err(Stop::Close("missed heartbeats".into()));
            }
            if now.duration_since(self.last_write) >= interval / 2 {
                self.send(&AMQPFrame::Heartbeat);
            }
        }
        Ok(())
    }

    fn send(&mut self, frame: &AMQPFrame) {
        if let Err(error) = frame::encode(frame, &mut self.out) {
            tracing::error!(%error, "amqp frame not encoded");
        }
    }

    fn send_content(&mut self, channel: u16, message: &Message) {
        let properties = mapping::properties_of(message);
        if let Err(error) = frame::encode_content(channel, properties, &message.payload, self.frame_max, &mut self.out)
        {
            tracing::error!(%error, "amqp content not encoded");
        }
    }

    /// Send connection.close and wait for close-ok.
    fn close_connection(&mut self, error: &AmqpError, (class_id, method_id): (u16, u16)) {
        tracing::debug!(peer = %self.peer, code = error.code.code, text = %error.text, "closing amqp connection");
        let close =
            connection::Close { reply_code: error.code.code, reply_text: short(&error.text), class_id, method_id };
        self.send(&method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))));
        self.phase = Phase::Closing;
        self.closing_since = Some(Instant::now());
    }

    /// Process every complete frame in `inbuf`.
    async fn on_bytes(&mut self, inbuf: &mut Vec<u8>) -> Result<(), Stop> {
        let mut at = 0;
        let result = loop {
            if self.phase == Phase::Header {
                match frame::check_protocol_header(&inbuf[at..]) {
                    Ok(()) => {
                        at += frame::PROTOCOL_HEADER.len();
                        self.send_start();
                        continue;
                    }
                    Err(FrameError::Incomplete) => break Ok(()),
                    Err(_) => {
                        self.out.extend_from_slice(frame::PROTOCOL_HEADER);
                        break Err(Stop::Close("bad protocol header".into()));
                    }
                }
            }
            match frame::decode(&inbuf[at..], self.frame_max) {
                Ok((frame, used)) => {
                    at += used;
                    if let Err(stop) = self.on_frame(frame).await {
                        break Err(stop);
                    }
                    if self.publisher_held {
                        // Held by an alarm: the rest waits, unread, until it clears.
                        break Ok(());
                    }
                }
                Err(FrameError::Incomplete) => break Ok(()),
                Err(error) => {
                    // The stream cannot be resynchronised: close at once.
                    let code = match error {
                        FrameError::Malformed(_) => mapping::SYNTAX_ERROR,
                        _ => mapping::FRAME_ERROR,
                    };
                    if self.phase != Phase::Closing {
                        self.close_connection(&AmqpError::new(code, error.to_string()), (0, 0));
                    }
                    break Err(Stop::Close(error.to_string()));
                }
            }
        };
        inbuf.drain(..at);
        result
    }

    fn send_start(&mut self) {
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: LongString::from("PLAIN AMQPLAIN"),
            locales: LongString::from("en_US"),
        };
        self.send(&method(0, AMQPClass::Connection(connection::AMQPMethod::Start(start))));
        self.phase = Phase::StartOk;
    }

    async fn on_frame(&mut self, frame: AMQPFrame) -> Result<(), Stop> {
        if self.phase == Phase::Closing {
            // Only the end of the close handshake matters now.
            return match frame {
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                    Err(Stop::Close("closed".into()))
                }
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                    self.send(&method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                    ));
                    Err(Stop::Close("closed".into()))
                }
                _ => Ok(()),
            };
        }
        let outcome = match frame {
            AMQPFrame::Heartbeat => Ok(()),
            AMQPFrame::ProtocolHeader(_) | AMQPFrame::InvalidHeartbeat(_) => {
                Err((AmqpError::new(mapping::FRAME_ERROR, "unexpected frame type"), (0, 0)))
            }
            AMQPFrame::Method(0, AMQPClass::Connection(m)) => {
                let ids = class_method_ids(&AMQPClass::Connection(m.clone()));
                return match self.on_connection_method(m).await {
                    Ok(()) => Ok(()),
                    Err(ConnectionOutcome::Stop(stop)) => Err(stop),
                    Err(ConnectionOutcome::Error(error)) => {
                        self.close_connection(&error, ids);
                        Ok(())
                    }
                };
            }
            AMQPFrame::Method(0, class) => Err((
                AmqpError::new(mapping::COMMAND_INVALID, "only connection methods are allowed on channel 0"),
                class_method_ids(&class),
            )),
            AMQPFrame::Header(0, _) | AMQPFrame::Body(0, _) => {
                Err((AmqpError::new(mapping::UNEXPECTED_FRAME, "content frame on channel 0"), (0, 0)))
            }
            _ if self.phase != Phase::Active => {
                Err((AmqpError::new(mapping::COMMAND_INVALID, "channel frame before connection.open"), (0, 0)))
            }
            AMQPFrame::Method(id, class) => self.on_channel_method(id, class).await,
            AMQPFrame::Header(id, header) => {
                self.on_content_header(id, header.body_size, header.class_id, header.properties).await
            }
            AMQPFrame::Body(id, body) => self.on_content_body(id, body).await,
        };
        if let Err((error, ids)) = outcome {
            self.close_connection(&error, ids);
        }
        Ok(())
    }

    async fn on_connection_method(&mut self, m: connection::AMQPMethod) -> Result<(), ConnectionOutcome> {
        use connection::AMQPMethod as M;
        match (self.phase, m) {
            (_, M::Close(_)) => {
                // close-ok only once the connection's acks are committed.
                self.settles_committed().await;
                self.send(&method(0, AMQPClass::Connection(M::CloseOk(connection::CloseOk {}))));
                Err(ConnectionOutcome::Stop(Stop::Close("closed by peer".into())))
            }
            (Phase::StartOk, M::StartOk(start_ok)) => {
                self.blocked_capability = client_capability(&start_ok.client_properties, "connection.blocked");
                let config = &self.broker.config;
                match authenticate(
                    start_ok.mechanism.as_str(),
                    start_ok.response.as_bytes(),
                    &config.default_user,
                    &config.default_pass,
                ) {
                    Ok(user) => self.user = user,
                    Err(error) => return Err(ConnectionOutcome::Error(error)),
                }
                let tune = connection::Tune {
                    channel_max: config.channel_max,
                    frame_max: config.frame_max_bytes,
                    heartbeat: config.heartbeat_secs,
                };
                self.send(&method(0, AMQPClass::Connection(M::Tune(tune))));
                self.phase = Phase::TuneOk;
                Ok(())
            }
            (Phase::TuneOk, M::TuneOk(tune_ok)) => {
                let config = &self.broker.config;
                let frame_max = negotiate(config.frame_max_bytes, tune_ok.frame_max);
                if frame_max < crate::config::FRAME_MIN_SIZE_BYTES {
                    return Err(ConnectionOutcome::Error(AmqpError::new(
                        mapping::NOT_ALLOWED,
                        format!(
                            "negotiated frame_max = {frame_max} is lower than the minimum allowed value ({})",
                            crate::config::FRAME_MIN_SIZE_BYTES
                        ),
                    )));
                }
                self.frame_max = frame_max;
                self.channel_max = negotiate(config.channel_max, tune_ok.channel_max);
                // The client's tune-ok has the last word, 0 (no heartbeats) included, as in RabbitMQ.
                self.heartbeat_secs = tune_ok.heartbeat;
                self.phase = Phase::Open;
                Ok(())
            }
            (Phase::Open, M::Open(open)) => {
                let vhost = open.virtual_host.as_str().to_owned();
                if !self.broker.core.with_catalogue(|c| c.has_vhost(&vhost)) {
                    return Err(ConnectionOutcome::Error(AmqpError::new(
                        mapping::NOT_ALLOWED,
                        format!("vhost {vhost} not found"),
                    )));
                }
                self.open_gauge = Some(GaugeGuard::new("wharf_amqp_connections", &vhost));
                self.vhost = vhost;
                self.send(&method(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {}))));
                self.phase = Phase::Active;
                // An alarm already raised is announced at once.
                self.on_alarms(self.alarms);
                Ok(())
            }
            (Phase::Active, M::UpdateSecret(_)) => {
                self.send(&method(0, AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {}))));
                Ok(())
            }
            (Phase::Active, M::Blocked(_) | M::Unblocked(_)) => Ok(()),
            (_, other) => Err(ConnectionOutcome::Error(AmqpError::new(
                mapping::COMMAND_INVALID,
                format!("unexpected connection method {}", class_method_ids(&AMQPClass::Connection(other)).1),
            ))),
        }
    }

    /// A method on a channel other than 0. Channel-level errors close the channel; an `Err` is
    /// a connection-level error.
    async fn on_channel_method(&mut self, id: u16, class: AMQPClass) -> Result<(), (AmqpError, (u16, u16))> {
        let ids = class_method_ids(&class);
        let hard = |code, text: &str| Err((AmqpError::new(code, text), ids));
        if id > self.channel_max {
            return hard(mapping::CHANNEL_ERROR, "channel number above channel_max");
        }
        let Some(channel) = self.channels.get_mut(&id) else {
            if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = class {
                self.open_channel(id);
                return Ok(());
            }
            return hard(mapping::CHANNEL_ERROR, "expected 'channel.open'");
        };
        if channel.closing {
            match class {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.channels.remove(&id);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.send(&method(id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))));
                }
                _ => {}
            }
            return Ok(());
        }
        if let Some(pending) = &channel.pending {
            // The failing method is the basic.publish whose content was due, as RabbitMQ names it.
            let text = if pending.header.is_some() {
                "expected content body, got non content body frame instead"
            } else {
                "expected content header for class 60, got non content header frame instead"
            };
            return Err((AmqpError::new(mapping::UNEXPECTED_FRAME, text), (60, 40)));
        }
        // A method the client waits for an answer to sees its earlier acks committed (a passive
        // declare counts without them, a crash after the answer keeps them); acks, nacks, rejects
        // and publishes, which have no answer, go on at once.
        if !matches!(
            class,
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(_)
                    | basic::AMQPMethod::Nack(_)
                    | basic::AMQPMethod::Reject(_)
                    | basic::AMQPMethod::Publish(_)
            )
        ) {
            self.settles_committed().await;
        }
        match self.dispatch(id, class).await {
            Ok(()) => Ok(()),
            Err(error) if error.code.hard => Err((error, ids)),
            Err(error) => {
                self.close_channel(id, &error, ids).await;
                Ok(())
            }
        }
    }

    fn open_channel(&mut self, id: u16) {
        self.next_generation += 1;
        let getter = ConsumerId { connection: self.id, seq: u64::from(id) << 40 };
        self.channels.insert(
            id,
            Channel {
                generation: self.next_generation,
                closing: false,
                pending: None,
                next_delivery_tag: 1,
                unacked: BTreeMap::new(),
                consumers: HashMap::new(),
                prefetch: 0,
                prefetch_global: 0,
                flow_paused: false,
                held: VecDeque::new(),
                confirm: None,
                txn: None,
                txn_mandatory: Vec::new(),
                txn_settled: Vec::new(),
                getter,
                _gauge: GaugeGuard::new("wharf_amqp_channels", &self.vhost),
            },
        );
        self.send(&method(id, AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {}))));
    }

    /// Close a channel for a channel-level error: its resources go at once, close-ok is awaited.
    async fn close_channel(&mut self, id: u16, error: &AmqpError, (class_id, method_id): (u16, u16)) {
        tracing::debug!(peer = %self.peer, channel = id, code = error.code.code, text = %error.text, "closing amqp channel");
        self.release_channel(id).await;
        if let Some(channel) = self.channels.get_mut(&id) {
            channel.closing = true;
        }
        let close = channel::Close { reply_code: error.code.code, reply_text: short(&error.text), class_id, method_id };
        self.send(&method(id, AMQPClass::Channel(channel::AMQPMethod::Close(close))));
    }

    /// Release what a channel holds: unacked deliveries return to their queues, consumers are
    /// cancelled, a transaction is dropped.
    async fn release_channel(&mut self, id: u16) {
        let Some(channel) = self.channels.get_mut(&id) else { return };
        channel.pending = None;
        channel.txn = None;
        channel.txn_mandatory.clear();
        channel.held.clear();
        let mut unacked = std::mem::take(&mut channel.unacked);
        unacked.extend(channel.txn_settled.drain(..).map(|(tag, held, _)| (tag, held)));
        let mut by_holder: BTreeMap<ConsumerId, Vec<(Position, u32)>> = BTreeMap::new();
        for (_, unacked) in unacked {
            by_holder.entry(unacked.holder).or_default().push((unacked.position, unacked.delivery_count));
        }
        // First every consumer stops, keeping what the client has: anything else it holds was
        // never seen by the client and goes back as never delivered. Only then are the kept
        // deliveries requeued (redelivered), so a requeued message cannot reach a consumer that
        // is still running and be kept by its stop.
        let mut stops = Vec::new();
        for (_, mut handle) in channel.consumers.drain() {
            match handle.stopped.take() {
                Some(stopped) => stops.push(stopped),
                None => {
                    let keep = by_holder.get(&handle.id).cloned().unwrap_or_default();
                    let (done, stopped) = oneshot::channel();
                    if handle.control.send(Control::Stop(keep, done)).is_ok() {
                        stops.push(stopped);
                    }
                }
            }
        }
        for stopped in stops {
            // Bounded: a stop that cannot be applied (the core stopping) must not hold the channel.
            let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, stopped).await;
        }
        for (holder, held) in by_holder {
            let positions: Vec<Position> = held.into_iter().map(|(position, _)| position).collect();
            if let Err(error) = self.broker.core.settle(holder, &positions, Outcome::Requeue).await {
                tracing::debug!(%error, "requeue on channel close failed");
            }
        }
    }

    /// The connection ended: release every channel and what the connection owns in the core.
    async fn teardown(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id).await;
        }
        self.channels.clear();
        if let Err(error) = self.broker.core.close_connection(self.id).await {
            tracing::debug!(%error, "close_connection failed");
        }
    }

    fn channel(&mut self, id: u16) -> &mut Channel {
        self.channels.get_mut(&id).expect("dispatch runs on an open channel")
    }

    fn reply(&mut self, id: u16, nowait: bool, class: AMQPClass) {
        if !nowait {
            self.send(&method(id, class));
        }
    }

    /// The methods of an open channel.
    async fn dispatch(&mut self, id: u16, class: AMQPClass) -> Result<(), AmqpError> {
        let core = self.broker.core.clone();
        let vhost = self.vhost.clone();
        let connection = Some(self.id);
        let core_err = |e: CoreError| mapping::core_error(&e);
        match class {
            AMQPClass::Channel(m) => match m {
                channel::AMQPMethod::Open(_) => {
                    Err(AmqpError::new(mapping::CHANNEL_ERROR, "second 'channel.open' seen"))
                }
                channel::AMQPMethod::Flow(flow) => {
                    self.channel(id).flow_paused = !flow.active;
                    let ok = channel::FlowOk { active: flow.active };
                    self.send(&method(id, AMQPClass::Channel(channel::AMQPMethod::FlowOk(ok))));
                    self.release_held(id);
                    Ok(())
                }
                channel::AMQPMethod::FlowOk(_) | channel::AMQPMethod::OpenOk(_) => Ok(()),
                channel::AMQPMethod::Close(_) => {
                    self.release_channel(id).await;
                    self.channels.remove(&id);
                    self.send(&method(id, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))));
                    Ok(())
                }
                channel::AMQPMethod::CloseOk(_) => Ok(()),
            },
            AMQPClass::Exchange(m) => match m {
                exchange::AMQPMethod::Declare(d) => {
                    let arguments = mapping::headers_from_table(&d.arguments);
                    let kind = match ExchangeKind::from_declare(d.kind.as_str(), &arguments) {
                        Ok(kind) => kind,
                        // A passive declare names no type worth checking.
                        Err(_) if d.passive => ExchangeKind::Direct,
                        Err(CoreError::InvalidArgument(_)) => {
                            return Err(AmqpError::new(
                                mapping::COMMAND_INVALID,
                                format!("invalid exchange type '{}'", d.kind),
                            ));
                        }
                        Err(error) => return Err(core_err(error)),
                    };
                    let spec = ExchangeSpec {
                        vhost,
                        name: d.exchange.as_str().to_owned(),
                        kind,
                        passive: d.passive,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments,
                    };
                    core.declare_exchange(spec).await.map_err(core_err)?;
                    self.reply(
                        id,
                        d.nowait,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                    );
                    Ok(())
                }
                exchange::AMQPMethod::Delete(d) => {
                    match core.delete_exchange(&vhost, d.exchange.as_str(), d.if_unused).await {
                        // Deleting what does not exist succeeds, as in RabbitMQ.
                        Ok(()) | Err(CoreError::NotFound(_)) => {}
                        Err(error) => return Err(core_err(error)),
                    }
                    self.reply(
                        id,
                        d.nowait,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                    Ok(())
                }
                exchange::AMQPMethod::Bind(b) => {
                    let spec = binding(
                        vhost,
                        b.source.as_str(),
                        Destination::Exchange(b.destination.as_str().to_owned()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    core.bind(spec, connection).await.map_err(core_err)?;
                    self.reply(id, b.nowait, AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})));
                    Ok(())
                }
                exchange::AMQPMethod::Unbind(b) => {
                    let spec = binding(
                        vhost,
                        b.source.as_str(),
                        Destination::Exchange(b.destination.as_str().to_owned()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    core.unbind(spec, connection).await.map_err(core_err)?;
                    self.reply(
                        id,
                        b.nowait,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                    Ok(())
                }
                _ => Err(AmqpError::new(mapping::COMMAND_INVALID, "server-to-client exchange method")),
            },
            AMQPClass::Queue(m) => match m {
                queue::AMQPMethod::Declare(d) => {
                    let spec = QueueSpec {
                        vhost,
                        name: d.queue.as_str().to_owned(),
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        connection,
                        auto_delete: d.auto_delete,
                        arguments: mapping::headers_from_table(&d.arguments),
                    };
                    let declared = core.declare_queue(spec).await.map_err(core_err)?;
                    let ok = queue::DeclareOk {
                        queue: short(&declared.name),
                        message_count: declared.message_count.min(u64::from(u32::MAX)) as u32,
                        consumer_count: declared.consumer_count,
                    };
                    self.reply(id, d.nowait, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)));
                    Ok(())
                }
                queue::AMQPMethod::Bind(b) => {
                    let spec = binding(
                        vhost,
                        b.exchange.as_str(),
                        Destination::Queue(b.queue.as_str().to_owned()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    core.bind(spec, connection).await.map_err(core_err)?;
                    self.reply(id, b.nowait, AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                    Ok(())
                }
                queue::AMQPMethod::Unbind(b) => {
                    let spec = binding(
                        vhost,
                        b.exchange.as_str(),
                        Destination::Queue(b.queue.as_str().to_owned()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    core.unbind(spec, connection).await.map_err(core_err)?;
                    self.reply(id, false, AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
                    Ok(())
                }
                queue::AMQPMethod::Purge(p) => {
                    let count = core.purge(&vhost, p.queue.as_str(), connection).await.map_err(core_err)?;
                    let ok = queue::PurgeOk { message_count: count.min(u64::from(u32::MAX)) as u32 };
                    self.reply(id, p.nowait, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)));
                    Ok(())
                }
                queue::AMQPMethod::Delete(d) => {
                    let count =
                        match core.delete_queue(&vhost, d.queue.as_str(), d.if_unused, d.if_empty, connection).await {
                            Ok(count) => count,
                            // Deleting what does not exist succeeds, as in RabbitMQ.
                            Err(CoreError::NotFound(_)) => 0,
                            Err(error) => return Err(core_err(error)),
                        };
                    let ok = queue::DeleteOk { message_count: count.min(u64::from(u32::MAX)) as u32 };
                    self.reply(id, d.nowait, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)));
                    Ok(())
                }
                _ => Err(AmqpError::new(mapping::COMMAND_INVALID, "server-to-client queue method")),
            },
            AMQPClass::Basic(m) => self.dispatch_basic(id, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let channel = self.channel(id);
                if channel.txn.is_some() {
                    return Err(AmqpError::new(mapping::PRECONDITION_FAILED, "cannot switch from tx to confirm mode"));
                }
                if channel.confirm.is_none() {
                    channel.confirm = Some(1);
                }
                self.reply(id, select.nowait, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})));
                Ok(())
            }
            AMQPClass::Tx(m) => self.dispatch_tx(id, m).await,
            AMQPClass::Access(_) => Err(AmqpError::new(mapping::NOT_IMPLEMENTED, "access.request")),
            other => Err(AmqpError::new(
                mapping::COMMAND_INVALID,
                format!("unexpected method {:?}", class_method_ids(&other)),
            )),
        }
    }

    async fn dispatch_tx(&mut self, id: u16, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        let core = self.broker.core.clone();
        let channel = self.channel(id);
        match m {
            tx::AMQPMethod::Select(_) => {
                if channel.confirm.is_some() {
                    return Err(AmqpError::new(mapping::PRECONDITION_FAILED, "cannot switch from confirm to tx mode"));
                }
                if channel.txn.is_none() {
                    channel.txn = Some(core.begin_txn());
                }
                self.send(&method(id, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {}))));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(txn) = channel.txn.replace(core.begin_txn()) else {
                    return Err(AmqpError::new(mapping::PRECONDITION_FAILED, "channel is not transactional"));
                };
                let mandatory = std::mem::take(&mut channel.txn_mandatory);
                // Once the commit is tried its settlements are its own: committed, or (on
                // failure) the channel closes and the core returns what it still holds.
                let settled = std::mem::take(&mut channel.txn_settled);
                if !txn.is_empty() {
                    let committed = core.commit_txn(txn).await.map_err(|e| mapping::core_error(&e))?;
                    // Routing happens at commit: unroutable mandatory publishes come back now,
                    // before commit-ok, as RabbitMQ does.
                    for (index, message) in mandatory {
                        if committed.published.get(index).is_some_and(Published::unroutable) {
                            self.send_return(id, &message);
                        }
                    }
                }
                // Nacks and rejects follow the committed transaction (the core's transactions
                // carry acks only), still before commit-ok.
                for (_, held, outcome) in settled.into_iter().filter(|(_, _, outcome)| *outcome != Outcome::Ack) {
                    core.settle(held.holder, &[held.position], outcome).await.map_err(|e| mapping::core_error(&e))?;
                }
                self.send(&method(id, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}))));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(txn) = channel.txn.as_mut() else {
                    return Err(AmqpError::new(mapping::PRECONDITION_FAILED, "channel is not transactional"));
                };
                txn.rollback();
                channel.txn_mandatory.clear();
                let settled = std::mem::take(&mut channel.txn_settled);
                channel.unacked.extend(settled.into_iter().map(|(tag, held, _)| (tag, held)));
                self.send(&method(id, AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {}))));
                Ok(())
            }
            _ => Err(AmqpError::new(mapping::COMMAND_INVALID, "server-to-client tx method")),
        }
    }

    async fn dispatch_basic(&mut self, id: u16, m: basic::AMQPMethod) -> Result<(), AmqpError> {
        let core = self.broker.core.clone();
        let vhost = self.vhost.clone();
        match m {
            basic::AMQPMethod::Qos(qos) => {
                let channel = self.channel(id);
                if qos.global {
                    // Channel-wide, for running consumers too: the core's per-consumer prefetch
                    // follows, and the channel's window gates what reaches the client.
                    channel.prefetch_global = qos.prefetch_count;
                    for handle in channel.consumers.values().filter(|handle| !handle.no_ack) {
                        let prefetch = core_prefetch(handle.prefetch, qos.prefetch_count);
                        let _ = handle.control.send(Control::Prefetch(prefetch));
                    }
                } else {
                    // Applies to consumers started afterwards (RabbitMQ's per-consumer QoS).
                    channel.prefetch = qos.prefetch_count;
                }
                // prefetch-size is not read: amq-protocol's codec drops it, as RabbitMQ ignores
                // it (its clients send 0).
                self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}))));
                self.release_held(id);
                Ok(())
            }
            basic::AMQPMethod::Publish(publish) => {
                if publish.immediate {
                    return Err(AmqpError::new(mapping::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.channel(id).pending = Some(PendingContent { publish, header: None, body: Vec::new() });
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) => {
                let mut tag = consume.consumer_tag.as_str().to_owned();
                if tag.is_empty() {
                    tag = format!("amq.ctag-{}-{}-{}", self.id.incarnation, self.id.seq, self.next_ctag);
                    self.next_ctag += 1;
                }
                if self.channel(id).consumers.contains_key(&tag) {
                    return Err(AmqpError::new(mapping::NOT_ALLOWED, format!("attempt to reuse consumer tag '{tag}'")));
                }
                let priority = consumer_priority(&consume.arguments, consume.queue.as_str(), &vhost)?;
                let consumer_id = ConsumerId { connection: self.id, seq: self.next_consumer_seq };
                self.next_consumer_seq += 1;
                let channel = self.channel(id);
                let own_prefetch = channel.prefetch;
                let prefetch = if consume.no_ack { 0 } else { core_prefetch(own_prefetch, channel.prefetch_global) };
                // Exclusivity is the core's to keep (403 while another consumer is attached, and for
                // others while this one is), so it holds for every protocol.
                let options = ConsumeOptions {
                    prefetch,
                    no_ack: consume.no_ack,
                    priority,
                    exclusive: consume.exclusive,
                    credit: None,
                };
                let consumer = core
                    .consume(&vhost, consume.queue.as_str(), consumer_id, options)
                    .await
                    .map_err(|e| mapping::core_error(&e))?;
                let (control, control_rx) = mpsc::unbounded_channel();
                let generation = self.channel(id).generation;
                tokio::spawn(forward_consumer(
                    core.clone(),
                    consumer,
                    control_rx,
                    self.events_tx.clone(),
                    id,
                    generation,
                    tag.clone(),
                ));
                let handle = ConsumerHandle {
                    control,
                    id: consumer_id,
                    no_ack: consume.no_ack,
                    prefetch: own_prefetch,
                    cancelling: None,
                    stopped: None,
                    _gauge: GaugeGuard::new("wharf_amqp_consumers", &vhost),
                };
                self.channel(id).consumers.insert(tag.clone(), handle);
                let ok = basic::ConsumeOk { consumer_tag: short(&tag) };
                self.reply(id, consume.nowait, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)));
                Ok(())
            }
            basic::AMQPMethod::Cancel(cancel) => {
                let tag = cancel.consumer_tag.as_str().to_owned();
                let channel = self.channel(id);
                let Some(handle) = channel.consumers.get_mut(&tag) else {
                    // An unknown tag is not an error (RabbitMQ answers cancel-ok).
                    let ok = basic::CancelOk { consumer_tag: cancel.consumer_tag };
                    self.reply(id, cancel.nowait, AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)));
                    return Ok(());
                };
                if handle.cancelling.is_some() {
                    return Ok(());
                }
                handle.cancelling = Some(cancel.nowait);
                let (holder, no_ack) = (handle.id, handle.no_ack);
                // What the client has stays unacked on the channel, as in RabbitMQ.
                let keep = if no_ack {
                    Vec::new()
                } else {
                    channel
                        .unacked
                        .values()
                        .filter(|held| held.holder == holder)
                        .map(|held| (held.position, held.delivery_count))
                        .collect()
                };
                let (done, stopped) = oneshot::channel();
                let _ = handle.control.send(Control::Stop(keep, done));
                handle.stopped = Some(stopped);
                let (held, others): (VecDeque<_>, VecDeque<_>) =
                    std::mem::take(&mut channel.held).into_iter().partition(|(held_tag, _)| *held_tag == tag);
                channel.held = others;
                if no_ack {
                    // Settled in the core already: the client gets them before cancel-ok. (Held
                    // deliveries of an ack-mode consumer go back to the queue with the stop.)
                    for (held_tag, delivery) in held {
                        self.deliver(id, &held_tag, delivery);
                    }
                }
                Ok(())
            }
            basic::AMQPMethod::Get(get) => {
                let holder = self.channel(id).getter;
                let got = core
                    .get(&vhost, get.queue.as_str(), holder, get.no_ack)
                    .await
                    .map_err(|e| mapping::core_error(&e))?;
                match got {
                    None => {
                        self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))));
                    }
                    Some(delivery) => {
                        let channel = self.channel(id);
                        let tag = channel.next_delivery_tag;
                        channel.next_delivery_tag += 1;
                        if !get.no_ack {
                            channel.track(tag, holder, &delivery);
                        }
                        count("wharf_amqp_deliveries_total", &vhost, 1);
                        let ok = basic::GetOk {
                            delivery_tag: tag,
                            redelivered: delivery.redelivered,
                            exchange: short(&delivery.message.exchange),
                            routing_key: short(&delivery.message.routing_key),
                            message_count: delivery.ready_after.min(u64::from(u32::MAX)) as u32,
                        };
                        self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))));
                        self.send_content(id, &delivery.message);
                    }
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(ack) => self.settle(id, ack.delivery_tag, ack.multiple, Outcome::Ack).await,
            basic::AMQPMethod::Nack(nack) => {
                let outcome = if nack.requeue { Outcome::Requeue } else { Outcome::Reject };
                self.settle(id, nack.delivery_tag, nack.multiple, outcome).await
            }
            basic::AMQPMethod::Reject(reject) => {
                let outcome = if reject.requeue { Outcome::Requeue } else { Outcome::Reject };
                self.settle(id, reject.delivery_tag, false, outcome).await
            }
            basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_) => {
                let tags: Vec<u64> = self.channel(id).unacked.keys().copied().collect();
                if let Some(last) = tags.last() {
                    self.settle(id, *last, true, Outcome::Requeue).await?;
                }
                if matches!(m, basic::AMQPMethod::Recover(_)) {
                    self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {}))));
                }
                Ok(())
            }
            _ => Err(AmqpError::new(mapping::COMMAND_INVALID, "server-to-client basic method")),
        }
    }

    /// basic.ack/nack/reject: `tag` 0 with `multiple` means every outstanding delivery.
    async fn settle(&mut self, id: u16, tag: u64, multiple: bool, outcome: Outcome) -> Result<(), AmqpError> {
        let channel = self.channel(id);
        let taken: Vec<(u64, Unacked)> = if multiple {
            let keep = channel.unacked.split_off(&(tag.saturating_add(1)));
            let taken = std::mem::replace(&mut channel.unacked, keep);
            if tag != 0 && taken.is_empty() {
                return Err(AmqpError::new(mapping::PRECONDITION_FAILED, format!("unknown delivery tag {tag}")));
            }
            taken.into_iter().collect()
        } else {
            match channel.unacked.remove(&tag) {
                Some(held) => vec![(tag, held)],
                None => {
                    return Err(AmqpError::new(mapping::PRECONDITION_FAILED, format!("unknown delivery tag {tag}")));
                }
            }
        };
        let settled_name = match outcome {
            Outcome::Ack => "wharf_amqp_acks_total",
            Outcome::Requeue | Outcome::Reject => "wharf_amqp_rejects_total",
        };
        count(settled_name, &self.vhost, taken.len() as u64);
        let channel = self.channel(id);
        let mut by_holder: BTreeMap<ConsumerId, Vec<Position>> = BTreeMap::new();
        for (_, unacked) in &taken {
            by_holder.entry(unacked.holder).or_default().push(unacked.position);
        }
        if let Some(txn) = channel.txn.as_mut() {
            if outcome == Outcome::Ack {
                for (holder, positions) in &by_holder {
                    txn.ack(*holder, positions);
                }
            }
            channel.txn_settled.extend(taken.into_iter().map(|(tag, held)| (tag, held, outcome)));
            self.release_held(id);
            return Ok(());
        }
        // Queued for commit now and awaited by the settler: the connection goes on at once (an ack
        // has no reply), and whatever it queues afterwards is applied after these.
        for (holder, positions) in by_holder {
            let pending = self.broker.core.settle_queued(holder, &positions, outcome);
            let _ = self.settle_tx.send(SettleJob::Settle(pending.map_err(|e| mapping::core_error(&e))?));
        }
        self.release_held(id);
        Ok(())
    }

    /// Wait until every settle queued so far is committed.
    async fn settles_committed(&self) {
        let (done, committed) = oneshot::channel();
        if self.settle_tx.send(SettleJob::Barrier(done)).is_ok() {
            let _ = committed.await;
        }
    }

    /// Send held deliveries while the channel's window lets them through.
    fn release_held(&mut self, id: u16) {
        loop {
            let Some(channel) = self.channels.get_mut(&id) else { return };
            let Some((tag, _)) = channel.held.front() else { return };
            let no_ack = channel.consumers.get(tag).is_some_and(|handle| handle.no_ack);
            if !channel.window_open(no_ack) {
                return;
            }
            let Some((tag, delivery)) = channel.held.pop_front() else { return };
            self.deliver(id, &tag, delivery);
        }
    }

    /// Send a consumer's delivery to the client (basic.deliver and the content), tracking it
    /// for settlement unless the consumer is no-ack.
    fn deliver(&mut self, id: u16, tag: &str, delivery: Delivery) {
        let Some(channel) = self.channels.get_mut(&id) else { return };
        let Some(handle) = channel.consumers.get(tag) else { return };
        let (holder, no_ack) = (handle.id, handle.no_ack);
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        if !no_ack {
            channel.track(delivery_tag, holder, &delivery);
        }
        count("wharf_amqp_deliveries_total", &self.vhost, 1);
        let deliver = basic::Deliver {
            consumer_tag: short(tag),
            delivery_tag,
            redelivered: delivery.redelivered,
            exchange: short(&delivery.message.exchange),
            routing_key: short(&delivery.message.routing_key),
        };
        self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver))));
        self.send_content(id, &delivery.message);
    }

    /// A consumer ended: its stop after basic.cancel is done (cancel-ok goes out now), or the
    /// broker ended it (`gone`: its queue was deleted; consumer cancel notification).
    fn consumer_ended(&mut self, id: u16, generation: u64, tag: &str, gone: bool) {
        let Some(channel) = self.channels.get_mut(&id) else { return };
        if channel.generation != generation || channel.closing {
            return;
        }
        let Some(handle) = channel.consumers.remove(tag) else { return };
        match handle.cancelling {
            // The client's basic.cancel is done (or overtaken by the queue's deletion).
            Some(nowait) => {
                let ok = basic::CancelOk { consumer_tag: short(tag) };
                self.reply(id, nowait, AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)));
            }
            None if gone => {
                let cancel = basic::Cancel { consumer_tag: short(tag), nowait: true };
                self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel))));
            }
            None => {}
        }
    }

    /// basic.return 312 NO_ROUTE with the message.
    fn send_return(&mut self, id: u16, message: &Message) {
        count("wharf_amqp_returns_total", &self.vhost, 1);
        let ret = basic::Return {
            reply_code: mapping::NO_ROUTE.code,
            reply_text: short(mapping::NO_ROUTE.name),
            exchange: short(&message.exchange),
            routing_key: short(&message.routing_key),
        };
        self.send(&method(id, AMQPClass::Basic(basic::AMQPMethod::Return(ret))));
        self.send_content(id, message);
    }

    async fn on_content_header(
        &mut self,
        id: u16,
        body_size: u64,
        class_id: u16,
        properties: AMQPProperties,
    ) -> Result<(), (AmqpError, (u16, u16))> {
        let size_max = self.broker.core.config().limits.message_size_max_bytes;
        let Some(channel) = self.channels.get_mut(&id) else {
            return Err((AmqpError::new(mapping::CHANNEL_ERROR, "expected 'channel.open'"), (0, 0)));
        };
        if channel.closing {
            return Ok(());
        }
        let Some(pending) = channel.pending.as_mut() else {
            return Err((AmqpError::new(mapping::UNEXPECTED_FRAME, EXPECTED_METHOD_FRAME), (0, 0)));
        };
        if pending.header.is_some() {
            return Err((
                AmqpError::new(mapping::UNEXPECTED_FRAME, "expected content body, got non content body frame instead"),
                (60, 40),
            ));
        }
        if class_id != 60 {
            return Err((
                AmqpError::new(mapping::FRAME_ERROR, format!("content header for class {class_id}, expected 60")),
                (60, 40),
            ));
        }
        if body_size > size_max {
            // Refused before any body is buffered; the channel ignores the rest until close-ok.
            let error = AmqpError::new(
                mapping::PRECONDITION_FAILED,
                format!("message size {body_size} is larger than configured max size {size_max}"),
            );
            channel.pending = None;
            self.close_channel(id, &error, (60, 40)).await;
            return Ok(());
        }
        pending.header = Some((body_size, properties));
        if body_size == 0 {
            self.publish(id).await;
        }
        Ok(())
    }

    async fn on_content_body(&mut self, id: u16, body: Vec<u8>) -> Result<(), (AmqpError, (u16, u16))> {
        let Some(channel) = self.channels.get_mut(&id) else {
            return Err((AmqpError::new(mapping::CHANNEL_ERROR, "expected 'channel.open'"), (0, 0)));
        };
        if channel.closing {
            return Ok(());
        }
        let Some(pending) = channel.pending.as_mut() else {
            return Err((AmqpError::new(mapping::UNEXPECTED_FRAME, EXPECTED_METHOD_FRAME), (0, 0)));
        };
        let Some((body_size, _)) = &pending.header else {
            return Err((
                AmqpError::new(
                    mapping::UNEXPECTED_FRAME,
                    "expected content header for class 60, got non content header frame instead",
                ),
                (60, 40),
            ));
        };
        if pending.body.len() as u64 + body.len() as u64 > *body_size {
            return Err((AmqpError::new(mapping::FRAME_ERROR, "content body exceeds the announced size"), (60, 40)));
        }
        pending.body.extend_from_slice(&body);
        if pending.body.len() as u64 == *body_size {
            self.publish(id).await;
        }
        Ok(())
    }

    /// The core's alarms changed (or the connection just opened): tell a client that understands
    /// it (connection.blocked / unblocked), and let a held publisher go when they clear.
    fn on_alarms(&mut self, alarms: Alarms) {
        self.alarms = alarms;
        if alarms.any() {
            if self.phase == Phase::Active && self.blocked_capability && !self.blocked_sent {
                let blocked = connection::Blocked { reason: short(alarms.reason()) };
                self.send(&method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked))));
                self.blocked_sent = true;
            }
        } else {
            self.publisher_held = false;
            if self.blocked_sent {
                let unblocked = connection::Unblocked {};
                self.send(&method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(unblocked))));
                self.blocked_sent = false;
            }
        }
    }

    /// The content of a basic.publish is complete: publish it.
    async fn publish(&mut self, id: u16) {
        if self.alarms.any() {
            // Taken (it was sent before the client could know), but nothing more is read from
            // this connection until the alarm clears.
            self.publisher_held = true;
        }
        let user = self.user.clone();
        let vhost = self.vhost.clone();
        let Some(channel) = self.channels.get_mut(&id) else { return };
        let Some(pending) = channel.pending.take() else { return };
        let Some((_, properties)) = pending.header else { return };
        let publish = pending.publish;
        let seq = match channel.confirm.as_mut() {
            Some(next) => {
                *next += 1;
                *next - 1
            }
            None => 0,
        };
        let generation = channel.generation;
        let key_source = self.broker.config.idempotency_key_in(&vhost);
        let message = match mapping::message_from_publish(
            publish.exchange.as_str(),
            publish.routing_key.as_str(),
            &properties,
            pending.body,
            &user,
            key_source,
        ) {
            Ok(message) => message,
            Err(error) => {
                self.close_channel(id, &error, (60, 40)).await;
                return;
            }
        };
        count("wharf_amqp_published_total", &vhost, 1);
        if let Some(txn) = channel.txn.as_mut() {
            if publish.mandatory {
                channel.txn_mandatory.push((txn.publish_count(), Box::new(message.clone())));
            }
            txn.publish(&vhost, message);
            return;
        }
        let returnable = publish.mandatory.then(|| Box::new(message.clone()));
        match self.broker.core.publish(&vhost, message).await {
            Ok(pending) => {
                let _ = self.confirm_tx.send((id, generation, PublishJob { seq, returnable }, pending));
            }
            Err(error) => {
                let error = mapping::core_error(&error);
                if error.code.hard {
                    self.close_connection(&error, (60, 40));
                } else {
                    self.close_channel(id, &error, (60, 40)).await;
                }
            }
        }
    }

    /// Handle `first` and whatever other events are already waiting, up to a write's worth of
    /// output: confirms and deliveries then leave in one write, not one write each.
    async fn on_events(&mut self, first: Event) -> Result<(), Stop> {
        self.on_event(first).await?;
        while self.out.len() < WRITE_BATCH_BYTES {
            let Ok(event) = self.events_rx.try_recv() else { break };
            self.on_event(event).await?;
        }
        Ok(())
    }

    async fn on_event(&mut self, event: Event) -> Result<(), Stop> {
        match event {
            Event::Delivery { channel: id, generation, tag, delivery } => {
                let Some(channel) = self.channels.get_mut(&id) else { return Ok(()) };
                if channel.generation != generation || channel.closing {
                    return Ok(());
                }
                let Some(handle) = channel.consumers.get(&tag) else { return Ok(()) };
                if handle.cancelling.is_some() {
                    // Between basic.cancel and cancel-ok: a no-ack consumer's deliveries are owed
                    // to the client; an ack-mode one's went back to the queue with the stop.
                    if handle.no_ack {
                        self.deliver(id, &tag, delivery);
                    }
                    return Ok(());
                }
                if !channel.held.is_empty() || !channel.window_open(handle.no_ack) {
                    channel.held.push_back((tag, delivery));
                    return Ok(());
                }
                self.deliver(id, &tag, delivery);
            }
            Event::ConsumerGone { channel: id, generation, tag } => self.consumer_ended(id, generation, &tag, true),
            Event::Stopped { channel: id, generation, tag } => self.consumer_ended(id, generation, &tag, false),
            Event::Confirmed { channel: id, generation, job, result } => {
                let Some(channel) = self.channels.get(&id) else { return Ok(()) };
                if channel.generation != generation || channel.closing {
                    return Ok(());
                }
                let confirm = channel.confirm.is_some();
                let taken = match &result {
                    Ok(published) => {
                        if let Some(message) = &job.returnable
                            && published.unroutable()
                        {
                            self.send_return(id, message);
                        }
                        published.confirmed()
                    }
                    Err(error) => {
                        tracing::debug!(%error, "publish not committed");
                        false
                    }
                };
                if confirm {
                    let name = if taken { "wharf_amqp_confirms_total" } else { "wharf_amqp_nacks_sent_total" };
                    count(name, &self.vhost, 1);
                    let class = if taken {
                        basic::AMQPMethod::Ack(basic::Ack { delivery_tag: job.seq, multiple: false })
                    } else {
                        basic::AMQPMethod::Nack(basic::Nack { delivery_tag: job.seq, multiple: false, requeue: false })
                    };
                    self.send(&method(id, AMQPClass::Basic(class)));
                }
            }
        }
        Ok(())
    }
}

/// Why connection-method handling stopped.
#[derive(Debug)]
enum ConnectionOutcome {
    /// Close the socket now.
    Stop(Stop),
    /// Send connection.close with this error.
    Error(AmqpError),
}

/// Read what is available into `buf` (cancel-safe: bytes are appended only when a read
/// completes).
async fn read_some<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK_BYTES);
    reader.read_buf(buf).await
}

/// Await confirmations in publish order and report them.
/// What the settler task is given, in order.
#[derive(Debug)]
enum SettleJob {
    /// A settle queued for commit.
    Settle(PendingSettle),
    /// Fire once every settle before it is committed.
    Barrier(oneshot::Sender<()>),
}

/// Await queued settles, in order. A settle that fails to commit is logged: the client was not
/// waiting for it (an ack has no reply), and the delivery stays held until its channel closes.
async fn settler(mut jobs: mpsc::UnboundedReceiver<SettleJob>) {
    while let Some(job) = jobs.recv().await {
        match job {
            SettleJob::Settle(settle) => {
                if let Err(error) = settle.done().await {
                    tracing::debug!(%error, "settle not committed");
                }
            }
            SettleJob::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

async fn confirmer(
    mut jobs: mpsc::UnboundedReceiver<(u16, u64, PublishJob, PendingPublish)>,
    events: mpsc::UnboundedSender<Event>,
) {
    while let Some((channel, generation, job, pending)) = jobs.recv().await {
        let result = pending.confirm().await;
        if events.send(Event::Confirmed { channel, generation, job, result }).is_err() {
            break;
        }
    }
}

/// Forward a consumer's events to its connection until it is stopped (basic.cancel) or cancelled
/// (its handle dropped with its channel or connection).
async fn forward_consumer(
    core: wharf_core::Core,
    mut consumer: wharf_core::node::Consumer,
    mut control: mpsc::UnboundedReceiver<Control>,
    events: mpsc::UnboundedSender<Event>,
    channel: u16,
    generation: u64,
    tag: String,
) {
    loop {
        tokio::select! {
            order = control.recv() => match order {
                Some(Control::Prefetch(prefetch)) => {
                    if let Err(error) = core.set_prefetch(&consumer, prefetch).await {
                        tracing::debug!(%error, "consumer prefetch change failed");
                    }
                }
                Some(Control::Stop(keep, done)) => {
                    let result = consumer.stop(&keep).await;
                    let _ = done.send(());
                    match result {
                        Ok(stopped) => {
                            for delivery in stopped.unread {
                                let _ = events.send(Event::Delivery { channel, generation, tag: tag.clone(), delivery });
                            }
                        }
                        Err(error) => tracing::debug!(%error, "consumer stop failed"),
                    }
                    let _ = events.send(Event::Stopped { channel, generation, tag });
                    return;
                }
                None => {
                    if let Err(error) = consumer.cancel().await {
                        tracing::debug!(%error, "consumer cancel failed");
                    }
                    return;
                }
            },
            event = consumer.recv() => match event {
                Some(ConsumerEvent::Delivery(delivery)) => {
                    let event = Event::Delivery { channel, generation, tag: tag.clone(), delivery };
                    if events.send(event).is_err() {
                        let _ = consumer.cancel().await;
                        return;
                    }
                }
                Some(ConsumerEvent::Cancelled) | None => {
                    let _ = events.send(Event::ConsumerGone { channel, generation, tag });
                    return;
                }
            },
        }
    }
}

/// A basic.consume's `x-priority` argument (RabbitMQ's consumer priority; default 0): an integer,
/// else 406 with RabbitMQ's text.
fn consumer_priority(arguments: &FieldTable, queue: &str, vhost: &str) -> Result<i32, AmqpError> {
    let arguments = mapping::headers_from_table(arguments);
    let Some(value) = arguments.get("x-priority") else { return Ok(0) };
    let invalid = |reason: String| {
        AmqpError::new(
            mapping::PRECONDITION_FAILED,
            format!("invalid arg 'x-priority' for queue '{queue}' in vhost '{vhost}': {reason}"),
        )
    };
    let Some(number) = value.as_i64() else {
        return Err(invalid(format!("{{unacceptable_type,{}}}", wharf_core::catalogue::args::type_name(value))));
    };
    i32::try_from(number).map_err(|_| invalid(format!("{{value_too_large,{number}}}")))
}

/// Whether a client's `capabilities` table (in its client-properties) sets `name` to true.
fn client_capability(client_properties: &FieldTable, name: &str) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(capabilities)) => {
            matches!(capabilities.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

/// A binding as `exchange.bind`/`unbind` and `queue.bind`/`unbind` name it.
fn binding(
    vhost: String,
    source: &str,
    destination: Destination,
    routing_key: &str,
    arguments: &FieldTable,
) -> BindingSpec {
    BindingSpec {
        vhost,
        source: source.to_owned(),
        destination,
        routing_key: routing_key.to_owned(),
        arguments: mapping::headers_from_table(arguments),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tune_negotiation_is_rabbitmq_s() {
        assert_eq!(negotiate(131_072u32, 0), 131_072);
        assert_eq!(negotiate(0u32, 4096), 4096);
        assert_eq!(negotiate(131_072u32, 65_536), 65_536);
        assert_eq!(negotiate(60u16, 120), 60);
        assert_eq!(negotiate(60u16, 0), 60);
        assert_eq!(negotiate(0u16, 0), 0);
    }

    #[test]
    fn plain_and_amqplain_authentication() {
        assert_eq!(authenticate("PLAIN", b"\0guest\0guest", "guest", "guest"), Ok("guest".to_owned()));
        assert_eq!(authenticate("PLAIN", b"\0guest\0nope", "guest", "guest").map_err(|e| e.code.code), Err(403));
        let mut amqplain = Vec::new();
        for (name, value) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
            amqplain.push(name.len() as u8);
            amqplain.extend_from_slice(name.as_bytes());
            amqplain.push(b'S');
            amqplain.extend_from_slice(&(value.len() as u32).to_be_bytes());
            amqplain.extend_from_slice(value.as_bytes());
        }
        assert_eq!(authenticate("AMQPLAIN", &amqplain, "guest", "guest"), Ok("guest".to_owned()));
        assert_eq!(authenticate("EXTERNAL", b"", "guest", "guest").map_err(|e| e.code.code), Err(503));
    }
}
