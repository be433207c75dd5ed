//! One MQTT connection, from CONNECT to close: the session set-up and takeover, inbound PUBLISH
//! (QoS 0, 1, 2 with topic aliases and receive maximum), deliveries to the client (packet ids,
//! inflight window, DUP on resend), SUBSCRIBE/UNSUBSCRIBE, keep-alive, DISCONNECT and wills.
//!
//! It reads and writes a byte stream handed in by the listener (TCP, TLS or a WebSocket bridge)
//! and reaches the core only through `wharf_core::Core`. What must survive the connection lives in
//! the core: the session queue and record, QoS 2 records, retained messages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wharf_core::catalogue::{BindingSpec, Destination};
use wharf_core::model::{ConnectionId, FieldValue, Headers, Position};
use wharf_core::node::{ConsumeOptions, ConsumerEvent, Published, QueueSpec, StateWrite};
use wharf_core::queue::{ConsumerId, Delivery, Outcome};
use wharf_core::{CoreError, CoreResult};

use crate::broker::{Broker, now_ms};
use crate::codec::{
    self, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, Packet, ProtocolVersion, PubResponse, Publish,
    QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe, v3_connack,
};
use crate::mapping;
use crate::session::{self, SessionRecord, StoredSubscription, StoredWill};
use crate::topic;

/// Room made in the read buffer for one read, at first and at least. A read that fills the room
/// doubles it for the next one (up to `READ_CHUNK_BYTES_MAX`), a read that uses under a quarter of
/// it halves it: busy publishers read in large chunks, and an idle connection (most of a device
/// fleet) keeps a small buffer. The buffer itself grows to a whole packet when needed.
const READ_CHUNK_BYTES_MIN: usize = 512;
/// Most room made in the read buffer for one read.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// How long a connection the server closes keeps reading, and discarding, what the client still
/// sends after the server's DISCONNECT (a lingering close, as HTTP servers do). A socket closed
/// while the client's packets keep arriving answers them with a reset, which makes the client's
/// next write fail and, on TCP stacks that flush their queues on a reset, drops the DISCONNECT
/// and its reason code before the client reads it. Long enough for a client to read a backlog of
/// acknowledgements; short enough that a client which never closes holds its slot briefly.
const LINGER: Duration = Duration::from_secs(2);

/// Binding argument carrying the MQTT filter, so two filters with the same AMQP pattern (`a/+`
/// and the literal `a/*`) are distinct bindings.
const BINDING_FILTER: &str = "x-mqtt-filter";

/// Binding argument asking the core for MQTT's `$`-topic rule.
const BINDING_DOLLAR: &str = "x-exclude-dollar-topics";

/// User property on a PUBACK/PUBREC telling the publisher its message was a duplicate of one
/// already stored under the same idempotency key.
pub const USER_PROPERTY_VERDICT: &str = "idempotency-verdict";

/// Serve one MQTT connection until it closes. Never panics on client input.
pub async fn serve<S>(broker: Arc<Broker>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut io = Io { reader, writer, buf: BytesMut::new(), chunk_bytes: READ_CHUNK_BYTES_MIN, out: BytesMut::new() };
    let connect = match read_connect(&broker, &mut io).await {
        Ok(connect) => connect,
        Err(reason) => {
            tracing::debug!(peer, reason, "connection closed before the session started");
            let _ = io.writer.shutdown().await;
            return;
        }
    };
    broker.stats.clients_connected.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("wharf_mqtt_connections").increment(1.0);
    let client = connect.client_id.clone();
    // The futures of a connection's phases are boxed, and nothing large is held across an await
    // (a match on `open.await` would hold its result while the connection runs), so that an idle
    // connection holds no room for the phases it is not in: memory per idle connection.
    let open = Box::pin(Connection::open(Arc::clone(&broker), io, *connect));
    let opened = open.await.map(Box::new);
    match opened {
        Ok(connection) => Box::pin(connection.run()).await,
        Err(error) => tracing::info!(peer, client, %error, "connection refused"),
    }
    broker.stats.clients_connected.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!("wharf_mqtt_connections").decrement(1.0);
}

/// The socket halves and buffers.
struct Io<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    buf: BytesMut,
    /// Room made in `buf` for the next read (see `READ_CHUNK_BYTES_MIN`).
    chunk_bytes: usize,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite> Io<S> {
    /// Read more bytes; `false` at end of stream or on an error.
    async fn fill(&mut self) -> bool {
        if self.buf.is_empty() && self.buf.capacity() > 2 * self.chunk_bytes {
            // A burst is over: give its large buffer back.
            self.buf = BytesMut::new();
        }
        self.buf.reserve(self.chunk_bytes);
        let room = self.buf.capacity() - self.buf.len();
        match self.reader.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                if n >= room {
                    self.chunk_bytes = (self.chunk_bytes * 2).min(READ_CHUNK_BYTES_MAX);
                } else if n < self.chunk_bytes / 4 {
                    self.chunk_bytes = (self.chunk_bytes / 2).max(READ_CHUNK_BYTES_MIN);
                }
                true
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await?;
            self.out.clear();
        }
        self.writer.flush().await
    }

    /// After the write side is shut down: read and discard until the client closes its side, the
    /// stream fails, or `LINGER` has passed.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER;
        loop {
            self.buf.clear();
            if !matches!(tokio::time::timeout_at(deadline, self.fill()).await, Ok(true)) {
                return;
            }
        }
    }
}

/// Read the CONNECT packet within the connect timeout, answering a refused one as the version
/// allows. The CONNECT is validated further by `Connection::open`.
async fn read_connect<S: AsyncRead + AsyncWrite>(broker: &Broker, io: &mut Io<S>) -> Result<Box<Connect>, String> {
    let timeout = Duration::from_secs(broker.config.connect_timeout_secs.into());
    let deadline = Instant::now() + timeout;
    loop {
        match codec::decode(&mut io.buf, None, broker.config.packet_size_max_bytes) {
            Ok(Some(Packet::Connect(connect))) => {
                count_in("CONNECT", 0);
                return Ok(connect);
            }
            // The decoder refuses everything but CONNECT before a CONNECT.
            Ok(Some(other)) => return Err(format!("{} before CONNECT", other.name())),
            Ok(None) => {}
            Err(error) => {
                let version = peek_connect_version(&io.buf);
                let connack = match (&error, version) {
                    // Not MQTT at all: close without a CONNACK [MQTT-3.1.2-1].
                    (DecodeError::UnknownProtocolName(_), _) => None,
                    (DecodeError::UnsupportedProtocolVersion { .. }, _) => Some((
                        ProtocolVersion::V3_1_1,
                        ConnAck {
                            reason_code: ReasonCode(v3_connack::UNACCEPTABLE_PROTOCOL_VERSION),
                            ..ConnAck::default()
                        },
                    )),
                    // MQTT 5: CONNACK with the reason, then close [MQTT-4.13.1-1]; 3.1.1: close.
                    (_, Some(ProtocolVersion::V5)) => {
                        Some((ProtocolVersion::V5, ConnAck { reason_code: error.reason_code(), ..ConnAck::default() }))
                    }
                    _ => None,
                };
                if let Some((version, connack)) = connack {
                    send_raw(io, &Packet::ConnAck(connack), version);
                    let _ = io.flush().await;
                }
                return Err(format!("bad CONNECT: {error}"));
            }
        }
        match tokio::time::timeout_at(deadline, io.fill()).await {
            Ok(true) => {}
            Ok(false) => return Err("closed before CONNECT".into()),
            Err(_) => return Err("no CONNECT within mqtt.connect_timeout_secs".into()),
        }
    }
}

/// The protocol level of a (possibly malformed) CONNECT at the start of `buf`, if readable.
fn peek_connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    let mut at = 1;
    loop {
        let byte = *buf.get(at)?;
        at += 1;
        if byte & 0x80 == 0 || at > 4 {
            break;
        }
    }
    let name_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    match buf.get(at + 2 + name_len)? {
        5 => Some(ProtocolVersion::V5),
        4 => Some(ProtocolVersion::V3_1_1),
        3 => Some(ProtocolVersion::V3_1),
        _ => None,
    }
}

