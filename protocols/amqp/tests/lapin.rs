//! In-process tests of the AMQP front-end: a core on in-memory storage, `Broker::start`, a TCP
//! listener on 127.0.0.1:0 calling `serve` per connection, driven by the lapin client (and by raw
//! bytes for what a client library cannot send).

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::LongString;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wharf_amqp::{AmqpConfig, Broker};
use wharf_core::{Core, CoreConfig, StorageKind};

const PATIENCE: Duration = Duration::from_secs(10);

/// A single node on in-memory storage with short timers (as `core/tests/common`).
fn memory_config() -> CoreConfig {
    let mut config = CoreConfig::single_node("/nonexistent");
    config.storage = StorageKind::Memory;
    config.shard_count = 2;
    config.tick_interval_ms = 10;
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config
}

/// Start a core, the front-end and a listener; returns the broker and the `amqp://` address.
async fn start() -> (Arc<Broker>, String) {
    start_with(AmqpConfig::default()).await
}

/// [`start`] with front-end settings.
async fn start_with(config: AmqpConfig) -> (Arc<Broker>, String) {
    let core = Core::open(memory_config()).await.expect("open core");
    let broker = Broker::start(core, config).await.expect("start broker");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepting = Arc::clone(&broker);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(wharf_amqp::serve(Arc::clone(&accepting), stream, peer.to_string()));
        }
    });
    (broker, format!("amqp://guest:guest@{addr}/%2f"))
}

