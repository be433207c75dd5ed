//! `wharf bench amqp`: AMQP 0-9-1 publishers and consumers on lapin. Queues are durable
//! (`x-queue-type` when asked), messages persistent unless `--transient`; with `--confirms` a
//! publish counts as sent when the broker confirmed it, a negative confirm as refused. Layouts:
//! one-to-one and fan-in publish to queues through the default exchange, fan-out through a fanout
//! exchange bound to one queue per consumer. The run's queues and exchange are deleted at the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::watch;

use super::{AmqpArgs, Counters, Layout, Receiver, Report, Running, Schedule, progress, stamp};

/// Time any one setup call may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: AmqpArgs) -> anyhow::Result<Report> {
    let common = args.common.clone();
    common.validate()?;
    let prefix = common.run_prefix();
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);

    // The topology: one queue per consumer (one-to-one, fan-out) or one shared queue (fan-in).
    let admin = connect(&args).await?;
    let setup = admin.create_channel().await.context("channel")?;
    let queues = common.queue_names(&prefix);
    let mut arguments = FieldTable::default();
    if let Some(kind) = &args.queue_type {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.as_str().into()));
    }
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    for queue in &queues {
        within("queue.declare", setup.queue_declare(queue.as_str().into(), durable, arguments.clone())).await?;
    }
    let exchange = (common.layout == Layout::FanOut).then(|| format!("{prefix}-fanout"));
    if let Some(exchange) = &exchange {
        let options = ExchangeDeclareOptions { auto_delete: false, durable: true, ..ExchangeDeclareOptions::default() };
        let declare =
            setup.exchange_declare(exchange.as_str().into(), ExchangeKind::Fanout, options, FieldTable::default());
        within("exchange.declare", declare).await?;
        for queue in &queues {
            let bind = setup.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            );
            within("queue.bind", bind).await?;
        }
    }

    let mut consumers = Vec::new();
    for index in 0..common.subscribers {
        let queue = queues[index as usize % queues.len()].clone();
        let connection = connect(&args).await?;
        let channel = connection.create_channel().await.context("channel")?;
        within("basic.qos", channel.basic_qos(args.prefetch, BasicQosOptions::default())).await?;
        let consume = channel.basic_consume(
            queue.as_str().into(),
            format!("{prefix}-consumer-{index}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let mut consumer = within("basic.consume", consume).await?;
        let mut receiver = Receiver::new(epoch, Arc::clone(&counters))?;
        let mut stop = stop_rx.clone();
        let every = args.multi_ack_every;
        consumers.push(tokio::spawn(async move {
            // Deliveries not acknowledged yet, and the last of them (acked with `multiple`).
            let mut unacked = 0;
            let mut last: Option<lapin::message::Delivery> = None;
            loop {
                let idle = tokio::time::sleep(MULTI_ACK_IDLE);
                tokio::select! {
                    delivery = consumer.next() => match delivery {
                        Some(Ok(delivery)) => {
                            receiver.record(&delivery.data);
                            unacked += 1;
                            last = Some(delivery);
                            if unacked >= every && !ack(&mut last, every, index).await {
                                break;
                            }
                            if unacked >= every {
                                unacked = 0;
                            }
                        }
                        Some(Err(error)) => {
                            eprintln!("wharf bench: consumer {index}: {error}");
                            break;
                        }
                        None => break,
                    },
                    // Nothing more for a while: acknowledge what is held, so no delivery waits
                    // for the next batch.
                    _ = idle, if last.is_some() => {
                        if !ack(&mut last, every, index).await {
                            break;
                        }
                        unacked = 0;
                    }
                    _ = stop.changed() => break,
                }
            }
            let _ = connection.close(200, "bench done".into()).await;
            receiver
        }));
    }

    let start = Instant::now();
    let reporter = tokio::spawn(progress(Arc::clone(&counters), start, stop_rx.clone()));
    let mut publishers = Vec::new();
    for index in 0..common.publishers {
        let (exchange, routing_key) = common.address_of(index, exchange.as_deref(), &queues);
        let connection = connect(&args).await?;
        let schedule = Schedule::new(&common, index, start);
        let target = Target { exchange, routing_key, prefix: prefix.clone() };
        publishers.push(tokio::spawn(publish(
            args.clone(),
            connection,
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
        let _ = within("queue.delete", setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())).await;
    }
    if let Some(exchange) = &exchange {
        let _ = within(
            "exchange.delete",
            setup.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await;
    }
    let _ = admin.close(200, "bench done".into()).await;
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

/// Acknowledge `last` (with `multiple` when batching); false if the channel failed.
async fn ack(last: &mut Option<lapin::message::Delivery>, every: u32, index: u32) -> bool {
    let Some(delivery) = last.take() else { return true };
    match delivery.ack(BasicAckOptions { multiple: every > 1 }).await {
        Ok(_) => true,
        Err(error) => {
            eprintln!("wharf bench: consumer {index}: ack: {error}");
            false
        }
    }
}

/// Where a publisher sends.
struct Target {
    exchange: String,
    routing_key: String,
    /// The run's prefix, for idempotency keys.
    prefix: String,
}

async fn connect(args: &AmqpArgs) -> anyhow::Result<Connection> {
    let vhost = args.vhost.replace('%', "%25").replace('/', "%2f");
    let uri = format!("amqp://{}:{}@{}:{}/{vhost}", args.username, args.password, args.common.host, args.port);
    let connect = Connection::connect(&uri, ConnectionProperties::default());
    match tokio::time::timeout(SETUP_TIMEOUT, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => anyhow::bail!("could not connect to {}:{}: {error}", args.common.host, args.port),
        Err(_) => anyhow::bail!("no connection to {}:{} within {SETUP_TIMEOUT:?}", args.common.host, args.port),
    }
}

async fn within<T>(what: &str, call: impl Future<Output = lapin::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(SETUP_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => anyhow::bail!("{what}: no answer within {SETUP_TIMEOUT:?}"),
    }
}

/// One publisher: publish on schedule, with at most `inflight` confirms outstanding.
async fn publish(
    args: AmqpArgs,
    connection: Connection,
    target: Target,
    mut schedule: Schedule,
    epoch: Instant,
    index: u32,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await.context("channel")?;
    if args.confirms {
        within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await?;
    }
    let mut outstanding = FuturesUnordered::new();
    let settle = |confirm: lapin::Result<lapin::Confirmation>| match confirm {
        Ok(confirmation) if confirmation.is_nack() => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => eprintln!("wharf bench: publisher {index}: confirm: {error}"),
    };
    let mut seq = 0;
    while let Some(due) = schedule.next().await {
        let payload = stamp(epoch, due, index, seq, args.common.size_bytes);
        let mut properties = BasicProperties::default().with_delivery_mode(if args.transient { 1 } else { 2 });
        if args.idempotency_keys {
            let mut headers = FieldTable::default();
            let key = format!("{}-{index}-{seq}", target.prefix);
            headers.insert("x-idempotency-key".into(), AMQPValue::LongString(key.as_str().into()));
            properties = properties.with_headers(headers);
        }
        let confirm = channel
            .basic_publish(
                target.exchange.as_str().into(),
                target.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await
            .context("basic.publish")?;
        if args.confirms {
            outstanding.push(confirm);
            while outstanding.len() >= args.inflight.max(1) {
                if let Some(result) = outstanding.next().await {
                    settle(result);
                }
            }
        } else {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
    }
    while let Some(result) = outstanding.next().await {
        settle(result);
    }
    let _ = connection.close(200, "bench done".into()).await;
    Ok(())
}