/// Encode `packet` into the output buffer and count it; the bytes written.
fn send_raw<S>(io: &mut Io<S>, packet: &Packet, version: ProtocolVersion) -> usize {
    let before = io.out.len();
    codec::encode(packet, version, &mut io.out);
    let written = io.out.len() - before;
    count_out(packet.name(), written);
    written
}

fn count_in(kind: &'static str, bytes: usize) {
    metrics::counter!("wharf_mqtt_packets_received_total", "type" => kind).increment(1);
    metrics::counter!("wharf_mqtt_bytes_received_total").increment(bytes as u64);
}

fn count_out(kind: &'static str, bytes: usize) {
    metrics::counter!("wharf_mqtt_packets_sent_total", "type" => kind).increment(1);
    metrics::counter!("wharf_mqtt_bytes_sent_total").increment(bytes as u64);
}

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT (`publish_will` for MQTT 5 reason 0x04).
    Disconnect { publish_will: bool },
    /// The stream ended or failed without DISCONNECT.
    Lost,
    /// The server closes it (protocol error, keep-alive, takeover, shutdown): MQTT 5 clients get
    /// DISCONNECT with this reason first.
    Server(ReasonCode, String),
}

/// Where a consumer's deliveries come from.
#[derive(Debug, Clone)]
enum Source {
    /// The session queue.
    Session,
    /// A shared subscription's queue, by its full `$share/...` filter.
    Shared(String),
}

/// Something the connection's loop reacts to, sent by its helper tasks.
///
/// Events travel boxed ([`EventSender`]): an unbounded channel allocates room for 32 of its items
/// when it is made, and every connection has one.
#[derive(Debug)]
enum Event {
    /// A message for the client.
    Delivery(Delivery),
    /// A consumer was cancelled by the broker (its queue deleted).
    ConsumerGone(u64),
    /// An inbound PUBLISH was committed (or failed).
    Published { packet_id: Option<u16>, qos: QoS, result: CoreResult<Published> },
    /// An inbound QoS 2 PUBREL is recorded: send PUBCOMP.
    Released { packet_id: u16, result: CoreResult<()> },
    /// An outbound QoS 2 PUBREC is recorded: send PUBREL.
    Received { packet_id: u16, result: CoreResult<()> },
    /// An outbound QoS 2 PUBCOMP is recorded: the packet id is free.
    Completed { packet_id: u16, result: CoreResult<()> },
}

/// Where a connection's events are sent.
type EventSender = mpsc::UnboundedSender<Box<Event>>;

/// A delivery sent with QoS 1 or 2 and not yet acknowledged by PUBACK / PUBREC.
#[derive(Debug, Clone, Copy)]
struct Inflight {
    consumer: ConsumerId,
    position: Position,
    qos: QoS,
}

/// A running consumer task.
#[derive(Debug)]
struct ConsumerTask {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The state of one connected client.
struct Connection<S> {
    broker: Arc<Broker>,
    io: Io<S>,
    version: ProtocolVersion,
    client_id: String,
    connection_id: ConnectionId,
    seq: u64,
    record: SessionRecord,
    keep_alive: Option<Duration>,
    last_packet: Instant,
    /// The client's limits on what we send.
    client_receive_maximum: u16,
    client_packet_size_max: u32,
    client_topic_alias_max: u16,
    problem_information: bool,
    /// Topic aliases: client to server, and server to client.
    aliases_in: HashMap<u16, String>,
    aliases_out: HashMap<String, u16>,
    /// Inbound QoS 1/2 PUBLISHes not yet fully acknowledged (MQTT 5 Receive Maximum).
    inbound_unacked: usize,
    /// Inbound QoS 2 packet ids between PUBLISH and PUBREL (retransmissions are not republished),
    /// with whether PUBREC was sent.
    inbound_qos2: HashMap<u16, bool>,
    /// Epoch of each inbound QoS 2 packet id (part of the idempotency key; bumped at PUBREL).
    epochs: HashMap<u16, u32>,
    /// Outbound QoS 1/2 awaiting PUBACK / PUBREC.
    inflight: HashMap<u16, Inflight>,
    /// Outbound QoS 2 awaiting PUBCOMP (PUBREL sent), with the position of the message.
    released: HashMap<u16, Position>,
    /// Deliveries waiting for room in the inflight window or for their packet id to be free.
    parked: VecDeque<Delivery>,
    /// Acknowledgements to the core, sent in batches.
    settles: Vec<(ConsumerId, Position)>,
    subscriptions: BTreeMap<String, StoredSubscription>,
    consumers: HashMap<u64, (Source, ConsumerTask)>,
    next_consumer_seq: u64,
    events_tx: EventSender,
    events: mpsc::UnboundedReceiver<Box<Event>>,
    /// The confirmer and recorder tasks, started on first use: a connection that never publishes
    /// (or never uses QoS 2) does not pay for them.
    confirms: Option<mpsc::UnboundedSender<(Option<u16>, QoS, PublishOutcome)>>,
    recorder: Option<mpsc::UnboundedSender<(StateWrite, Recorded)>>,
    takeover: oneshot::Receiver<()>,
    done: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Connection<S> {
    /// Validate CONNECT, take the client id over, set the session up and answer CONNACK.
    async fn open(broker: Arc<Broker>, mut io: Io<S>, connect: Connect) -> Result<Self, String> {
        let version = connect.protocol.unwrap_or(ProtocolVersion::V3_1_1);
        let config = broker.config.clone();
        let refuse = |io: &mut Io<S>, v5: ReasonCode, v3: u8| {
            let code = if version.is_v5() { v5 } else { ReasonCode(v3) };
            send_raw(io, &Packet::ConnAck(ConnAck { reason_code: code, ..ConnAck::default() }), version);
        };
        // Client identifier [MQTT-3.1.3-6], [MQTT-3.1.3-8]: an empty one is assigned, except in
        // 3.1 and for a 3.1.1 persistent session, where it is refused.
        let mut client_id = connect.client_id.clone();
        let mut assigned = None;
        if client_id.is_empty() {
            if version == ProtocolVersion::V3_1 || (version == ProtocolVersion::V3_1_1 && !connect.clean_start) {
                refuse(&mut io, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, v3_connack::IDENTIFIER_REJECTED);
                let _ = io.flush().await;
                return Err("empty client identifier".into());
            }
            client_id = format!("wharf-{}", broker.core().new_connection());
            assigned = Some(client_id.clone());
        }
        if client_id.len() > usize::from(config.client_id_len_max_bytes) {
            refuse(&mut io, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, v3_connack::IDENTIFIER_REJECTED);
            let _ = io.flush().await;
            return Err(format!(
                "client identifier longer than mqtt.client_id_len_max_bytes ({})",
                config.client_id_len_max_bytes
            ));
        }
        // Enhanced authentication is not offered [MQTT-4.12.0-1].
        if connect.properties.authentication_method.is_some() {
            refuse(&mut io, ReasonCode::BAD_AUTHENTICATION_METHOD, v3_connack::NOT_AUTHORIZED);
            let _ = io.flush().await;
            return Err("enhanced authentication requested".into());
        }
        if let Some(will) = &connect.will
            && will.topic.starts_with('$')
        {
            refuse(&mut io, ReasonCode::TOPIC_NAME_INVALID, v3_connack::NOT_AUTHORIZED);
            let _ = io.flush().await;
            return Err("will topic starts with $".into());
        }

        // Session expiry: MQTT 5 asks; 3.1.1 has only clean (ends at disconnect) or persistent.
        let requested_expiry_secs = if version.is_v5() {
            connect.properties.session_expiry_interval_secs.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry_secs = requested_expiry_secs.min(config.session_expiry_max_secs);

        // Keep alive, capped (MQTT 5 tells the client with Server Keep Alive).
        let mut keep_alive_secs = connect.keep_alive_secs;
        let mut server_keep_alive = None;
        if version.is_v5()
            && config.keep_alive_max_secs > 0
            && (keep_alive_secs == 0 || keep_alive_secs > config.keep_alive_max_secs)
        {
            keep_alive_secs = config.keep_alive_max_secs;
            server_keep_alive = Some(keep_alive_secs);
        }

        let will = connect.will.as_ref().map(|will| {
            let p = &will.properties;
            let properties = codec::PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval_secs: p.message_expiry_interval_secs,
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user_properties.clone(),
                content_type: p.content_type.clone(),
                ..codec::PublishProperties::default()
            };
            StoredWill {
                topic: will.topic.clone(),
                retain: will.retain,
                delay_secs: p.will_delay_interval_secs.unwrap_or(0),
                message: mapping::message_from_publish(
                    &config.exchange,
                    &will.topic,
                    will.qos,
                    will.retain,
                    &properties,
                    will.payload.clone(),
                    &client_id,
                ),
            }
        });
        let seq = broker.next_connection_seq();
        let (done, done_rx) = watch::channel(false);
        let takeover = broker.register(&client_id, seq, done_rx).await;
        let guard = broker.client_lock(&client_id).await;
        let resuming = !connect.clean_start;
        broker.cancel_pending(&client_id, resuming).await;
        let connection_id = broker.core().new_connection();
        let (record, session_present) =
            match setup_session(&broker, &client_id, resuming, expiry_secs, connection_id, will).await {
                Ok(found) => found,
                Err(error) => {
                    drop(guard);
                    broker.unregister(&client_id, seq);
                    let _ = done.send(true);
                    refuse(&mut io, ReasonCode::SERVER_UNAVAILABLE, v3_connack::SERVER_UNAVAILABLE);
                    let _ = io.flush().await;
                    return Err(format!("session set-up failed: {error}"));
                }
            };
        drop(guard);
        let vhost = &config.vhost;
        let core = broker.core();
        let epochs =
            session::by_packet_id(core.state_scan(vhost, &session::inbound_qos2_prefix(&client_id)), |value| {
                session::decode_epoch(value)
            });
        let released = session::by_packet_id(core.state_scan(vhost, &session::released_prefix(&client_id)), |value| {
            session::decode_position(value)
        });

        let (events_tx, events) = mpsc::unbounded_channel();
        let props = &connect.properties;
        let mut connection = Self {
            version,
            client_id: client_id.clone(),
            connection_id,
            seq,
            subscriptions: record.subscriptions.clone(),
            record,
            keep_alive: (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500)),
            last_packet: Instant::now(),
            client_receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
            client_packet_size_max: props.maximum_packet_size.unwrap_or(u32::MAX),
            client_topic_alias_max: props.topic_alias_maximum.unwrap_or(0),
            problem_information: props.request_problem_information.unwrap_or(true),
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            inbound_unacked: 0,
            inbound_qos2: HashMap::new(),
            epochs,
            inflight: HashMap::new(),
            released,
            parked: VecDeque::new(),
            settles: Vec::new(),
            consumers: HashMap::new(),
            next_consumer_seq: 0,
            events_tx,
            events,
            confirms: None,
            recorder: None,
            takeover,
            done,
            shutdown: broker.shutdown.subscribe(),
            io,
            broker,
        };

        let mut properties = ConnAckProperties::default();
        if version.is_v5() {
            properties = ConnAckProperties {
                session_expiry_interval_secs: (expiry_secs != requested_expiry_secs).then_some(expiry_secs),
                receive_maximum: Some(config.receive_maximum),
                maximum_packet_size: Some(config.packet_size_max_bytes),
                assigned_client_identifier: assigned,
                topic_alias_maximum: Some(config.topic_alias_max),
                retain_available: Some(true),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                server_keep_alive_secs: server_keep_alive,
                response_information: (props.request_response_information == Some(true))
                    .then(|| format!("response/{client_id}")),
                ..ConnAckProperties::default()
            };
        }
        connection.send(Packet::ConnAck(ConnAck { session_present, reason_code: ReasonCode::SUCCESS, properties }));
        // Resume QoS 2 exchanges that had reached PUBREL [MQTT-4.4.0-1]; redelivered PUBLISHes follow
        // from the session queue with their original packet ids.
        let mut pending_releases: Vec<u16> = connection.released.keys().copied().collect();
        pending_releases.sort_unstable();
        for packet_id in pending_releases {
            connection.send(Packet::PubRel(PubResponse { packet_id, ..PubResponse::default() }));
        }
        if let Err(error) = connection.start_consumers().await {
            connection.finish(Close::Server(ReasonCode::SERVER_BUSY, format!("consuming failed: {error}"))).await;
            return Err(format!("consuming failed: {error}"));
        }
        Ok(connection)
    }