async fn connect(uri: &str) -> Connection {
    tokio::time::timeout(PATIENCE, Connection::connect(uri, ConnectionProperties::default()))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_confirms_consume_and_ack() {
    let (broker, uri) = start().await;
    let connection = connect(&uri).await;
    assert_eq!(broker.connections(), 1);
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare("work".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    assert_eq!(queue.name().as_str(), "work");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let mut headers = FieldTable::default();
    headers.insert("x-n".into(), AMQPValue::LongInt(7));
    let properties = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_delivery_mode(2)
        .with_headers(headers.clone());
    for i in 0..3u8 {
        let confirm = channel
            .basic_publish("".into(), "work".into(), BasicPublishOptions::default(), &[i; 3], properties.clone())
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    let mut consumer = channel
        .basic_consume("work".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    assert!(consumer.tag().as_str().starts_with("amq.ctag-"));
    for i in 0..3u8 {
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(delivery.data, vec![i; 3]);
        assert_eq!(delivery.delivery_tag, u64::from(i) + 1);
        assert!(!delivery.redelivered);
        assert_eq!(delivery.properties.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        assert_eq!(delivery.properties.headers().as_ref(), Some(&headers));
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    connection.close(200, "bye".into()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_get_empty() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("g".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    channel
        .basic_publish("".into(), "g".into(), BasicPublishOptions::default(), b"one", BasicProperties::default())
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let got = channel.basic_get("g".into(), BasicGetOptions::default()).await.expect("get").expect("a message");
    assert_eq!(got.delivery.data, b"one");
    assert_eq!(got.message_count, 0);
    got.delivery.ack(BasicAckOptions::default()).await.expect("ack");
    let empty = channel.basic_get("g".into(), BasicGetOptions::default()).await.expect("get");
    assert!(empty.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_is_returned_312_no_route() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let confirm = channel
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            b"lost",
            BasicProperties::default().with_priority(4),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let returned = confirm.take_message().expect("returned message");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.data, b"lost");
    assert_eq!(returned.delivery.properties.priority(), &Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare_of_missing_queue_closes_only_the_channel_404() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    let error = channel
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect_err("404");
    let text = error.to_string();
    assert!(text.contains("NOT_FOUND") && text.contains("missing"), "{text}");
    assert!(!channel.status().connected());
    assert!(connection.status().connected());
    let other = connection.create_channel().await.expect("another channel");
    other
        .queue_declare("present".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_320() {
    let (broker, uri) = start().await;
    let connection = connect(&uri).await;
    broker.shutdown();
    tokio::time::timeout(PATIENCE, async {
        while connection.status().connected() || broker.connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("closed in time");
}

/// Read until the peer closes (or the patience runs out); returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out)).await.expect("closed in time");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_the_right_one_and_a_close() {
    let (_broker, uri) = start().await;
    let addr = uri.rsplit('@').next().and_then(|s| s.split('/').next()).expect("addr").to_owned();
    let mut stream = TcpStream::connect(addr).await.expect("tcp");
    stream.write_all(b"AMQP\x00\x00\x08\x00").await.expect("write");
    assert_eq!(read_to_close(&mut stream).await, b"AMQP\x00\x00\x09\x01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_is_closed_501_before_its_body_arrives() {
    let (_broker, uri) = start().await;
    let addr = uri.rsplit('@').next().and_then(|s| s.split('/').next()).expect("addr").to_owned();
    let mut stream = TcpStream::connect(addr).await.expect("tcp");
    stream.write_all(b"AMQP\x00\x00\x09\x01").await.expect("write");
    // A method frame header announcing ~4 GiB: no body follows, yet the server must answer.
    stream.write_all(&[1, 0, 0, 0xFF, 0xFF, 0xFF, 0xF0]).await.expect("write");
    let bytes = read_to_close(&mut stream).await;
    // connection.start, then connection.close (class 10, method 50) with reply code 501.
    let close = bytes.windows(6).any(|w| w == [0, 10, 0, 50, 0x01, 0xF5]);
    assert!(close, "no connection.close 501 in {bytes:?}");
}

/// Publish on a confirm-mode channel and wait for the ack.
async fn publish_confirmed(channel: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, BasicProperties::default())
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_requeue_redelivers_with_the_flag() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("r".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    publish_confirmed(&channel, "", "r", b"again").await;
    channel.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume("r".into(), "c1".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let first = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert!(!first.redelivered);
    first.nack(BasicNackOptions { requeue: true, multiple: false }).await.expect("nack");
    let second = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert!(second.redelivered);
    assert_eq!(second.data, b"again");
    assert!(second.delivery_tag > first.delivery_tag);
    second.ack(BasicAckOptions::default()).await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_bindings_purge_delete_and_server_named_queues() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare("src".into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare src");
    channel
        .exchange_declare("dst".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare dst");
    channel
        .exchange_bind("dst".into(), "src".into(), "a.*".into(), ExchangeBindOptions::default(), FieldTable::default())
        .await
        .expect("exchange.bind");
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    assert!(queue.name().as_str().starts_with("amq.gen-"), "{}", queue.name());
    channel
        .queue_bind(queue.name().clone(), "dst".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .expect("queue.bind");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    publish_confirmed(&channel, "src", "a.b", b"1").await;
    publish_confirmed(&channel, "src", "a.c", b"2").await;
    publish_confirmed(&channel, "src", "b.c", b"unrouted").await;
    let purged = channel.queue_purge(queue.name().clone(), QueuePurgeOptions::default()).await.expect("purge");
    assert_eq!(purged, 2);
    publish_confirmed(&channel, "src", "a.d", b"3").await;
    let deleted = channel.queue_delete(queue.name().clone(), QueueDeleteOptions::default()).await.expect("delete");
    assert_eq!(deleted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_publishes_and_rollback_discards() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("t".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.tx_select().await.expect("tx.select");
    let publish = |body: &'static [u8]| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish("".into(), "t".into(), BasicPublishOptions::default(), body, BasicProperties::default())
                .await
                .expect("publish");
        }
    };
    publish(b"dropped").await;
    channel.tx_rollback().await.expect("rollback");
    publish(b"kept").await;
    let observer = connection.create_channel().await.expect("observer");
    assert!(observer.basic_get("t".into(), BasicGetOptions { no_ack: true }).await.expect("get").is_none());
    channel.tx_commit().await.expect("commit");
    let got = observer.basic_get("t".into(), BasicGetOptions { no_ack: true }).await.expect("get").expect("message");
    assert_eq!(got.delivery.data, b"kept");
    assert!(observer.basic_get("t".into(), BasicGetOptions { no_ack: true }).await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_delivery_tag_closes_the_channel_406() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.basic_ack(42, BasicAckOptions::default()).await.expect("ack sent");
    tokio::time::timeout(PATIENCE, async {
        while channel.status().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("channel closed");
    assert!(connection.status().connected());
    // The reply code and text, seen on the wire.
    let mut raw = Raw::open(&uri, 0, 0).await;
    let ack = basic::Ack { delivery_tag: 42, multiple: false };
    raw.send(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(ack)))).await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(close)))) => {
            assert_eq!(close.reply_code, 406);
            assert_eq!(close.reply_text.as_str(), "PRECONDITION_FAILED - unknown delivery tag 42");
            assert_eq!((close.class_id, close.method_id), (60, 80));
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_publish_closes_the_connection_540() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions { immediate: true, ..BasicPublishOptions::default() },
            b"x",
            BasicProperties::default(),
        )
        .await;
    tokio::time::timeout(PATIENCE, async {
        while connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_missing_vhost_are_refused() {
    let (_broker, uri) = start().await;
    let bad_password = uri.replace("guest:guest", "guest:wrong");
    let result = tokio::time::timeout(PATIENCE, Connection::connect(&bad_password, ConnectionProperties::default()))
        .await
        .expect("answer in time");
    assert!(result.is_err());
    let bad_vhost = uri.replace("/%2f", "/nowhere");
    let result = tokio::time::timeout(PATIENCE, Connection::connect(&bad_vhost, ConnectionProperties::default()))
        .await
        .expect("answer in time");
    let text = result.expect_err("refused").to_string();
    assert!(text.contains("530") || text.contains("NOT_ALLOWED"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_missing_exchange_closes_the_channel_404() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let result = channel
        .basic_publish("nope".into(), "k".into(), BasicPublishOptions::default(), b"x", BasicProperties::default())
        .await;
    let text = match result {
        Ok(confirm) => confirm.await.expect_err("channel closed").to_string(),
        Err(error) => error.to_string(),
    };
    assert!(text.contains("NOT_FOUND") && text.contains("nope"), "{text}");
    assert!(connection.status().connected());
}

/// A client speaking raw frames, for what a client library will not send.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connect and complete the handshake with these tune-ok values; channel 1 is opened.
    async fn open(uri: &str, frame_max: u32, heartbeat: u16) -> Self {
        Self::open_with(uri, frame_max, heartbeat, Default::default()).await
    }

    /// [`Raw::open`] with these client-properties in start-ok.
    async fn open_with(uri: &str, frame_max: u32, heartbeat: u16, client_properties: FieldTable) -> Self {
        let addr = uri.rsplit('@').next().and_then(|s| s.split('/').next()).expect("addr").to_owned();
        let mut raw = Self { stream: TcpStream::connect(addr).await.expect("tcp"), buf: Vec::new() };
        raw.stream.write_all(wharf_amqp::frame::PROTOCOL_HEADER).await.expect("write");
        assert!(matches!(
            raw.next().await,
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_))))
        ));
        let start_ok = connection::StartOk {
            client_properties,
            mechanism: "PLAIN".into(),
            response: LongString::from("\0guest\0guest"),
            locale: "en_US".into(),
        };
        raw.send(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)))).await;
        assert!(matches!(
            raw.next().await,
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_))))
        ));
        let tune_ok = connection::TuneOk { channel_max: 0, frame_max, heartbeat };
        raw.send(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)))).await;
        let open = connection::Open { virtual_host: "/".into() };
        raw.send(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open)))).await;
        assert!(matches!(
            raw.next().await,
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))))
        ));
        raw.send(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})))).await;
        assert!(matches!(
            raw.next().await,
            Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
        ));
        raw
    }

    async fn send(&mut self, frame: AMQPFrame) {
        let mut out = Vec::new();
        wharf_amqp::frame::encode(&frame, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next frame, skipping heartbeats; `None` at the end of the stream.
    async fn next(&mut self) -> Option<AMQPFrame> {
        loop {
            match wharf_amqp::frame::decode(&self.buf, 1 << 20) {
                Ok((frame, used)) => {
                    self.buf.drain(..used);
                    if frame != AMQPFrame::Heartbeat {
                        return Some(frame);
                    }
                }
                Err(wharf_amqp::frame::FrameError::Incomplete) => {
                    let mut chunk = [0u8; 4096];
                    let n =
                        tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await.expect("in time").ok()?;
                    if n == 0 {
                        return None;
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(error) => panic!("server sent a bad frame: {error}"),
            }
        }
    }

    /// Read until connection.close; its reply code.
    async fn connection_close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)))) => {
                    return close.reply_code;
                }
                Some(_) => {}
                None => panic!("socket closed without connection.close"),
            }
        }
    }
}

