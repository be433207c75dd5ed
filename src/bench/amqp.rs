//! `wharf bench amqp`: AMQP 0-9-1 publishers and consumers on the bench's own lean client
//! ([`super::amqp_wire`]). Queues are durable
//! (`x-queue-type` when asked), messages persistent unless `--transient`; with `--confirms` a
//! publish counts as sent when the broker confirmed it, a negative confirm as refused. Layouts:
//! one-to-one and fan-in publish to queues through the default exchange, fan-out through a fanout
//! exchange bound to one queue per consumer. The run's queues and exchange are deleted at the end.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use tokio::sync::watch;

use super::amqp_wire::{Event, Wire};
use super::{AmqpArgs, Counters, Layout, Receiver, Report, Running, Schedule, progress, stamp};

pub async fn run(args: AmqpArgs) -> anyhow::Result<Report> {
    let common = args.common.clone();
    common.validate()?;
    let prefix = common.run_prefix();
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);

    // The topology: one queue per consumer (one-to-one, fan-out) or one shared queue (fan-in).
    let mut setup = connect(&args).await?;
    let queues = common.queue_names(&prefix);
    let mut arguments = FieldTable::default();
    if let Some(kind) = &args.queue_type {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.as_str().into()));
    }
    for queue in &queues {
        setup.declare_queue(queue, arguments.clone()).await?;
    }
    let exchange = (common.layout == Layout::FanOut).then(|| format!("{prefix}-fanout"));
    if let Some(exchange) = &exchange {
        setup.declare_fanout(exchange).await?;
        for queue in &queues {
            setup.bind(queue, exchange).await?;
        }
    }

    let mut consumers = Vec::new();
    for index in 0..common.subscribers {
        let queue = queues[index as usize % queues.len()].clone();
        let mut wire = connect(&args).await?;
        wire.consume(&queue, &format!("{prefix}-consumer-{index}"), args.prefetch).await?;
        let receiver = Receiver::new(epoch, Arc::clone(&counters))?;
        consumers.push(tokio::spawn(consume(wire, receiver, args.multi_ack_every, index, stop_rx.clone())));
    }

    let start = Instant::now();
    let reporter = tokio::spawn(progress(Arc::clone(&counters), start, stop_rx.clone()));
    let mut publishers = Vec::new();
    for index in 0..common.publishers {
        let (exchange, routing_key) = common.address_of(index, exchange.as_deref(), &queues);
        let wire = connect(&args).await?;
        let schedule = Schedule::new(&common, index, start);
        let target = Target { exchange, routing_key, prefix: prefix.clone() };
        publishers.push(tokio::spawn(publish(
            args.clone(),
            wire,
            target,
            schedule,
            epoch,
            index,
            Arc::clone(&counters),
        )));
    }
    let running = Running { counters, start, publishers, subscribers: consumers, stop: stop_tx, reporter };
    let outcome = running.finish(common.queue_copies(), common.drain_secs).await?;
    // Leave nothing behind on the broker.
    for queue in &queues {
        let _ = setup.delete_queue(queue).await;
    }
    if let Some(exchange) = &exchange {
        let _ = setup.delete_exchange(exchange).await;
    }
    setup.close().await;
    let mut mode = if args.confirms { "confirms".to_owned() } else { "no confirms".to_owned() };
    mode.push_str(if args.transient { ", transient" } else { ", persistent" });
    if let Some(kind) = &args.queue_type {
        mode.push_str(&format!(", {kind} queues"));
    }
    if args.idempotency_keys {
        mode.push_str(", idempotency keys");
    }
    outcome.report("amqp", mode, &common)
}

/// A consumer acknowledging in batches acknowledges what it holds after this long without a
/// delivery.
const MULTI_ACK_IDLE: Duration = Duration::from_millis(20);

