//! One Consume stream: subscribe, then deliveries sent while the client has granted credit,
//! settles committed in order with their `settled` answers, and the consumer cancelled (its
//! unsettled deliveries back in the queue) when the stream ends. The client's credit is also the
//! core consumer's credit on each partition, so a consumer holds nothing it was not granted (on a
//! queue of P partitions, up to P − 1 times the credit may wait here, held, until granted).
//! Reaches the core only through `wharf_core::Core`.

use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use wharf_core::CoreError;
use wharf_core::node::{ConsumeOptions, Consumer, ConsumerEvent};
use wharf_core::queue::{ConsumerId, Outcome};

use crate::mapping::{core_status, invalid, message_out, position_in, position_out, precondition, vhost};
use crate::{Native, proto};

/// Events buffered towards the client before the stream waits for it (HTTP/2 flow control does
/// the rest).
pub(crate) const EVENTS_BUFFERED: usize = 64;

pub(crate) type EventSender = mpsc::Sender<Result<proto::ConsumeEvent, Status>>;

fn event(event: proto::consume_event::Event) -> Result<proto::ConsumeEvent, Status> {
    Ok(proto::ConsumeEvent { event: Some(event) })
}

/// Run a Consume stream to its end; errors end the stream with their status.
pub(crate) async fn run(native: Arc<Native>, mut requests: Streaming<proto::ConsumeRequest>, out: EventSender) {
    let mut shutdown = native.shutdown.subscribe();
    if *shutdown.borrow() {
        let _ = out.send(Err(Status::unavailable("the broker is shutting down"))).await;
        return;
    }
    let first = match requests.message().await {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(error) => {
            tracing::debug!(%error, "consume stream failed before subscribing");
            return;
        }
    };
    let subscribe = match first.request {
        Some(proto::consume_request::Request::Subscribe(subscribe)) => subscribe,
        _ => {
            let _ = out.send(Err(invalid("the first request of a Consume stream must be subscribe"))).await;
            return;
        }
    };
    let mut stream = match Stream::open(&native, subscribe, out.clone()).await {
        Ok(stream) => stream,
        Err(status) => {
            let _ = out.send(Err(status)).await;
            return;
        }
    };
    metrics::gauge!("wharf_native_consumers").increment(1.0);
    let ended = loop {
        tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => {
                    if let Err(status) = stream.handle(request).await {
                        break Some(status);
                    }
                }
                // The client ended its side or went away: the consumer goes.
                Ok(None) | Err(_) => break None,
            },
            next = next_event(&mut stream.consumer), if stream.credit > 0 => match next {
                Some(ConsumerEvent::Delivery(delivery)) => {
                    stream.credit -= 1;
                    let delivery = proto::Delivery {
                        position: Some(position_out(delivery.position)),
                        message: Some(message_out(&delivery.message)),
                        redelivered: delivery.redelivered,
                        delivery_count: delivery.delivery_count,
                        enqueued_ms: delivery.enqueued_ms,
                    };
                    if out.send(event(proto::consume_event::Event::Delivery(delivery))).await.is_err() {
                        break None;
                    }
                    metrics::counter!("wharf_native_deliveries_total").increment(1);
                }
                Some(ConsumerEvent::Cancelled) => {
                    let reason = format!("queue '{}' was deleted", stream.queue);
                    let _ = out.send(event(proto::consume_event::Event::Cancelled(proto::Cancelled { reason }))).await;
                    stream.consumer = None;
                    break None;
                }
                // The node is shutting down.
                None => {
                    stream.consumer = None;
                    break Some(core_status(CoreError::Unavailable("the broker is shutting down".into())));
                }
            },
            _ = shutdown.changed() => break Some(Status::unavailable("the broker is shutting down")),
        }
    };
    metrics::gauge!("wharf_native_consumers").decrement(1.0);
    if let Some(status) = ended {
        let _ = out.send(Err(status)).await;
    }
    if let Some(consumer) = stream.consumer.take()
        && let Err(error) = consumer.cancel().await
    {
        tracing::debug!(%error, "cancelling a native consumer failed");
    }
}

/// The next event of an attached consumer; never ready without one.
async fn next_event(consumer: &mut Option<Consumer>) -> Option<ConsumerEvent> {
    match consumer {
        Some(consumer) => consumer.recv().await,
        None => std::future::pending().await,
    }
}