fn publish_frame(channel: u16) -> AMQPFrame {
    let publish = basic::Publish { exchange: "".into(), routing_key: "q".into(), mandatory: false, immediate: false };
    AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Publish(publish)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_body_without_a_method_is_505() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 0).await;
    raw.send(AMQPFrame::Body(1, b"orphan".to_vec())).await;
    assert_eq!(raw.connection_close_code().await, 505);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_where_a_content_header_is_due_is_505() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 0).await;
    raw.send(publish_frame(1)).await;
    raw.send(publish_frame(1)).await;
    assert_eq!(raw.connection_close_code().await, 505);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_on_an_unopened_channel_is_504() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 0).await;
    raw.send(publish_frame(2)).await;
    assert_eq!(raw.connection_close_code().await, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_end_is_501() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 0).await;
    let mut out = Vec::new();
    wharf_amqp::frame::encode(&publish_frame(1), &mut out).expect("encode");
    let last = out.len() - 1;
    out[last] = 0;
    raw.stream.write_all(&out).await.expect("write");
    assert_eq!(raw.connection_close_code().await, 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_the_negotiated_frame_max_is_501() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 4096, 0).await;
    raw.send(publish_frame(1)).await;
    // A body frame of 5000 bytes: over the 4096 negotiated, under the server's 131072.
    raw.send(AMQPFrame::Body(1, vec![0; 5000])).await;
    assert_eq!(raw.connection_close_code().await, 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_sent_and_silence_closes_the_socket() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 1).await;
    // The server sends heartbeats (at least one within a couple of seconds), then closes the
    // socket when the client stays silent for two intervals.
    let mut heartbeats = 0;
    let started = std::time::Instant::now();
    loop {
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(PATIENCE, raw.stream.read(&mut chunk)).await.expect("in time").unwrap_or(0);
        if n == 0 {
            break;
        }
        heartbeats += chunk[..n].windows(8).filter(|w| *w == [8, 0, 0, 0, 0, 0, 0, 0xCE]).count();
    }
    assert!(heartbeats >= 1);
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_the_connect_timeout() {
    let (broker, uri) = start_with(AmqpConfig { connect_timeout_secs: 1, ..AmqpConfig::default() }).await;
    let addr = uri.rsplit('@').next().and_then(|s| s.split('/').next()).expect("addr").to_owned();
    let mut stream = TcpStream::connect(addr).await.expect("tcp");
    assert_eq!(read_to_close(&mut stream).await, b"");
    tokio::time::timeout(PATIENCE, async {
        while broker.connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_holds_back_deliveries_until_ack_and_channel_close_requeues() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("p".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    publish_confirmed(&channel, "", "p", b"1").await;
    publish_confirmed(&channel, "", "p", b"2").await;
    let consuming = connection.create_channel().await.expect("channel");
    consuming.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = consuming
        .basic_consume("p".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let first = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(first.data, b"1");
    // Prefetch 1: the second waits for the first's ack.
    assert!(tokio::time::timeout(Duration::from_millis(300), consumer.next()).await.is_err());
    first.ack(BasicAckOptions::default()).await.expect("ack");
    let second = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(second.data, b"2");
    // Closing the channel with "2" unacked returns it to the queue, marked redelivered.
    consuming.close(200, "bye".into()).await.expect("close");
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(got) = channel.basic_get("p".into(), BasicGetOptions { no_ack: true }).await.expect("get") {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("requeued in time");
    assert_eq!(got.delivery.data, b"2");
    assert!(got.delivery.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_consumed_queue_cancels_the_consumer() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("gone".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    let mut consumer = channel
        .basic_consume("gone".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let other = connection.create_channel().await.expect("channel");
    other.queue_delete("gone".into(), QueueDeleteOptions::default()).await.expect("delete");
    let end = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("cancel in time");
    assert!(end.is_none(), "{end:?}");
    assert!(channel.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_reject_publish_queue_nacks() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    channel.queue_declare("full".into(), QueueDeclareOptions::default(), arguments).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    publish_confirmed(&channel, "", "full", b"1").await;
    let confirm = channel
        .basic_publish("".into(), "full".into(), BasicPublishOptions::default(), b"2", BasicProperties::default())
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_nack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connections_exclusive_queue_is_locked_405() {
    let (_broker, uri) = start().await;
    let owner = connect(&uri).await;
    let channel = owner.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let intruder = connect(&uri).await;
    let channel = intruder.create_channel().await.expect("channel");
    let error = channel
        .basic_consume("mine".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect_err("locked");
    assert!(error.to_string().contains("RESOURCE_LOCKED"), "{error}");
    assert!(intruder.status().connected());
}

/// A message with these headers (string values).
fn with_headers(pairs: &[(&str, &str)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in pairs {
        headers.insert((*name).into(), AMQPValue::LongString((*value).into()));
    }
    BasicProperties::default().with_headers(headers)
}

/// Publish with confirms on and expect an ack.
async fn publish_acked(channel: &lapin::Channel, exchange: &str, key: &str, body: &[u8], properties: BasicProperties) {
    let confirm = channel
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
}

async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("passive").message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_header_stores_once_and_confirms_the_repeat() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("once".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let keyed = with_headers(&[("x-idempotency-key", "order-42")]);
    publish_acked(&channel, "", "once", b"first", keyed.clone()).await;
    publish_acked(&channel, "", "once", b"retry", keyed).await;
    // By default message-id is not a key: two publishes with one message-id are two messages.
    let with_id = BasicProperties::default().with_message_id("m-1".into());
    publish_acked(&channel, "", "once", b"a", with_id.clone()).await;
    publish_acked(&channel, "", "once", b"b", with_id).await;
    assert_eq!(message_count(&channel, "once").await, 3);
    let got = channel.basic_get("once".into(), BasicGetOptions { no_ack: true }).await.expect("get").expect("one");
    assert_eq!(got.delivery.data, b"first");
    let headers = got.delivery.properties.headers().clone().expect("headers kept");
    assert_eq!(headers.inner().get("x-idempotency-key"), Some(&AMQPValue::LongString("order-42".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_is_the_idempotency_key_in_vhosts_configured_so() {
    let mut config = AmqpConfig::default();
    config.idempotency_key_by_vhost.insert("/".into(), wharf_amqp::config::IdempotencyKeySource::MessageId);
    let (_broker, uri) = start_with(config).await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("ids".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let with_id = BasicProperties::default().with_message_id("m-1".into());
    publish_acked(&channel, "", "ids", b"a", with_id.clone()).await;
    publish_acked(&channel, "", "ids", b"a again", with_id).await;
    publish_acked(&channel, "", "ids", b"b", BasicProperties::default().with_message_id("m-2".into())).await;
    assert_eq!(message_count(&channel, "ids").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_key_header_chooses_the_partition() {
    let (broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-partitions".into(), AMQPValue::LongInt(8));
    channel.queue_declare("parts".into(), QueueDeclareOptions::default(), arguments).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    for customer in ["alice", "bob", "carol", "dave"] {
        let key = format!("k-{customer}");
        let properties = with_headers(&[("x-partition-key", customer), ("x-idempotency-key", &key)]);
        publish_acked(&channel, "", "parts", customer.as_bytes(), properties).await;
        let found = broker.core().idempotency_lookup("/", "parts", &key).await.expect("lookup").expect("stored");
        assert_eq!(found.position.partition, wharf_core::placement::partition_for(customer, 8), "{customer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_exchange_holds_messages_for_their_x_delay() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-delayed-type".into(), AMQPValue::LongString("direct".into()));
    channel
        .exchange_declare(
            "later".into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            arguments,
        )
        .await
        .expect("declare x-delayed-message");
    channel.queue_declare("due".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel
        .queue_bind("due".into(), "later".into(), "jobs".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .expect("bind");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let mut delayed = FieldTable::default();
    delayed.insert("x-delay".into(), AMQPValue::LongInt(400));
    let published = std::time::Instant::now();
    publish_acked(&channel, "later", "jobs", b"late", BasicProperties::default().with_headers(delayed)).await;
    publish_acked(&channel, "later", "jobs", b"now", BasicProperties::default()).await;
    let mut consumer = channel
        .basic_consume("due".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let first = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(first.data, b"now", "the undelayed message overtakes the delayed one");
    let second = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(second.data, b"late");
    assert!(published.elapsed() >= Duration::from_millis(400), "delivered after {:?}", published.elapsed());
    // Without x-delayed-type the exchange is refused with the plugin's text.
    let error = channel
        .exchange_declare(
            "bad".into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("'x-delayed-type' must be an existing exchange type"), "{error}");
}

/// The next delivery of `consumer`, or `None` if none comes within `millis`.
async fn next_within(consumer: &mut lapin::Consumer, millis: u64) -> Option<lapin::message::Delivery> {
    match tokio::time::timeout(Duration::from_millis(millis), consumer.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        Ok(other) => panic!("consumer ended: {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_qos_limits_the_whole_channel_and_can_change_live() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    for queue in ["g1", "g2"] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("q");
        for n in 0..4u8 {
            publish_acked(&channel, "", queue, &[n], BasicProperties::default()).await;
        }
    }
    let consuming = connection.create_channel().await.expect("channel");
    consuming.basic_qos(3, BasicQosOptions { global: true }).await.expect("qos global");
    let mut consumers = Vec::new();
    for queue in ["g1", "g2"] {
        let consumer = consuming
            .basic_consume(queue.into(), queue.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume");
        consumers.push(consumer);
    }
    // Three unacked on the channel in all, whichever consumers they went to.
    let mut held = Vec::new();
    for _ in 0..2 {
        for consumer in &mut consumers {
            while let Some(delivery) = next_within(consumer, 200).await {
                held.push(delivery);
            }
        }
    }
    assert_eq!(held.len(), 3, "global prefetch 3");
    held.pop().expect("one").ack(BasicAckOptions::default()).await.expect("ack");
    let mut more = 0;
    for consumer in &mut consumers {
        while let Some(delivery) = next_within(consumer, 300).await {
            held.push(delivery);
            more += 1;
        }
    }
    assert_eq!(more, 1, "an ack opens the window by one");
    // A live change applies to the running consumers.
    consuming.basic_qos(6, BasicQosOptions { global: true }).await.expect("qos global 6");
    for _ in 0..2 {
        for consumer in &mut consumers {
            while let Some(delivery) = next_within(consumer, 200).await {
                held.push(delivery);
            }
        }
    }
    assert_eq!(held.len(), 6, "global prefetch raised to 6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_unacked_deliveries_with_the_channel_to_ack() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("c".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    for n in 0..3u8 {
        publish_acked(&channel, "", "c", &[n], BasicProperties::default()).await;
    }
    let consuming = connection.create_channel().await.expect("channel");
    consuming.basic_qos(2, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = consuming
        .basic_consume("c".into(), "first".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let first = next_within(&mut consumer, 5000).await.expect("first");
    let second = next_within(&mut consumer, 5000).await.expect("second");
    consuming.basic_cancel("first".into(), Default::default()).await.expect("cancel");
    // After the cancel the two deliveries are still the channel's: acking them works, and
    // another consumer gets only the third message, never these two again.
    first.ack(BasicAckOptions::default()).await.expect("ack");
    second.ack(BasicAckOptions::default()).await.expect("ack");
    let mut other = channel
        .basic_consume("c".into(), "second".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let third = next_within(&mut other, 5000).await.expect("third");
    assert_eq!((third.data.as_slice(), third.redelivered), (&[2u8][..], false));
    third.ack(BasicAckOptions::default()).await.expect("ack");
    assert!(next_within(&mut other, 300).await.is_none(), "the acked ones are not redelivered");
    assert!(consuming.status().connected(), "the acks after the cancel were known delivery tags");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_mandatory_publish_in_a_tx_is_returned_at_commit() {
    let (_broker, uri) = start().await;
    let mut raw = Raw::open(&uri, 0, 0).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Tx(amq_protocol::protocol::tx::AMQPMethod::Select(amq_protocol::protocol::tx::Select {})),
    ))
    .await;
    assert!(matches!(raw.next().await, Some(AMQPFrame::Method(1, AMQPClass::Tx(_)))));
    let publish =
        basic::Publish { exchange: "".into(), routing_key: "nowhere".into(), mandatory: true, immediate: false };
    raw.send(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(publish)))).await;
    let header =
        amq_protocol::frame::AMQPContentHeader { class_id: 60, body_size: 4, properties: BasicProperties::default() };
    raw.send(AMQPFrame::Header(1, header)).await;
    raw.send(AMQPFrame::Body(1, b"lost".to_vec())).await;
    raw.send(AMQPFrame::Method(
        1,
        AMQPClass::Tx(amq_protocol::protocol::tx::AMQPMethod::Commit(amq_protocol::protocol::tx::Commit {})),
    ))
    .await;
    // basic.return with the content, then commit-ok.
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(ret)))) => {
            assert_eq!(
                (ret.reply_code, ret.reply_text.as_str(), ret.routing_key.as_str()),
                (312, "NO_ROUTE", "nowhere")
            );
        }
        other => panic!("expected basic.return, got {other:?}"),
    }
    assert!(matches!(raw.next().await, Some(AMQPFrame::Header(1, _))));
    assert_eq!(raw.next().await, Some(AMQPFrame::Body(1, b"lost".to_vec())));
    assert!(matches!(
        raw.next().await,
        Some(AMQPFrame::Method(1, AMQPClass::Tx(amq_protocol::protocol::tx::AMQPMethod::CommitOk(_))))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_blocks_publishers_and_its_end_unblocks_them() {
    let (broker, uri) = start().await;
    let mut capabilities = FieldTable::default();
    capabilities.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut client_properties = FieldTable::default();
    client_properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let mut raw = Raw::open_with(&uri, 0, 0, client_properties).await;
    let declare = |name: &str| {
        let declare = amq_protocol::protocol::queue::Declare {
            queue: name.into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: Default::default(),
        };
        AMQPFrame::Method(1, AMQPClass::Queue(amq_protocol::protocol::queue::AMQPMethod::Declare(declare)))
    };
    let alarms = broker.core().alarms();
    let normal = alarms.thresholds();
    // A 1-byte memory watermark: the memory alarm goes off at the next check (at once).
    alarms.set_thresholds(wharf_core::alarms::AlarmConfig { memory_high_watermark_bytes: 1, ..normal.clone() });
    match raw.next().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked)))) => {
            assert_eq!(blocked.reason.as_str(), "low on memory");
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // A connection that does not publish goes on.
    raw.send(declare("before")).await;
    assert!(matches!(raw.next().await, Some(AMQPFrame::Method(1, AMQPClass::Queue(_)))));
    // Once it publishes, nothing more is read from it while the alarm lasts.
    raw.send(publish_frame(1)).await;
    let header =
        amq_protocol::frame::AMQPContentHeader { class_id: 60, body_size: 1, properties: BasicProperties::default() };
    raw.send(AMQPFrame::Header(1, header)).await;
    raw.send(AMQPFrame::Body(1, b"x".to_vec())).await;
    raw.send(declare("after")).await;
    let read = tokio::time::timeout(Duration::from_millis(500), raw.next()).await;
    assert!(read.is_err(), "the held publisher's declare was answered: {read:?}");
    alarms.set_thresholds(wharf_core::alarms::AlarmConfig { memory_high_watermark_bytes: u64::MAX, ..normal });
    assert!(matches!(
        raw.next().await,
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))))
    ));
    assert!(matches!(raw.next().await, Some(AMQPFrame::Method(1, AMQPClass::Queue(_)))), "read again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_inactive_pauses_deliveries_until_resumed() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("f".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    publish_acked(&channel, "", "f", b"1", BasicProperties::default()).await;
    let consuming = connection.create_channel().await.expect("channel");
    let mut consumer = consuming
        .basic_consume("f".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    assert_eq!(next_within(&mut consumer, 5000).await.expect("flowing").data, b"1");
    let active = consuming.channel_flow(lapin::options::ChannelFlowOptions { active: false }).await.expect("flow");
    assert!(!active, "flow-ok echoes active=false");
    publish_acked(&channel, "", "f", b"2", BasicProperties::default()).await;
    assert!(next_within(&mut consumer, 400).await.is_none(), "paused by channel.flow");
    consuming.channel_flow(lapin::options::ChannelFlowOptions { active: true }).await.expect("flow");
    assert_eq!(next_within(&mut consumer, 5000).await.expect("resumed").data, b"2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_consumer_keeps_other_consumers_out_until_it_cancels() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let owner = connection.create_channel().await.expect("channel");
    owner.queue_declare("x".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    let exclusive = BasicConsumeOptions { exclusive: true, ..BasicConsumeOptions::default() };
    // Kept alive: lapin cancels a consumer whose handle is dropped.
    let _only =
        owner.basic_consume("x".into(), "only".into(), exclusive, FieldTable::default()).await.expect("consume");
    let other = connect(&uri).await;
    let intruder = other.create_channel().await.expect("channel");
    let error = intruder
        .basic_consume("x".into(), "late".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect_err("locked out");
    assert!(error.to_string().contains("ACCESS_REFUSED - queue 'x' in vhost '/' in exclusive use"), "{error}");
    owner.basic_cancel("only".into(), Default::default()).await.expect("cancel");
    let retry = other.create_channel().await.expect("channel");
    retry
        .basic_consume("x".into(), "late".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("free once the exclusive consumer is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_priority_serves_the_higher_consumer_first() {
    let (_broker, uri) = start().await;
    let connection = connect(&uri).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_declare("prio".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("q");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let low_channel = connection.create_channel().await.expect("channel");
    let high_channel = connection.create_channel().await.expect("channel");
    high_channel.basic_qos(2, BasicQosOptions::default()).await.expect("qos");
    let mut low = low_channel
        .basic_consume("prio".into(), "low".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let mut high_arguments = FieldTable::default();
    high_arguments.insert("x-priority".into(), AMQPValue::LongInt(10));
    let mut high = high_channel
        .basic_consume("prio".into(), "high".into(), BasicConsumeOptions::default(), high_arguments)
        .await
        .expect("consume");
    for n in 0..3u8 {
        publish_acked(&channel, "", "prio", &[n], BasicProperties::default()).await;
    }
    // The high consumer takes what its prefetch allows; only the overflow goes to the low one.
    assert_eq!(next_within(&mut high, 5000).await.expect("high").data, [0]);
    assert_eq!(next_within(&mut high, 5000).await.expect("high").data, [1]);
    assert_eq!(next_within(&mut low, 5000).await.expect("low").data, [2]);
    let mut bad = FieldTable::default();
    bad.insert("x-priority".into(), AMQPValue::LongString("high".into()));
    let error = channel
        .basic_consume("prio".into(), "bad".into(), BasicConsumeOptions::default(), bad)
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("invalid arg 'x-priority'"), "{error}");
}