/// One consumer: record every delivery, acknowledging every `every` of them with `multiple` (or
/// what it holds after [`MULTI_ACK_IDLE`] without a delivery), until told to stop.
async fn consume(
    mut wire: Wire,
    mut receiver: Receiver,
    every: u32,
    index: u32,
    mut stop: watch::Receiver<bool>,
) -> Receiver {
    // Deliveries not acknowledged yet, and the tag of the last of them.
    let mut unacked = 0;
    let mut last_tag = 0;
    loop {
        let idle = tokio::time::sleep(MULTI_ACK_IDLE);
        let ack_now = tokio::select! {
            event = wire.next_event() => match event {
                Ok(Event::Delivery { delivery_tag, body }) => {
                    receiver.record(&body);
                    unacked += 1;
                    last_tag = delivery_tag;
                    unacked >= every
                }
                Ok(Event::Confirm { .. }) => false,
                Err(error) => {
                    eprintln!("wharf bench: consumer {index}: {error:#}");
                    break;
                }
            },
            // Nothing more for a while: acknowledge what is held, so no delivery waits for the
            // next batch.
            _ = idle, if unacked > 0 => true,
            _ = stop.changed() => break,
        };
        if ack_now {
            let acked = wire.ack(last_tag, every > 1);
            if let Err(error) = match acked {
                Ok(()) => wire.flush().await,
                Err(error) => Err(error),
            } {
                eprintln!("wharf bench: consumer {index}: ack: {error:#}");
                break;
            }
            unacked = 0;
        }
    }
    wire.close().await;
    receiver
}

/// Where a publisher sends.
struct Target {
    exchange: String,
    routing_key: String,
    /// The run's prefix, for idempotency keys.
    prefix: String,
}

async fn connect(args: &AmqpArgs) -> anyhow::Result<Wire> {
    Wire::connect(&args.common.host, args.port, &args.vhost, &args.username, &args.password).await
}

/// One publisher: publish on schedule, with at most `inflight` confirms outstanding.
async fn publish(
    args: AmqpArgs,
    mut wire: Wire,
    target: Target,
    mut schedule: Schedule,
    epoch: Instant,
    index: u32,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    if args.confirms {
        wire.confirm_select().await?;
    }
    let inflight = args.inflight.max(1);
    // Delivery tags published and not confirmed yet (tags count publishes from 1).
    let mut outstanding = BTreeSet::new();
    let mut seq = 0;
    let mut publishing = true;
    while publishing || !outstanding.is_empty() {
        let window_open = publishing && outstanding.len() < inflight;
        tokio::select! {
            due = schedule.next(), if window_open => {
                let Some(due) = due else {
                    publishing = false;
                    continue;
                };
                let payload = stamp(epoch, due, index, seq, args.common.size_bytes);
                let mut properties = AMQPProperties::default().with_delivery_mode(if args.transient { 1 } else { 2 });
                if args.idempotency_keys {
                    let mut headers = FieldTable::default();
                    let key = format!("{}-{index}-{seq}", target.prefix);
                    headers.insert("x-idempotency-key".into(), AMQPValue::LongString(key.as_str().into()));
                    properties = properties.with_headers(headers);
                }
                wire.publish(&target.exchange, &target.routing_key, properties, &payload)?;
                wire.flush().await?;
                seq += 1;
                if args.confirms {
                    outstanding.insert(seq);
                } else {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            event = wire.next_event(), if !outstanding.is_empty() || !publishing => {
                let Event::Confirm { delivery_tag, multiple, ack } = event? else { continue };
                let settled = if multiple {
                    let rest = outstanding.split_off(&(delivery_tag + 1));
                    std::mem::replace(&mut outstanding, rest).len()
                } else {
                    usize::from(outstanding.remove(&delivery_tag))
                };
                let counter = if ack { &counters.sent } else { &counters.refused };
                counter.fetch_add(settled as u64, Ordering::Relaxed);
            }
        }
    }
    wire.close().await;
    Ok(())
}