    /// Declare a shared subscription's queue again and consume it.
    async fn reattach_shared(&mut self, filter: String) {
        let attached = match self.ensure_shared_queue(&filter).await {
            Ok(queue) => self.consume(Source::Shared(filter.clone()), queue).await,
            Err(error) => Err(error),
        };
        if let Err(error) = attached {
            tracing::warn!(client = self.client_id, filter, %error, "re-attaching a shared subscription failed");
        }
    }

    /// The task confirming this connection's publishes in order, started on first use.
    fn confirmer(&mut self) -> &mpsc::UnboundedSender<(Option<u16>, QoS, PublishOutcome)> {
        self.confirms.get_or_insert_with(|| spawn_confirmer(self.events_tx.clone()))
    }

    /// The task recording this connection's QoS 2 state in order, started on first use.
    fn recorder(&mut self) -> &mpsc::UnboundedSender<(StateWrite, Recorded)> {
        self.recorder.get_or_insert_with(|| {
            spawn_recorder(self.broker.core().clone(), self.broker.config.vhost.clone(), self.events_tx.clone())
        })
    }

    /// Attach the session queue's consumer and one per shared subscription.
    async fn start_consumers(&mut self) -> CoreResult<()> {
        self.consume(Source::Session, session::session_queue(&self.client_id)).await?;
        let shared: Vec<String> =
            self.subscriptions.keys().filter(|f| codec::topic::parse_shared(f).is_some()).cloned().collect();
        for filter in shared {
            let queue = self.ensure_shared_queue(&filter).await?;
            self.consume(Source::Shared(filter), queue).await?;
        }
        Ok(())
    }

    fn window(&self) -> usize {
        usize::from(self.client_receive_maximum.min(self.broker.config.inflight_max))
    }

