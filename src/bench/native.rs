//! `wharf bench native`: publishers and consumers on Wharf's native gRPC API (the `wharf-client`
//! crate). A publish counts as sent when its reply came (it is committed); a reply naming a
//! refusing queue, or a duplicate verdict, counts as refused. Consumers are Consume streams with
//! credit, acknowledging in batches. Layouts: one-to-one and fan-in publish to queues through
//! the default exchange, fan-out through a fanout exchange bound to one queue per consumer. The
//! run's queues and exchange are deleted at the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::watch;
use wharf_client::{Client, ConsumeOptions, proto};

use super::{Counters, Layout, NativeArgs, Receiver, Report, Running, Schedule, progress, stamp};

/// Time any one setup call may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A consumer acknowledges what it holds after this long without a delivery.
const ACK_IDLE: Duration = Duration::from_millis(20);

pub async fn run(args: NativeArgs) -> anyhow::Result<Report> {
    let common = args.common.clone();
    common.validate()?;
    let prefix = common.run_prefix();
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let url = format!("http://{}:{}", common.host, args.port);

    let admin = connect(&url).await?;
    let mut setup = admin.raw();
    let queues = common.queue_names(&prefix);
    for queue in &queues {
        let request = proto::DeclareQueueRequest {
            vhost: args.vhost.clone(),
            name: queue.clone(),
            durable: true,
            ..Default::default()
        };
        within("DeclareQueue", setup.declare_queue(request)).await?;
    }
    let exchange = (common.layout == Layout::FanOut).then(|| format!("{prefix}-fanout"));
    if let Some(exchange) = &exchange {
        let request = proto::DeclareExchangeRequest {
            vhost: args.vhost.clone(),
            name: exchange.clone(),
            r#type: "fanout".into(),
            durable: true,
            ..Default::default()
        };
        within("DeclareExchange", setup.declare_exchange(request)).await?;
        for queue in &queues {
            let request = proto::BindRequest {
                vhost: args.vhost.clone(),
                source: exchange.clone(),
                destination: Some(proto::bind_request::Destination::Queue(queue.clone())),
                ..Default::default()
            };
            within("Bind", setup.bind(request)).await?;
        }
    }

    let mut consumers = Vec::new();
    for index in 0..common.subscribers {
        let queue = queues[index as usize % queues.len()].clone();
        let client = connect(&url).await?;
        let options = ConsumeOptions { credit: args.credit, auto_credit: true, ..ConsumeOptions::default() };
        let consume = client.consume(&args.vhost, &queue, options);
        let mut consumer = tokio::time::timeout(SETUP_TIMEOUT, consume)
            .await
            .map_err(|_| anyhow::anyhow!("Consume: no answer within {SETUP_TIMEOUT:?}"))?
            .context("Consume")?;
        let mut receiver = Receiver::new(epoch, Arc::clone(&counters))?;
        let mut stop = stop_rx.clone();
        let every = args.ack_every as usize;
        consumers.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(every);
            loop {
                let idle = tokio::time::sleep(ACK_IDLE);
                tokio::select! {
                    delivery = consumer.next() => match delivery {
                        Ok(Some(delivery)) => {
                            if let Some(message) = &delivery.message {
                                receiver.record(&message.payload);
                            }
                            held.extend(delivery.position);
                            if held.len() >= every && !ack(&consumer, &mut held, index).await {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(error) => {
                            eprintln!("wharf bench: consumer {index}: {error}");
                            break;
                        }
                    },
                    // Nothing more for a while: acknowledge what is held.
                    _ = idle, if !held.is_empty() => if !ack(&consumer, &mut held, index).await { break },
                    _ = stop.changed() => break,
                }
            }
            let _ = ack(&consumer, &mut held, index).await;
            drop(client);
            receiver
        }));
    }

    let start = Instant::now();
    let reporter = tokio::spawn(progress(Arc::clone(&counters), start, stop_rx.clone()));
    let mut publishers = Vec::new();
    for index in 0..common.publishers {
        let (exchange, routing_key) = common.address_of(index, exchange.as_deref(), &queues);
        let client = connect(&url).await?;
        let schedule = Schedule::new(&common, index, start);
        let target = Target { vhost: args.vhost.clone(), exchange, routing_key, prefix: prefix.clone() };
        publishers.push(tokio::spawn(publish(
            args.clone(),
            client,
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
        let request =
            proto::DeleteQueueRequest { vhost: args.vhost.clone(), name: queue.clone(), ..Default::default() };
        let _ = within("DeleteQueue", setup.delete_queue(request)).await;
    }
    if let Some(exchange) = &exchange {
        let request =
            proto::DeleteExchangeRequest { vhost: args.vhost.clone(), name: exchange.clone(), ..Default::default() };
        let _ = within("DeleteExchange", setup.delete_exchange(request)).await;
    }
    let mut mode = "confirmed".to_owned();
    if args.idempotency_keys {
        mode.push_str(", idempotency keys");
    }
    outcome.report("native", mode, &common)
}

/// Acknowledge every held delivery in one settle; false if the stream failed.
async fn ack(consumer: &wharf_client::Consumer, held: &mut Vec<proto::Position>, index: u32) -> bool {
    if held.is_empty() {
        return true;
    }
    match consumer.settle(std::mem::take(held), proto::Outcome::Ack).await {
        Ok(()) => true,
        Err(error) => {
            eprintln!("wharf bench: consumer {index}: settle: {error}");
            false
        }
    }
}

/// Where a publisher sends.
struct Target {
    vhost: String,
    exchange: String,
    routing_key: String,
    /// The run's prefix, for idempotency keys.
    prefix: String,
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    match tokio::time::timeout(SETUP_TIMEOUT, Client::connect(url.to_owned())).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => anyhow::bail!("could not connect to {url}: {error}"),
        Err(_) => anyhow::bail!("no connection to {url} within {SETUP_TIMEOUT:?}"),
    }
}

async fn within<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(SETUP_TIMEOUT, call).await {
        Ok(result) => Ok(result.map_err(wharf_client::Error::from).with_context(|| what.to_owned())?.into_inner()),
        Err(_) => anyhow::bail!("{what}: no answer within {SETUP_TIMEOUT:?}"),
    }
}

