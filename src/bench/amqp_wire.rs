//! The lean AMQP 0-9-1 client of `wharf bench amqp`: one socket on channel 1, driven by the task
//! that owns it on the bench's runtime, framed by `wharf_amqp::frame` over amq-protocol's parser
//! and generator. It speaks what the bench needs (connection set-up with PLAIN, declarations,
//! confirms, publishes, consumes, acks) and nothing else. Touches only its socket.
//!
//! Why not lapin, which the tests use as a real client: lapin runs an IO thread per connection
//! beside the runtime, and with two publishers and two consumers at 10,000 msg/s it used more CPU
//! than the broker under test (81 % of a core against Wharf's 56 % on the project's 2-core
//! machine), so the load generator, not the broker, set the latency and the maximum rate.

use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};
use amq_protocol::types::FieldTable;
use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_amqp::frame::{self, FrameError, PROTOCOL_HEADER};

/// The one channel every bench client uses.
const CHANNEL: u16 = 1;
/// Largest frame this client accepts (the broker may ask for less).
const FRAME_MAX_BYTES: u32 = 131_072;
/// Time any one set-up call may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A message being received: its delivery tag, then its size once the header came, then its body.
#[derive(Debug, Default)]
struct Incoming {
    delivery_tag: u64,
    body_size: Option<u64>,
    body: Vec<u8>,
}

/// What the broker sent that the bench acts on.
#[derive(Debug)]
pub enum Event {
    /// A publisher confirm: positive (`basic.ack`) or negative (`basic.nack`).
    Confirm { delivery_tag: u64, multiple: bool, ack: bool },
    /// A whole delivery.
    Delivery { delivery_tag: u64, body: Vec<u8> },
}

/// One connection with channel 1 open.
pub struct Wire {
    stream: TcpStream,
    /// Bytes read; those before `read_at` are decoded already (dropped at the next read).
    input: Vec<u8>,
    read_at: usize,
    output: Vec<u8>,
    frame_max: u32,
    incoming: Option<Incoming>,
}