    async fn consume(&mut self, source: Source, queue: String) -> CoreResult<()> {
        let seq = self.next_consumer_seq;
        self.next_consumer_seq += 1;
        let id = ConsumerId { connection: self.connection_id, seq };
        let options = ConsumeOptions { prefetch: self.window() as u32, no_ack: false, ..ConsumeOptions::default() };
        let mut consumer = self.broker.core().consume(&self.broker.config.vhost, &queue, id, options).await?;
        let events = self.events_tx.clone();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = consumer.recv() => match event {
                        Some(ConsumerEvent::Delivery(delivery)) => {
                            if events.send(Box::new(Event::Delivery(delivery))).is_err() {
                                break;
                            }
                        }
                        Some(ConsumerEvent::Cancelled) | None => {
                            let _ = events.send(Box::new(Event::ConsumerGone(seq)));
                            return;
                        }
                    },
                    _ = &mut stopped => break,
                }
            }
            // Deliveries not acknowledged return to the queue for the next connection. (Boxed:
            // inline, every consumer task would hold room for it while it waits for deliveries.)
            let cancel = Box::pin(consumer.cancel());
            let _ = cancel.await;
        });
        self.consumers.insert(seq, (source, ConsumerTask { stop: Some(stop), task }));
        Ok(())
    }

    async fn stop_consumer(&mut self, seq: u64) {
        if let Some((_, mut consumer)) = self.consumers.remove(&seq) {
            if let Some(stop) = consumer.stop.take() {
                let _ = stop.send(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), consumer.task).await;
        }
    }

    /// The event loop: serve the connection until it ends. Takes the connection boxed: an async
    /// fn holds its arguments twice, and this future lives as long as the connection.
    async fn run(mut self: Box<Self>) {
        let close = 'session: loop {
            if let Err(error) = self.io.flush().await {
                tracing::debug!(client = self.client_id, %error, "write failed");
                break Close::Lost;
            }
            self.flush_settles();
            // Packets already buffered go first: a client may send SUBSCRIBE right behind CONNECT
            // in one segment, and a paused reader leaves whole packets behind.
            if !self.input_paused() && !self.io.buf.is_empty() {
                let input = Box::pin(self.handle_input());
                if let Some(close) = input.await {
                    break close;
                }
                if let Err(error) = self.io.flush().await {
                    tracing::debug!(client = self.client_id, %error, "write failed");
                    break Close::Lost;
                }
            }
            let keep_alive_deadline = self.keep_alive.map(|k| self.last_packet + k);
            let paused = self.input_paused();
            tokio::select! {
                filled = self.io.fill(), if !paused => {
                    if !filled {
                        break Close::Lost;
                    }
                    // Boxed, as a large future that runs briefly: inline, an idle connection
                    // would hold room for it while it waits.
                    // (A separate statement: a temporary lives until its statement ends, and
                    // one held across the await would be in this future after all.)
                    let input = Box::pin(self.handle_input());
                    if let Some(close) = input.await {
                        break close;
                    }
                }
                Some(event) = self.events.recv() => {
                    if let Some(close) = self.handle_event(*event).await {
                        break close;
                    }
                    // Take whatever else is ready before writing.
                    while let Ok(event) = self.events.try_recv() {
                        if let Some(close) = self.handle_event(*event).await {
                            break 'session close;
                        }
                    }
                }
                () = sleep_until(keep_alive_deadline) => {
                    break Close::Server(ReasonCode::KEEP_ALIVE_TIMEOUT, "keep alive timeout".into());
                }
                _ = &mut self.takeover => {
                    break Close::Server(ReasonCode::SESSION_TAKEN_OVER, "session taken over".into());
                }
                _ = self.shutdown.changed() => {
                    break Close::Server(ReasonCode::SERVER_SHUTTING_DOWN, "server shutting down".into());
                }
            }
        };
        // Boxed: the teardown's future is large and runs once; inline, every connection would
        // carry room for it all its life.
        let finish = Box::pin((*self).finish(close));
        finish.await;
    }

    /// Decode and handle every complete packet in the buffer.
    /// MQTT 3.1.1 has no Receive Maximum: its flow control is to stop reading (and decoding) while
    /// `mqtt.receive_maximum` PUBLISHes wait for their commit.
    fn input_paused(&self) -> bool {
        !self.version.is_v5() && self.inbound_unacked >= usize::from(self.broker.config.receive_maximum)
    }

    async fn handle_input(&mut self) -> Option<Close> {
        loop {
            if self.input_paused() {
                return None;
            }
            let before = self.io.buf.len();
            match codec::decode(&mut self.io.buf, Some(self.version), self.broker.config.packet_size_max_bytes) {
                Ok(Some(packet)) => {
                    count_in(packet.name(), before - self.io.buf.len());
                    self.broker.stats.bytes_received.fetch_add((before - self.io.buf.len()) as u64, Ordering::Relaxed);
                    self.last_packet = Instant::now();
                    if let Some(close) = self.handle_packet(packet).await {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(error) => {
                    tracing::debug!(client = self.client_id, %error, "malformed packet");
                    return Some(Close::Server(error.reason_code(), error.to_string()));
                }
            }
        }
    }

    async fn handle_packet(&mut self, packet: Packet) -> Option<Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await,
            Packet::PubAck(ack) => {
                self.on_ack(ack.packet_id, QoS::AtLeastOnce);
                None
            }
            Packet::PubRec(rec) => self.on_pubrec(rec).await,
            Packet::PubRel(rel) => self.on_pubrel(rel.packet_id),
            Packet::PubComp(comp) => self.on_pubcomp(comp.packet_id),
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe).await,
            Packet::PingReq => {
                self.send(Packet::PingResp);
                None
            }
            Packet::Disconnect(disconnect) => self.on_disconnect(&disconnect),
            // [MQTT-3.1.0-2]: a second CONNECT is a protocol error.
            Packet::Connect(_) => Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "second CONNECT".into())),
            // No authentication method was agreed, so AUTH is a protocol error [MQTT-3.15.0-?].
            Packet::Auth(_) => {
                Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "AUTH without an authentication method".into()))
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "server-to-client packet received".into()))
            }
        }
    }

    // ----- inbound PUBLISH ---------------------------------------------------------------------

    async fn on_publish(&mut self, mut publish: Publish) -> Option<Close> {
        self.broker.stats.messages_received.fetch_add(1, Ordering::Relaxed);
        // Topic aliases [MQTT-3.3.2-7..-12].
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.broker.config.topic_alias_max {
                return Some(Close::Server(
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    format!("topic alias {alias} out of range"),
                ));
            }
            if publish.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        return Some(Close::Server(ReasonCode::PROTOCOL_ERROR, format!("unknown topic alias {alias}")));
                    }
                }
            } else {
                self.aliases_in.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() {
            return Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "empty topic without alias".into()));
        }
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        if qos != QoS::AtMostOnce {
            // MQTT 5 Receive Maximum [MQTT-3.3.4-7]: the client may not exceed it.
            if self.version.is_v5() && self.inbound_unacked >= usize::from(self.broker.config.receive_maximum) {
                return Some(Close::Server(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded".into()));
            }
        }
        if qos == QoS::ExactlyOnce {
            let id = packet_id.unwrap_or(0);
            // A retransmission of a PUBLISH already taken (its PUBREC pending or sent) is not
            // published again [MQTT-4.3.3-10]; PUBREC is sent (again) once it is committed.
            if let Some(&pubrec_sent) = self.inbound_qos2.get(&id) {
                if pubrec_sent {
                    self.send(Packet::PubRec(PubResponse { packet_id: id, ..PubResponse::default() }));
                }
                return None;
            }
            self.inbound_qos2.insert(id, false);
        }
        if qos != QoS::AtMostOnce {
            self.inbound_unacked += 1;
        }
        // `$` topics are the server's [MQTT-4.7.2-1]; clients may not publish into `$SYS`.
        if publish.topic.starts_with("$SYS") {
            self.outcome(packet_id, qos, Err(CoreError::AccessRefused("$SYS topics are the server's".into())));
            return None;
        }
        let mut message = mapping::message_from_publish(
            &self.broker.config.exchange,
            &publish.topic,
            qos,
            publish.retain,
            &publish.properties,
            publish.payload,
            &self.client_id,
        );
        if qos == QoS::ExactlyOnce && message.idempotency_key.is_none() {
            // Exactly-once across reconnects and restarts: a retransmission carries the same
            // packet id in the same epoch, so the core stores it once.
            let id = packet_id.unwrap_or(0);
            let epoch = self.epochs.get(&id).copied().unwrap_or(0);
            message.idempotency_key = Some(format!("mqtt:{}:{id}:{epoch}", self.record.uid));
        }
        if publish.retain
            && let Err(error) = self.broker.store_retained(&publish.topic, &message).await
        {
            self.outcome(packet_id, qos, Err(error));
            return None;
        }
        // In order even across a failure: the connection closes on one, and its client resends.
        match self.broker.core().publish_ordered(&self.broker.config.vhost, message, self.connection_id).await {
            Ok(pending) => {
                let _ = self.confirmer().send((packet_id, qos, PublishOutcome::Pending(pending)));
            }
            Err(error) => self.outcome(packet_id, qos, Err(error)),
        }
        None
    }

    /// An inbound PUBLISH's outcome known at once: answered through the confirmer too, behind the
    /// ones still committing, so acknowledgements keep the order of the PUBLISHes [MQTT-4.6.0-2].
    fn outcome(&mut self, packet_id: Option<u16>, qos: QoS, result: CoreResult<Published>) {
        let _ = self.confirmer().send((packet_id, qos, PublishOutcome::Known(result)));
    }

    /// Answer an inbound PUBLISH once its outcome is known.
    fn answer_publish(&mut self, packet_id: Option<u16>, qos: QoS, result: CoreResult<Published>) {
        if let Ok(published) = &result
            && !published.rejected.is_empty()
        {
            // Full session queues drop what they cannot take, as Mosquitto does.
            metrics::counter!("wharf_mqtt_messages_dropped_total").increment(published.rejected.len() as u64);
        }
        let Some(packet_id) = packet_id else {
            if let Err(error) = result {
                tracing::debug!(client = self.client_id, %error, "QoS 0 publish failed");
            }
            return;
        };
        let mut response = PubResponse { packet_id, ..PubResponse::default() };
        match &result {
            Ok(published) => {
                if published.is_duplicate() && self.version.is_v5() {
                    response.user_properties.push((USER_PROPERTY_VERDICT.into(), "duplicate".into()));
                } else if published.unroutable() && self.version.is_v5() {
                    response.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
                }
            }
            Err(error) => {
                tracing::debug!(client = self.client_id, %error, "publish refused");
                response.reason_code = match error {
                    CoreError::AccessRefused(_) => ReasonCode::NOT_AUTHORIZED,
                    CoreError::LimitExceeded { .. } => ReasonCode::QUOTA_EXCEEDED,
                    _ => ReasonCode::UNSPECIFIED_ERROR,
                };
                if self.problem_information {
                    response.reason_string = Some(error.to_string());
                }
            }
        }
        // MQTT 3.1.1 has no negative acknowledgement: a refused message is acknowledged and
        // dropped (as Mosquitto does for an ACL denial).
        if !self.version.is_v5() {
            response.reason_code = ReasonCode::SUCCESS;
            response.reason_string = None;
        }
        match qos {
            QoS::AtLeastOnce => {
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                self.send(Packet::PubAck(response));
            }
            QoS::ExactlyOnce => {
                if response.reason_code.is_error() {
                    // The exchange ends with an error PUBREC [MQTT-4.3.3-?]: no PUBREL follows.
                    self.inbound_qos2.remove(&packet_id);
                    self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                } else if let Some(sent) = self.inbound_qos2.get_mut(&packet_id) {
                    *sent = true;
                }
                self.send(Packet::PubRec(response));
            }
            QoS::AtMostOnce => {}
        }
    }

    /// PUBREL: bump the packet id's epoch in the core (so the id's next PUBLISH is a new
    /// message), then PUBCOMP.
    fn on_pubrel(&mut self, packet_id: u16) -> Option<Close> {
        let epoch = self.epochs.get(&packet_id).copied().unwrap_or(0).wrapping_add(1);
        self.epochs.insert(packet_id, epoch);
        let write = StateWrite {
            key: session::inbound_qos2_key(&self.client_id, packet_id),
            value: Some(session::encode_epoch(epoch)),
            owner: Some(session::session_queue(&self.client_id)),
        };
        let _ = self.recorder().send((write, Recorded::Released { packet_id }));
        None
    }

    // ----- outbound deliveries -----------------------------------------------------------------

    async fn handle_event(&mut self, event: Event) -> Option<Close> {
        match event {
            Event::Delivery(delivery) => {
                self.parked.push_back(delivery);
                self.drain_parked();
            }
            Event::ConsumerGone(seq) => {
                if let Some((source, _)) = self.consumers.remove(&seq) {
                    match source {
                        // The session queue was deleted under the connection (administratively).
                        Source::Session => {
                            return Some(Close::Server(ReasonCode::ADMINISTRATIVE_ACTION, "session deleted".into()));
                        }
                        Source::Shared(filter) => {
                            // Deleted by another member's release racing this subscription, or by
                            // an administrator: declare it again while subscribed.
                            tracing::info!(client = self.client_id, filter, "shared subscription queue deleted");
                            if self.subscriptions.contains_key(&filter) {
                                // Boxed: rare, and its future would otherwise enlarge every
                                // connection's.
                                let reattach = Box::pin(self.reattach_shared(filter));
                                reattach.await;
                            }
                        }
                    }
                }
            }
            Event::Published { packet_id, qos, result } => {
                if let (Some(_), Err(error)) = (packet_id, &result)
                    && error.is_retryable()
                {
                    // Not stored, for now (no leader, a lost forward): acknowledging it would
                    // lose it (MQTT 3.1.1 has no negative PUBACK), and an MQTT 5 error PUBACK
                    // would end the exchange. Closing without an answer makes the client send it
                    // again, flagged DUP, on its next connection [MQTT-4.4.0-1].
                    return Some(Close::Server(ReasonCode::SERVER_BUSY, format!("publish not stored: {error}")));
                }
                self.answer_publish(packet_id, qos, result);
            }
            Event::Released { packet_id, result } => {
                if let Err(error) = result {
                    // Without the record a retransmitted PUBLISH could be stored twice: close, and
                    // let the client retry PUBREL on its next connection.
                    return Some(Close::Server(
                        ReasonCode::UNSPECIFIED_ERROR,
                        format!("recording PUBREL failed: {error}"),
                    ));
                }
                if self.inbound_qos2.remove(&packet_id).is_some() {
                    self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
                }
                self.send(Packet::PubComp(PubResponse { packet_id, ..PubResponse::default() }));
            }
            Event::Received { packet_id, result } => {
                if let Err(error) = result {
                    return Some(Close::Server(
                        ReasonCode::UNSPECIFIED_ERROR,
                        format!("recording PUBREC failed: {error}"),
                    ));
                }
                self.send(Packet::PubRel(PubResponse { packet_id, ..PubResponse::default() }));
            }
            Event::Completed { packet_id, result } => {
                if let Err(error) = result {
                    return Some(Close::Server(
                        ReasonCode::UNSPECIFIED_ERROR,
                        format!("recording PUBCOMP failed: {error}"),
                    ));
                }
                self.released.remove(&packet_id);
                self.drain_parked();
            }
        }
        None
    }

    /// Send parked deliveries in order while the window has room and their packet ids are free.
    fn drain_parked(&mut self) {
        while let Some(delivery) = self.parked.front() {
            let position = delivery.position;
            // A message whose QoS 2 exchange reached PUBREL before a crash comes back from the
            // queue: its PUBREL was re-sent at connect; finish it instead of sending it again.
            let packet_id = session::packet_id_for(&position);
            if self.released.get(&packet_id) == Some(&position) {
                let delivery = self.parked.pop_front().expect("front exists");
                self.settles.push((delivery.consumer, position));
                continue;
            }
            let Some((outgoing, qos, subscription_ids, retain)) = self.prepare(delivery) else {
                let delivery = self.parked.pop_front().expect("front exists");
                self.settles.push((delivery.consumer, position));
                continue;
            };
            if qos != QoS::AtMostOnce {
                let busy = self.inflight.contains_key(&packet_id) || self.released.contains_key(&packet_id);
                if busy || self.inflight.len() + self.released.len() >= self.window() {
                    return;
                }
            }
            let delivery = self.parked.pop_front().expect("front exists");
            self.send_delivery(delivery, outgoing, qos, subscription_ids, retain, packet_id);
        }
    }

    /// Decide what a delivery becomes for this client: `None` when it is not for it (expired, no
    /// matching subscription, No Local).
    fn prepare(&self, delivery: &Delivery) -> Option<(mapping::Outgoing, QoS, Vec<u32>, bool)> {
        let outgoing = mapping::outgoing_from_message(&delivery.message, delivery.enqueued_ms, now_ms())?;
        let source = self.consumers.get(&delivery.consumer.seq).map(|(source, _)| source.clone());
        let mut granted = None::<QoS>;
        let mut identifiers = Vec::new();
        let mut retain = false;
        let mut consider = |subscription: &StoredSubscription, retained_on_subscribe: bool| {
            granted = Some(granted.map_or(subscription.qos(), |q| q.max(subscription.qos())));
            if let Some(id) = subscription.identifier {
                identifiers.push(id);
            }
            // RETAIN is 1 for retained messages sent on subscribe [MQTT-3.3.1-8], else the
            // published flag if Retain As Published is set [MQTT-3.3.1-12], else 0.
            retain |= retained_on_subscribe || (subscription.retain_as_published && outgoing.retain);
        };
        match source {
            Some(Source::Shared(filter)) => {
                let subscription = self.subscriptions.get(&filter)?;
                consider(subscription, false);
            }
            Some(Source::Session) => {
                if let Some(filter) = &outgoing.retained_for {
                    let subscription = self.subscriptions.get(filter)?;
                    consider(subscription, true);
                } else {
                    let own = outgoing.publisher.as_deref() == Some(self.client_id.as_str());
                    for (filter, subscription) in &self.subscriptions {
                        if codec::topic::parse_shared(filter).is_some()
                            || !topic::filter_matches(filter, &outgoing.topic)
                        {
                            continue;
                        }
                        // No Local [MQTT-3.8.3-3].
                        if own && subscription.no_local {
                            continue;
                        }
                        consider(subscription, false);
                    }
                }
            }
            None => return None,
        }
        let qos = granted?.min(outgoing.qos);
        identifiers.sort_unstable();
        identifiers.dedup();
        Some((outgoing, qos, identifiers, retain))
    }

    fn send_delivery(
        &mut self,
        delivery: Delivery,
        outgoing: mapping::Outgoing,
        qos: QoS,
        subscription_identifiers: Vec<u32>,
        retain: bool,
        packet_id: u16,
    ) {
        let mut properties = outgoing.properties;
        let mut topic = outgoing.topic;
        if !self.version.is_v5() {
            properties = codec::PublishProperties::default();
        } else {
            properties.subscription_identifiers = subscription_identifiers;
            // Topic aliases towards the client, while it allows more [MQTT-3.3.2-?].
            if self.client_topic_alias_max > 0 {
                if let Some(&alias) = self.aliases_out.get(&topic) {
                    properties.topic_alias = Some(alias);
                    topic = String::new();
                } else if self.aliases_out.len() < usize::from(self.client_topic_alias_max) {
                    let alias = self.aliases_out.len() as u16 + 1;
                    self.aliases_out.insert(topic.clone(), alias);
                    properties.topic_alias = Some(alias);
                }
            }
        }
        let publish = Publish {
            dup: delivery.redelivered && qos != QoS::AtMostOnce,
            qos,
            retain,
            topic,
            packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
            properties,
            payload: outgoing.payload,
        };
        let packet = Packet::Publish(publish);
        // A PUBLISH larger than the client's Maximum Packet Size is dropped as if delivered
        // [MQTT-3.1.2-25].
        if codec::encoded_len(&packet, self.version) > self.client_packet_size_max as usize {
            tracing::debug!(client = self.client_id, "message larger than the client's maximum packet size dropped");
            self.settles.push((delivery.consumer, delivery.position));
            return;
        }
        self.broker.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.send(packet);
        if qos == QoS::AtMostOnce {
            self.settles.push((delivery.consumer, delivery.position));
        } else {
            metrics::gauge!("wharf_mqtt_inflight_messages").increment(1.0);
            self.inflight.insert(packet_id, Inflight { consumer: delivery.consumer, position: delivery.position, qos });
        }
    }

    /// PUBACK (QoS 1): the message is done.
    fn on_ack(&mut self, packet_id: u16, qos: QoS) {
        if let Some(inflight) = self.inflight.get(&packet_id)
            && inflight.qos == qos
        {
            let inflight = self.inflight.remove(&packet_id).expect("present");
            metrics::gauge!("wharf_mqtt_inflight_messages").decrement(1.0);
            self.settles.push((inflight.consumer, inflight.position));
            self.drain_parked();
        }
    }

    /// PUBREC (QoS 2): record the PUBREL state in the core, then acknowledge the message and send
    /// PUBREL. A PUBREC with an error reason ends the exchange.
    async fn on_pubrec(&mut self, rec: PubResponse) -> Option<Close> {
        let packet_id = rec.packet_id;
        let Some(inflight) = self.inflight.get(&packet_id).copied().filter(|i| i.qos == QoS::ExactlyOnce) else {
            // Already released (a retransmitted PUBREC): PUBREL again; else unknown.
            if self.released.contains_key(&packet_id) {
                self.send(Packet::PubRel(PubResponse { packet_id, ..PubResponse::default() }));
            } else if self.version.is_v5() {
                self.send(Packet::PubRel(PubResponse {
                    packet_id,
                    reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                    ..PubResponse::default()
                }));
            }
            return None;
        };
        self.inflight.remove(&packet_id);
        metrics::gauge!("wharf_mqtt_inflight_messages").decrement(1.0);
        if rec.reason_code.is_error() {
            self.settles.push((inflight.consumer, inflight.position));
            self.drain_parked();
            return None;
        }
        self.released.insert(packet_id, inflight.position);
        let write = StateWrite {
            key: session::released_key(&self.client_id, packet_id),
            value: Some(session::encode_position(&inflight.position)),
            owner: Some(session::session_queue(&self.client_id)),
        };
        let received = Recorded::Received { packet_id, consumer: inflight.consumer, position: inflight.position };
        let _ = self.recorder().send((write, received));
        None
    }

    /// PUBCOMP: the QoS 2 exchange is over; forget its record. The packet id stays taken until
    /// the record is gone, so a crash never leaves a stale PUBREL record for a reused id.
    fn on_pubcomp(&mut self, packet_id: u16) -> Option<Close> {
        if self.released.contains_key(&packet_id) {
            let write = StateWrite {
                key: session::released_key(&self.client_id, packet_id),
                value: None,
                owner: Some(session::session_queue(&self.client_id)),
            };
            let _ = self.recorder().send((write, Recorded::Completed { packet_id }));
        }
        None
    }

    /// Send acknowledgements to the core in one batch per consumer, in the background.
    fn flush_settles(&mut self) {
        if self.settles.is_empty() {
            return;
        }
        let mut per_consumer: HashMap<ConsumerId, Vec<Position>> = HashMap::new();
        for (consumer, position) in self.settles.drain(..) {
            per_consumer.entry(consumer).or_default().push(position);
        }
        let core = self.broker.core().clone();
        tokio::spawn(async move {
            for (consumer, positions) in per_consumer {
                if let Err(error) = core.settle(consumer, &positions, Outcome::Ack).await {
                    tracing::debug!(%error, "acknowledging deliveries failed");
                }
            }
        });
    }

    // ----- subscriptions -----------------------------------------------------------------------

    async fn on_subscribe(&mut self, subscribe: Subscribe) -> Option<Close> {
        if subscribe.subscription_identifier.is_some() && !self.version.is_v5() {
            return Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "subscription identifier".into()));
        }
        let mut reason_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained_for = Vec::new();
        for (filter, options) in &subscribe.filters {
            let existed = self.subscriptions.contains_key(filter);
            if !existed && self.subscriptions.len() >= self.broker.config.subscriptions_per_session_max as usize {
                reason_codes.push(if self.version.is_v5() {
                    ReasonCode::QUOTA_EXCEEDED
                } else {
                    ReasonCode::UNSPECIFIED_ERROR
                });
                continue;
            }
            let stored = StoredSubscription::new(options, subscribe.subscription_identifier);
            let result = match codec::topic::parse_shared(filter) {
                Some(_) => self.subscribe_shared(filter, existed).await,
                None => self.bind(filter, true).await,
            };
            match result {
                Ok(()) => {
                    self.subscriptions.insert(filter.clone(), stored);
                    reason_codes.push(ReasonCode(options.qos as u8));
                    // Retained messages [MQTT-3.3.1-9], [MQTT-3.8.4-4]: not for shared subscriptions.
                    let send = match options.retain_handling {
                        0 => true,
                        1 => !existed,
                        _ => false,
                    };
                    if send && codec::topic::parse_shared(filter).is_none() {
                        retained_for.push(filter.clone());
                    }
                }
                Err(error) => {
                    tracing::info!(client = self.client_id, filter, %error, "subscription refused");
                    reason_codes.push(ReasonCode::UNSPECIFIED_ERROR);
                }
            }
        }
        if let Err(error) = self.save_record().await {
            return Some(Close::Server(ReasonCode::UNSPECIFIED_ERROR, format!("saving the session failed: {error}")));
        }
        self.send(Packet::SubAck(SubAck { packet_id: subscribe.packet_id, reason_codes, ..SubAck::default() }));
        for filter in retained_for {
            self.send_retained(&filter).await;
        }
        None
    }

    fn binding(&self, filter: &str, queue: String) -> BindingSpec {
        let pattern_filter = codec::topic::parse_shared(filter).map_or(filter, |(_, f)| f);
        let mut arguments = Headers::new();
        arguments.push(BINDING_DOLLAR, FieldValue::Bool(true));
        arguments.push(BINDING_FILTER, pattern_filter);
        BindingSpec {
            vhost: self.broker.config.vhost.clone(),
            source: self.broker.config.exchange.clone(),
            destination: Destination::Queue(queue),
            routing_key: topic::filter_to_pattern(pattern_filter),
            arguments,
        }
    }

    async fn bind(&self, filter: &str, bind: bool) -> CoreResult<()> {
        let binding = self.binding(filter, session::session_queue(&self.client_id));
        if bind { self.broker.core().bind(binding, None).await } else { self.broker.core().unbind(binding, None).await }
    }

    /// Declare (idempotently) and bind the queue of a shared subscription; its name.
    async fn ensure_shared_queue(&self, filter: &str) -> CoreResult<String> {
        let (group, inner) = codec::topic::parse_shared(filter).unwrap_or(("", filter));
        let name_len_max = self.broker.core().config().limits.name_len_max_bytes as usize;
        let queue = session::shared_queue(group, inner, name_len_max);
        self.broker.core().declare_queue(queue_spec(&self.broker, &queue)).await?;
        self.broker.core().bind(self.binding(filter, queue.clone()), None).await?;
        Ok(queue)
    }

    async fn subscribe_shared(&mut self, filter: &str, existed: bool) -> CoreResult<()> {
        let queue = self.ensure_shared_queue(filter).await?;
        if !existed {
            self.consume(Source::Shared(filter.to_owned()), queue).await?;
        }
        Ok(())
    }

    /// Copy the retained messages matching `filter` into the session queue, marked as sent for
    /// that filter (so they come with RETAIN 1, after the SUBACK, in queue order).
    async fn send_retained(&self, filter: &str) {
        let queue = session::session_queue(&self.client_id);
        for (topic, stored) in self.broker.retained_matching(filter) {
            let mut message = stored;
            let mut headers = Headers::new();
            headers.push(mapping::HEADER_TOPIC, topic.as_str());
            headers.push(mapping::HEADER_RETAINED_FOR, filter);
            headers.0.extend(message.headers.0);
            message.headers = headers;
            message.exchange = String::new();
            message.routing_key = queue.clone();
            message.idempotency_key = None;
            message.partition_key = None;
            match self.broker.core().publish(&self.broker.config.vhost, message).await {
                Ok(pending) => drop(tokio::spawn(async move {
                    let _ = pending.confirm().await;
                })),
                Err(error) => tracing::debug!(client = self.client_id, %error, "sending a retained message failed"),
            }
        }
    }

    async fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Option<Close> {
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            if !self.subscriptions.contains_key(filter) {
                reason_codes.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
                continue;
            }
            let result = if codec::topic::parse_shared(filter).is_some() {
                let seq = self.consumers.iter().find_map(|(seq, (source, _))| match source {
                    Source::Shared(f) if f == filter => Some(*seq),
                    _ => None,
                });
                if let Some(seq) = seq {
                    self.stop_consumer(seq).await;
                }
                Ok(())
            } else {
                self.bind(filter, false).await
            };
            match result {
                Ok(()) | Err(CoreError::NotFound(_)) => {
                    self.subscriptions.remove(filter);
                    reason_codes.push(ReasonCode::SUCCESS);
                }
                Err(error) => {
                    tracing::info!(client = self.client_id, filter, %error, "unsubscribe failed");
                    reason_codes.push(ReasonCode::UNSPECIFIED_ERROR);
                }
            }
        }
        if let Err(error) = self.save_record().await {
            return Some(Close::Server(ReasonCode::UNSPECIFIED_ERROR, format!("saving the session failed: {error}")));
        }
        for filter in &unsubscribe.filters {
            if codec::topic::parse_shared(filter).is_some() && !self.subscriptions.contains_key(filter) {
                self.broker.release_shared(filter).await;
            }
        }
        if !self.version.is_v5() {
            reason_codes.clear();
        }
        self.send(Packet::UnsubAck(UnsubAck { packet_id: unsubscribe.packet_id, reason_codes, ..UnsubAck::default() }));
        None
    }

    async fn save_record(&mut self) -> CoreResult<()> {
        self.record.subscriptions = self.subscriptions.clone();
        write_record(&self.broker, &self.client_id, &self.record).await
    }

    // ----- disconnect --------------------------------------------------------------------------

    fn on_disconnect(&mut self, disconnect: &Disconnect) -> Option<Close> {
        if let Some(expiry) = disconnect.session_expiry_interval_secs {
            // [MQTT-3.14.2-2]: a session that was to end at disconnect cannot be extended.
            if self.record.expiry_secs == 0 && expiry != 0 {
                return Some(Close::Server(ReasonCode::PROTOCOL_ERROR, "session expiry set after 0".into()));
            }
            self.record.expiry_secs = expiry.min(self.broker.config.session_expiry_max_secs);
        }
        Some(Close::Disconnect { publish_will: disconnect.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE })
    }

    /// Tear the connection down: tell an MQTT 5 client why, stop consuming (unacknowledged
    /// deliveries return to the queue), store or end the session, handle the will, and close
    /// (lingering when the server decided it).
    async fn finish(mut self, close: Close) {
        let server_closed = matches!(&close, Close::Server(reason, _) if *reason != ReasonCode::SERVER_SHUTTING_DOWN);
        if let Close::Server(reason, text) = &close {
            tracing::debug!(client = self.client_id, reason = reason.0, text, "closing connection");
            // MQTT 5 servers may send DISCONNECT before closing [MQTT-4.13.1-1]; never for
            // a takeover with a version that has no DISCONNECT from the server.
            if self.version.is_v5() {
                let reason_string = self.problem_information.then(|| text.clone());
                self.send(Packet::Disconnect(Disconnect {
                    reason_code: *reason,
                    reason_string,
                    ..Disconnect::default()
                }));
            }
        }
        let _ = self.io.flush().await;
        let seqs: Vec<u64> = self.consumers.keys().copied().collect();
        for seq in seqs {
            self.stop_consumer(seq).await;
        }
        self.flush_settles();
        let inflight = self.inflight.len();
        metrics::gauge!("wharf_mqtt_inflight_messages").decrement(inflight as f64);
        // Every close but a normal DISCONNECT publishes the will [MQTT-3.1.2-8], a server
        // shutdown included.
        let publish_will = match close {
            Close::Disconnect { publish_will } => publish_will,
            Close::Lost | Close::Server(..) => true,
        };
        let broker = Arc::clone(&self.broker);
        let guard = broker.client_lock(&self.client_id).await;
        if let Err(error) = broker.core().close_connection(self.connection_id).await {
            tracing::debug!(client = self.client_id, %error, "closing the core connection failed");
        }
        let expiry_secs = self.record.expiry_secs;
        let disconnected_at_ms = now_ms();
        // The will is published now, or kept in the session record until its delay has passed
        // (so a broker restart meanwhile does not lose it), or dropped on a normal DISCONNECT.
        let will = self.record.will.take().filter(|_| publish_will);
        let (publish_now, delayed) = match will {
            Some(will) if expiry_secs == 0 || will.delay_secs == 0 => (Some(will), None),
            Some(will) => (None, Some(will)),
            None => (None, None),
        };
        if let Some(will) = &publish_now {
            broker.publish_will(&self.client_id, will).await;
        }
        if expiry_secs == 0 {
            broker.end_session(&self.client_id).await;
        } else {
            self.record.connected = false;
            self.record.disconnected_at_ms = disconnected_at_ms;
            self.record.will.clone_from(&delayed);
            if let Err(error) = self.save_record().await {
                tracing::warn!(client = self.client_id, %error, "saving the session at disconnect failed");
            }
            if let Some(will) = delayed {
                broker.schedule_will(&self.client_id, will, expiry_secs, disconnected_at_ms);
            }
            broker.schedule_expiry(&self.client_id, expiry_secs, disconnected_at_ms);
        }
        broker.unregister(&self.client_id, self.seq);
        drop(guard);
        // The socket closes last: once the client sees it closed, what its DISCONNECT changed
        // (the will removed, the session stored) is committed.
        let _ = self.io.writer.shutdown().await;
        let _ = self.done.send(true);
        // A close the server decided lingers, so the DISCONNECT (MQTT 5) and what preceded it
        // reach a client that is still sending [MQTT-4.13.1-1]; not at shutdown, which must not
        // wait for clients.
        if server_closed {
            self.io.linger().await;
        }
    }

    /// Queue a packet for the client, honouring its Maximum Packet Size for what can shrink.
    fn send(&mut self, mut packet: Packet) {
        if codec::encoded_len(&packet, self.version) > self.client_packet_size_max as usize {
            // Reason strings and user properties are the optional parts [MQTT-3.1.2-29].
            match &mut packet {
                Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
                    r.reason_string = None;
                    r.user_properties.clear();
                }
                Packet::Disconnect(d) => {
                    d.reason_string = None;
                    d.user_properties.clear();
                }
                _ => {}
            }
        }
        let written = send_raw(&mut self.io, &packet, self.version);
        self.broker.stats.bytes_sent.fetch_add(written as u64, Ordering::Relaxed);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What an inbound PUBLISH became, for the confirmer.