fn credit_exceeded(value: u64, max: u32) -> Status {
    core_status(CoreError::LimitExceeded { limit: "native.consumer_credit_max", value, max: max.into() })
}

struct Stream {
    native: Arc<Native>,
    out: EventSender,
    id: ConsumerId,
    queue: String,
    no_ack: bool,
    /// `None` once the broker cancelled it.
    consumer: Option<Consumer>,
    /// Deliveries the client granted and was not sent yet.
    credit: u64,
}

impl Stream {
    async fn open(native: &Arc<Native>, subscribe: proto::Subscribe, out: EventSender) -> Result<Self, Status> {
        let vhost = vhost(&subscribe.vhost).to_owned();
        let core = &native.core;
        let id = ConsumerId { connection: core.new_connection(), seq: 1 };
        let max = native.config.consumer_credit_max;
        if subscribe.credit > max {
            return Err(credit_exceeded(subscribe.credit.into(), max));
        }
        let options = ConsumeOptions {
            prefetch: subscribe.prefetch,
            no_ack: subscribe.no_ack,
            priority: subscribe.priority,
            exclusive: subscribe.exclusive,
            credit: Some(subscribe.credit),
        };
        let consumer = core.consume(&vhost, &subscribe.queue, id, options).await.map_err(core_status)?;
        let partitions = consumer.partitions();
        let stream = Self {
            native: Arc::clone(native),
            out,
            id,
            queue: subscribe.queue,
            no_ack: subscribe.no_ack,
            consumer: Some(consumer),
            credit: subscribe.credit.into(),
        };
        let subscribed = proto::Subscribed { consumer_id: id.to_string(), partitions };
        if stream.out.send(event(proto::consume_event::Event::Subscribed(subscribed))).await.is_err() {
            return Err(Status::cancelled("the client went away"));
        }
        Ok(stream)
    }

    async fn add_credit(&mut self, credit: u32) -> Result<(), Status> {
        let max = self.native.config.consumer_credit_max;
        let total = self.credit + u64::from(credit);
        if total > u64::from(max) {
            return Err(credit_exceeded(total, max));
        }
        self.credit = total;
        if let Some(consumer) = &self.consumer {
            self.native.core.grant_credit(consumer, credit).await.map_err(core_status)?;
        }
        Ok(())
    }

    async fn handle(&mut self, request: proto::ConsumeRequest) -> Result<(), Status> {
        match request.request {
            Some(proto::consume_request::Request::Credit(credit)) => self.add_credit(credit).await,
            Some(proto::consume_request::Request::Settle(settle)) => self.settle(settle),
            Some(proto::consume_request::Request::Subscribe(_)) => {
                Err(invalid("this stream is subscribed already: one consumer per Consume stream"))
            }
            None => Err(invalid("an empty Consume request")),
        }
    }

    fn settle(&mut self, settle: proto::Settle) -> Result<(), Status> {
        if self.no_ack {
            return Err(precondition("a no-ack consumer's deliveries are settled when sent"));
        }
        let outcome = match proto::Outcome::try_from(settle.outcome) {
            Ok(proto::Outcome::Ack) => Outcome::Ack,
            Ok(proto::Outcome::Requeue) => Outcome::Requeue,
            Ok(proto::Outcome::Reject) => Outcome::Reject,
            _ => return Err(invalid(format!("settle needs an outcome (got {})", settle.outcome))),
        };
        let positions: Vec<_> = settle.positions.iter().map(position_in).collect();
        // Queued now, in order with this consumer's later settles; answered when committed.
        let pending = self.native.core.settle_queued(self.id, &positions, outcome).map_err(core_status)?;
        let out = self.out.clone();
        let request_id = settle.request_id;
        tokio::spawn(async move {
            let reply = match pending.done().await {
                Ok(unknown) if request_id != 0 => event(proto::consume_event::Event::Settled(proto::Settled {
                    request_id,
                    unknown: unknown.into_iter().map(position_out).collect(),
                })),
                Ok(_) => return,
                Err(error) => Err(core_status(error)),
            };
            let _ = out.send(reply).await;
        });
        Ok(())
    }
}