/// One publisher: publish on schedule, with at most `inflight` messages outstanding (in calls
/// multiplexed on the publisher's HTTP/2 connection). With `--batch N`, messages go N to a
/// PublishBatch call (a batch is sent once full, or when the schedule has nothing due at once).
async fn publish(
    args: NativeArgs,
    client: Client,
    target: Target,
    mut schedule: Schedule,
    epoch: Instant,
    index: u32,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let mut outstanding = FuturesUnordered::new();
    let settle = |replies: Result<Vec<Result<proto::PublishReply, String>>, tonic::Status>| match replies {
        Ok(replies) => {
            for reply in replies {
                match reply {
                    Ok(reply) if reply.duplicate || !reply.rejected_queues.is_empty() => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => eprintln!("wharf bench: publisher {index}: {error}"),
                }
            }
        }
        Err(status) => eprintln!("wharf bench: publisher {index}: {}", wharf_client::Error::from(status)),
    };
    let batch_max = args.batch.max(1) as usize;
    let mut batch = Vec::with_capacity(batch_max);
    let mut in_flight = 0usize;
    let mut seq = 0;
    loop {
        let due = schedule.next().await;
        if let Some(due) = due {
            let payload = stamp(epoch, due, index, seq, args.common.size_bytes);
            batch.push(proto::Message {
                exchange: target.exchange.clone(),
                routing_key: target.routing_key.clone(),
                payload: payload.into(),
                idempotency_key: args.idempotency_keys.then(|| format!("{}-{index}-{seq}", target.prefix)),
                ..Default::default()
            });
            seq += 1;
        }
        // Send when the batch is full, at the end, or (at a fixed rate) at once: waiting for a
        // batch to fill would add its filling time to every message's latency.
        if batch.len() >= batch_max || due.is_none() || args.common.rate_per_sec > 0 {
            let messages = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
            if !messages.is_empty() {
                in_flight += messages.len();
                let count = messages.len();
                let mut raw = client.raw();
                let vhost = target.vhost.clone();
                // A task of its own: the call is sent now, not when the publisher next polls its
                // outstanding calls (which it does only at the in-flight limit).
                let call = tokio::spawn(async move { send(&mut raw, vhost, messages).await });
                outstanding.push(async move {
                    (count, call.await.unwrap_or_else(|error| Err(tonic::Status::cancelled(error.to_string()))))
                });
            }
        }
        while in_flight >= args.inflight.max(1) || (due.is_none() && in_flight > 0) {
            let Some((count, replies)) = outstanding.next().await else { break };
            in_flight -= count;
            settle(replies);
        }
        if due.is_none() {
            return Ok(());
        }
    }
}

/// One Publish call, or one PublishBatch call for several messages; one result per message.
async fn send(
    raw: &mut proto::wharf_client::WharfClient<tonic::transport::Channel>,
    vhost: String,
    mut messages: Vec<proto::Message>,
) -> Result<Vec<Result<proto::PublishReply, String>>, tonic::Status> {
    if messages.len() == 1 {
        let request = proto::PublishRequest { vhost, message: messages.pop(), mandatory: false };
        return raw.publish(request).await.map(|reply| vec![Ok(reply.into_inner())]);
    }
    let request = proto::PublishBatchRequest { vhost, messages, mandatory: false };
    let results = raw.publish_batch(request).await?.into_inner().results;
    Ok(results
        .into_iter()
        .map(|result| match result.result {
            Some(proto::publish_result::Result::Published(reply)) => Ok(reply),
            Some(proto::publish_result::Result::Error(error)) => Err(format!("{}: {}", error.code, error.message)),
            None => Err("an empty result".to_owned()),
        })
        .collect())
}