enum PublishOutcome {
    /// Queued for commit.
    Pending(wharf_core::node::PendingPublish),
    /// Refused before it reached the core.
    Known(CoreResult<Published>),
}

/// A task awaiting the commits of a connection's inbound PUBLISHes, in order, and reporting them.
fn spawn_confirmer(events: EventSender) -> mpsc::UnboundedSender<(Option<u16>, QoS, PublishOutcome)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Option<u16>, QoS, PublishOutcome)>();
    tokio::spawn(async move {
        while let Some((packet_id, qos, outcome)) = rx.recv().await {
            let result = match outcome {
                PublishOutcome::Pending(pending) => pending.confirm().await,
                PublishOutcome::Known(result) => result,
            };
            if events.send(Box::new(Event::Published { packet_id, qos, result })).is_err() {
                break;
            }
        }
    });
    tx
}

/// A QoS 2 state change to record before its packet is answered.
#[derive(Debug)]
enum Recorded {
    /// Inbound PUBREL (epoch bumped): then PUBCOMP.
    Released { packet_id: u16 },
    /// Outbound PUBREC (PUBREL state): then acknowledge the message and send PUBREL.
    Received { packet_id: u16, consumer: ConsumerId, position: Position },
    /// Outbound PUBCOMP (PUBREL state gone): then the packet id is free.
    Completed { packet_id: u16 },
}