impl Wire {
    /// Connect, negotiate (no heartbeats), open `vhost` and channel 1.
    pub async fn connect(host: &str, port: u16, vhost: &str, username: &str, password: &str) -> anyhow::Result<Self> {
        let set_up = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let mut wire =
                Self { stream, input: Vec::new(), read_at: 0, output: Vec::new(), frame_max: 4096, incoming: None };
            wire.output.extend_from_slice(PROTOCOL_HEADER);
            wire.flush().await?;
            let AMQPClass::Connection(connection::AMQPMethod::Start(_)) = wire.next_method().await? else {
                bail!("expected connection.start");
            };
            let start_ok = connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{username}\0{password}").into(),
                locale: "en_US".into(),
            };
            wire.send(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)))?;
            wire.flush().await?;
            let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = wire.next_method().await? else {
                bail!("expected connection.tune (refused credentials?)");
            };
            wire.frame_max = if tune.frame_max == 0 { FRAME_MAX_BYTES } else { tune.frame_max.min(FRAME_MAX_BYTES) };
            let tune_ok = connection::TuneOk { channel_max: 1, frame_max: wire.frame_max, heartbeat: 0 };
            wire.send(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)))?;
            let open = connection::Open { virtual_host: vhost.into() };
            wire.send(0, AMQPClass::Connection(connection::AMQPMethod::Open(open)))?;
            wire.flush().await?;
            let AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) = wire.next_method().await? else {
                bail!("expected connection.open-ok");
            };
            wire.call(AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await?;
            anyhow::Ok(wire)
        };
        match tokio::time::timeout(SETUP_TIMEOUT, set_up).await {
            Ok(result) => result.with_context(|| format!("could not connect to {host}:{port}")),
            Err(_) => bail!("no connection to {host}:{port} within {SETUP_TIMEOUT:?}"),
        }
    }

    /// Send a synchronous method on channel 1 and wait for its answer (within [`SETUP_TIMEOUT`]).
    pub async fn call(&mut self, method: AMQPClass) -> anyhow::Result<AMQPClass> {
        self.send(CHANNEL, method)?;
        self.flush().await?;
        match tokio::time::timeout(SETUP_TIMEOUT, self.next_method()).await {
            Ok(answer) => answer,
            Err(_) => bail!("no answer within {SETUP_TIMEOUT:?}"),
        }
    }

    /// `confirm.select`.
    pub async fn confirm_select(&mut self) -> anyhow::Result<()> {
        self.call(AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false }))).await?;
        Ok(())
    }

    /// `queue.declare` of a durable queue.
    pub async fn declare_queue(&mut self, name: &str, arguments: FieldTable) -> anyhow::Result<()> {
        let declare = queue::Declare {
            queue: name.into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments,
        };
        self.call(AMQPClass::Queue(queue::AMQPMethod::Declare(declare))).await.context("queue.declare")?;
        Ok(())
    }

    /// `exchange.declare` of a durable fanout exchange.
    pub async fn declare_fanout(&mut self, name: &str) -> anyhow::Result<()> {
        let declare = exchange::Declare {
            exchange: name.into(),
            kind: "fanout".into(),
            passive: false,
            durable: true,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        self.call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare))).await.context("exchange.declare")?;
        Ok(())
    }

    /// `queue.bind` with an empty routing key.
    pub async fn bind(&mut self, queue: &str, exchange: &str) -> anyhow::Result<()> {
        let bind = queue::Bind {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: "".into(),
            nowait: false,
            arguments: FieldTable::default(),
        };
        self.call(AMQPClass::Queue(queue::AMQPMethod::Bind(bind))).await.context("queue.bind")?;
        Ok(())
    }

    /// `queue.delete`.
    pub async fn delete_queue(&mut self, name: &str) -> anyhow::Result<()> {
        let delete = queue::Delete { queue: name.into(), if_unused: false, if_empty: false, nowait: false };
        self.call(AMQPClass::Queue(queue::AMQPMethod::Delete(delete))).await.context("queue.delete")?;
        Ok(())
    }

    /// `exchange.delete`.
    pub async fn delete_exchange(&mut self, name: &str) -> anyhow::Result<()> {
        let delete = exchange::Delete { exchange: name.into(), if_unused: false, nowait: false };
        self.call(AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete))).await.context("exchange.delete")?;
        Ok(())
    }

    /// `basic.qos` then `basic.consume` (acks required).
    pub async fn consume(&mut self, queue: &str, consumer_tag: &str, prefetch: u16) -> anyhow::Result<()> {
        let qos = basic::Qos { prefetch_count: prefetch, global: false };
        self.call(AMQPClass::Basic(basic::AMQPMethod::Qos(qos))).await.context("basic.qos")?;
        let consume = basic::Consume {
            queue: queue.into(),
            consumer_tag: consumer_tag.into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        self.call(AMQPClass::Basic(basic::AMQPMethod::Consume(consume))).await.context("basic.consume")?;
        Ok(())
    }

    /// Queue a `basic.publish` with its content; sent by the next [`Wire::flush`].
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: AMQPProperties,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let publish = basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        };
        self.send(CHANNEL, AMQPClass::Basic(basic::AMQPMethod::Publish(publish)))?;
        frame::encode_content(CHANNEL, properties, body, self.frame_max, &mut self.output).map_err(anyhow::Error::msg)
    }

    /// Queue a `basic.ack`; sent by the next [`Wire::flush`].
    pub fn ack(&mut self, delivery_tag: u64, multiple: bool) -> anyhow::Result<()> {
        self.send(CHANNEL, AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag, multiple })))
    }

    /// Write what is queued.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await.context("write")?;
            self.output.clear();
        }
        Ok(())
    }

    /// The next confirm or whole delivery. Cancel-safe: a frame is taken from the buffer only
    /// when complete, and a partial delivery stays in `self`.
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.take_event()? {
                return Ok(event);
            }
            self.fill().await?;
        }
    }

    /// `connection.close`, waiting briefly for close-ok.
    pub async fn close(mut self) {
        let close = connection::Close { reply_code: 200, reply_text: "bench done".into(), class_id: 0, method_id: 0 };
        if self.send(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))).is_ok()
            && self.flush().await.is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.next_method()).await;
        }
    }

    fn send(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        frame::encode(&AMQPFrame::Method(channel, method), &mut self.output).map_err(anyhow::Error::msg)
    }

    /// Read more bytes into the input buffer.
    async fn fill(&mut self) -> anyhow::Result<()> {
        self.input.drain(..self.read_at);
        self.read_at = 0;
        self.input.reserve(64 * 1024);
        if self.stream.read_buf(&mut self.input).await.context("read")? == 0 {
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    /// A complete frame from the input buffer, if there is one.
    fn take_frame(&mut self) -> anyhow::Result<Option<AMQPFrame>> {
        match frame::decode(&self.input[self.read_at..], self.frame_max) {
            Ok((frame, used)) => {
                self.read_at += used;
                Ok(Some(frame))
            }
            Err(FrameError::Incomplete) => Ok(None),
            Err(error) => bail!("bad frame from the broker: {error}"),
        }
    }

    /// The next method frame, skipping heartbeats; a close from the broker is an error.
    async fn next_method(&mut self) -> anyhow::Result<AMQPClass> {
        loop {
            match self.take_frame()? {
                Some(AMQPFrame::Method(_, method)) => return refuse_close(method),
                Some(AMQPFrame::Heartbeat) => {}
                Some(other) => bail!("unexpected frame {other:?}"),
                None => self.fill().await?,
            }
        }
    }

    /// Assemble the next event from buffered frames.
    fn take_event(&mut self) -> anyhow::Result<Option<Event>> {
        while let Some(frame) = self.take_frame()? {
            match frame {
                AMQPFrame::Method(_, method) => match refuse_close(method)? {
                    AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                        return Ok(Some(Event::Confirm {
                            delivery_tag: ack.delivery_tag,
                            multiple: ack.multiple,
                            ack: true,
                        }));
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                        return Ok(Some(Event::Confirm {
                            delivery_tag: nack.delivery_tag,
                            multiple: nack.multiple,
                            ack: false,
                        }));
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) => {
                        self.incoming = Some(Incoming { delivery_tag: deliver.delivery_tag, ..Incoming::default() });
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => bail!("the broker cancelled the consumer"),
                    _ => {}
                },
                AMQPFrame::Header(_, AMQPContentHeader { body_size, .. }) => {
                    let Some(incoming) = &mut self.incoming else { bail!("content header without a delivery") };
                    incoming.body_size = Some(body_size);
                    incoming.body.reserve(usize::try_from(body_size).unwrap_or(0));
                }
                AMQPFrame::Body(_, part) => {
                    let Some(incoming) = &mut self.incoming else { bail!("content body without a delivery") };
                    incoming.body.extend_from_slice(&part);
                }
                AMQPFrame::Heartbeat => {}
                other => bail!("unexpected frame {other:?}"),
            }
            if let Some(incoming) = &self.incoming
                && incoming.body_size.is_some_and(|size| incoming.body.len() as u64 >= size)
                && let Some(Incoming { delivery_tag, body, .. }) = self.incoming.take()
            {
                return Ok(Some(Event::Delivery { delivery_tag, body }));
            }
        }
        Ok(None)
    }
}

/// `method`, unless it closes the connection or the channel.
fn refuse_close(method: AMQPClass) -> anyhow::Result<AMQPClass> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
            bail!("the broker closed the connection: {} {}", close.reply_code, close.reply_text)
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
            bail!("the broker closed the channel: {} {}", close.reply_code, close.reply_text)
        }
        method => Ok(method),
    }
}