/// Most QoS 2 records written in one batch.
const RECORD_BATCH_MAX: usize = 256;

/// A task writing a connection's QoS 2 records in order, batching whatever has queued up into one
/// atomic write (one commit), and reporting each in order: the answers (PUBCOMP, PUBREL) go out in
/// the order of the packets that caused them [MQTT-4.6.0-4].
fn spawn_recorder(
    core: wharf_core::Core,
    vhost: String,
    events: EventSender,
) -> mpsc::UnboundedSender<(StateWrite, Recorded)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(StateWrite, Recorded)>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < RECORD_BATCH_MAX
                && let Ok(next) = rx.try_recv()
            {
                batch.push(next);
            }
            let (writes, recorded): (Vec<StateWrite>, Vec<Recorded>) = batch.into_iter().unzip();
            let result = core.state_write(&vhost, writes).await;
            if result.is_ok() {
                // Recorded: messages whose PUBREC arrived are done in their queues.
                let mut done: HashMap<ConsumerId, Vec<Position>> = HashMap::new();
                for record in &recorded {
                    if let Recorded::Received { consumer, position, .. } = record {
                        done.entry(*consumer).or_default().push(*position);
                    }
                }
                for (consumer, positions) in done {
                    if let Err(error) = core.settle(consumer, &positions, Outcome::Ack).await {
                        tracing::debug!(%error, "acknowledging received QoS 2 deliveries failed");
                    }
                }
            }
            for record in recorded {
                let result = result.clone();
                let event = match record {
                    Recorded::Released { packet_id } => Event::Released { packet_id, result },
                    Recorded::Received { packet_id, .. } => Event::Received { packet_id, result },
                    Recorded::Completed { packet_id } => Event::Completed { packet_id, result },
                };
                if events.send(Box::new(event)).is_err() {
                    return;
                }
            }
        }
    });
    tx
}

/// The declaration of a session or shared-subscription queue.
fn queue_spec(broker: &Broker, name: &str) -> QueueSpec {
    let mut arguments = Headers::new();
    arguments.push("x-max-length", FieldValue::I64(broker.config.session_queue_messages_max as i64));
    arguments.push("x-overflow", "reject-publish");
    QueueSpec {
        vhost: broker.config.vhost.clone(),
        name: name.to_owned(),
        durable: true,
        arguments,
        ..QueueSpec::default()
    }
}

async fn write_record(broker: &Broker, client_id: &str, record: &SessionRecord) -> CoreResult<()> {
    let write = StateWrite {
        key: session::session_key(client_id),
        value: Some(record.encode()),
        owner: Some(session::session_queue(client_id)),
    };
    broker.core().state_write(&broker.config.vhost, vec![write]).await
}

/// Find or create the session: with `resuming`, an existing session continues (Session Present);
/// otherwise any existing one is discarded [MQTT-3.1.2-4]. Returns the record and Session Present.
async fn setup_session(
    broker: &Broker,
    client_id: &str,
    resuming: bool,
    expiry_secs: u32,
    connection: ConnectionId,
    will: Option<StoredWill>,
) -> CoreResult<(SessionRecord, bool)> {
    let vhost = &broker.config.vhost;
    let queue = session::session_queue(client_id);
    let existing =
        broker.core().state_get(vhost, &session::session_key(client_id)).and_then(|v| SessionRecord::decode(&v));
    let queue_exists = broker.core().queue_status(vhost, &queue).is_ok();
    if resuming
        && queue_exists
        && let Some(mut record) = existing
    {
        record.expiry_secs = expiry_secs;
        record.connected = true;
        record.will = will;
        write_record(broker, client_id, &record).await?;
        return Ok((record, true));
    }
    if queue_exists {
        broker.end_session(client_id).await;
    }
    broker.core().declare_queue(queue_spec(broker, &queue)).await?;
    broker.session_count(1);
    let record = SessionRecord {
        uid: connection.to_string(),
        expiry_secs,
        connected: true,
        disconnected_at_ms: 0,
        subscriptions: BTreeMap::new(),
        will,
    };
    write_record(broker, client_id, &record).await?;
    Ok((record, false))
}
