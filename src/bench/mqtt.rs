//! `wharf bench mqtt`: MQTT 3.1.1 publishers and subscribers on rumqttc (publishers on MQTT 5
//! with `--idempotency-keys`). A QoS 1/2 publish counts as sent when the broker acknowledged it
//! (PUBACK, PUBCOMP); a QoS 0 publish when it was written.
//! Topics are `<prefix>/<destination>`; each subscriber subscribes to its destination's topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, v5};
use tokio::sync::watch;

use super::{Counters, Layout, MqttArgs, Receiver, Report, Running, Schedule, progress, stamp};

/// Time to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: MqttArgs) -> anyhow::Result<Report> {
    let common = args.common.clone();
    common.validate()?;
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let prefix = common.run_prefix();
    let topic = |destination: u32| format!("{prefix}/{destination}");
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers first, each subscribed before anything is published.
    let mut subscribers = Vec::new();
    for index in 0..common.subscribers {
        let destination = match common.layout {
            Layout::OneToOne => index,
            Layout::FanOut | Layout::FanIn => 0,
        };
        let (client, mut events) = connect(&args, &format!("{prefix}-sub-{index}")).await?;
        client.subscribe(topic(destination), qos).await.context("subscribe")?;
        tokio::time::timeout(SETUP_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(anyhow::anyhow!("subscriber {index}: {error}")),
                }
            }
        })
        .await
        .context("no SUBACK in time")??;
        let mut receiver = Receiver::new(epoch, Arc::clone(&counters))?;
        let mut stop = stop_rx.clone();
        subscribers.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::Publish(publish))) => receiver.record(&publish.payload),
                        Ok(_) => {}
                        Err(error) => {
                            eprintln!("wharf bench: subscriber {index}: {error}");
                            break;
                        }
                    },
                    _ = stop.changed() => break,
                }
            }
            drop(client);
            receiver
        }));
    }

    // Idle connections: connected before the load and held through it.
    let mut idle = Vec::with_capacity(args.idle_connections as usize);
    for index in 0..args.idle_connections {
        let (client, mut events) = connect(&args, &format!("{prefix}-idle-{index}")).await?;
        let task = tokio::spawn(async move {
            // Keep-alive pings go out and their answers come in; nothing else.
            while events.poll().await.is_ok() {}
        });
        idle.push((client, task));
    }

    let start = Instant::now();
    let reporter = tokio::spawn(progress(Arc::clone(&counters), start, stop_rx.clone()));
    let mut publishers = Vec::new();
    for index in 0..common.publishers {
        let topic = topic(common.destination_of(index));
        let schedule = Schedule::new(&common, index, start);
        let acks = Acks { acked: Arc::new(AtomicU64::new(0)), counters: Arc::clone(&counters) };
        let (done, done_rx) = watch::channel(false);
        let (client, event_loop) = if args.idempotency_keys {
            let (client, events) = connect_v5(&args, &format!("{prefix}-pub5-{index}")).await?;
            let qos = match qos {
                QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
                QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
                QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
            };
            let event_loop = tokio::spawn(count_acks_v5(events, qos, acks.clone(), done_rx, index));
            (Publisher::V5 { client, qos, keys: format!("{prefix}-{index}") }, event_loop)
        } else {
            let (client, events) = connect(&args, &format!("{prefix}-pub-{index}")).await?;
            let event_loop = tokio::spawn(count_acks(events, qos, acks.clone(), done_rx, index));
            (Publisher::V3(client, qos), event_loop)
        };
        let stamping = (epoch, index, common.size_bytes);
        publishers.push(tokio::spawn(publish(client, event_loop, acks, done, topic, schedule, stamping)));
    }
    let copies = match common.layout {
        Layout::OneToOne => 1,
        Layout::FanOut | Layout::FanIn => u64::from(common.subscribers),
    };
    let running = Running { counters, start, publishers, subscribers, stop: stop_tx, reporter };
    let outcome = running.finish(copies, common.drain_secs).await?;
    let still_open = idle.iter().filter(|(_, task)| !task.is_finished()).count();
    if args.hold_secs > 0 {
        eprintln!("holding {still_open} idle connections for {} s", args.hold_secs);
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let open_at_end = idle.iter().filter(|(_, task)| !task.is_finished()).count();
    for (client, task) in idle {
        task.abort();
        drop(client);
    }
    let mut report = outcome.report("mqtt", format!("qos {}", args.qos), &common)?;
    report.idle_connections = u32::try_from(open_at_end).unwrap_or(u32::MAX);
    Ok(report)
}

/// A connected client and its event loop, CONNACK received.
async fn connect(args: &MqttArgs, client_id: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(client_id, args.common.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_inflight(args.inflight.max(1));
    let packet_max = args.common.size_bytes + client_id.len() + 1024;
    options.set_max_packet_size(packet_max.max(10 * 1024), packet_max.max(10 * 1024));
    if let Some(username) = &args.username {
        options.set_credentials(username.clone(), args.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(options, usize::from(args.inflight.max(1)));
    events.set_network_options(no_delay(events.network_options()));
    tokio::time::timeout(SETUP_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => bail!("{client_id} could not connect to {}:{}: {error}", args.common.host, args.port),
            }
        }
    })
    .await
    .with_context(|| format!("{client_id}: no CONNACK in time"))??;
    Ok((client, events))
}

/// `network` with TCP_NODELAY, as `wharf bench amqp`'s client sets it. rumqttc leaves Nagle's
/// algorithm on: a PUBLISH written while an earlier segment is unacknowledged then waits for the
/// broker's next segment (its PUBACK, after a commit) or a delayed-ACK timer, and the load
/// generator's wait would be charged to the broker. Measured on Wharf at 10,000 msg/s: the median
/// time from a PUBLISH's due time to its decoding by the broker fell from 0.5 – 1 ms to under 0.25 ms.
fn no_delay(mut network: rumqttc::NetworkOptions) -> rumqttc::NetworkOptions {
    network.set_tcp_nodelay(true);
    network
}

/// What a publisher's event loop counts: its publishes acknowledged by the broker (or written, at
/// QoS 0), each as sent or, given a duplicate verdict, as refused.
#[derive(Clone)]
struct Acks {
    acked: Arc<AtomicU64>,
    counters: Arc<Counters>,
}

impl Acks {
    fn count(&self, duplicate: bool) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        let counter = if duplicate { &self.counters.refused } else { &self.counters.sent };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An MQTT 3.1.1 publisher's event loop: counts PUBACKs, PUBCOMPs or written QoS 0 publishes
/// until `done`.
async fn count_acks(
    mut events: EventLoop,
    qos: QoS,
    acks: Acks,
    mut done: watch::Receiver<bool>,
    index: u32,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => acks.count(false),
                Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => acks.count(false),
                Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => acks.count(false),
                Ok(_) => {}
                Err(error) => return Err(anyhow::anyhow!("publisher {index}: {error}")),
            },
            _ = done.changed() => return Ok(()),
        }
    }
}

/// One publisher: publish on schedule while its event loop counts acknowledgements, then wait
/// for the last ones. `stamping` is the stamps' epoch, the publisher's index and the payload size.
async fn publish(
    client: Publisher,
    event_loop: tokio::task::JoinHandle<anyhow::Result<()>>,
    acks: Acks,
    done: watch::Sender<bool>,
    topic: String,
    mut schedule: Schedule,
    (epoch, index, size): (Instant, u32, usize),
) -> anyhow::Result<()> {
    let mut published = 0;
    while let Some(due) = schedule.next().await {
        client.publish(&topic, published, stamp(epoch, due, index, published, size)).await?;
        published += 1;
        if event_loop.is_finished() {
            break;
        }
    }
    // Every publish acknowledged (or written, at QoS 0), or the connection failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.acked.load(Ordering::Relaxed) < published && !event_loop.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection just closes: every publish is acknowledged already (a lost connection shows
    // as publishes never counted as sent).
    done.send_replace(true);
    event_loop.await.context("publisher event loop")??;
    drop(client);
    Ok(())
}

/// A publisher's client: MQTT 3.1.1, or MQTT 5 with an idempotency key per message.
enum Publisher {
    V3(AsyncClient, QoS),
    V5 { client: v5::AsyncClient, qos: v5::mqttbytes::QoS, keys: String },
}

impl Publisher {
    /// Queue message `seq` for publishing.
    async fn publish(&self, topic: &str, seq: u64, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Self::V3(client, qos) => client.publish(topic, *qos, false, payload).await.context("publish"),
            Self::V5 { client, qos, keys } => {
                let properties = v5::mqttbytes::v5::PublishProperties {
                    user_properties: vec![("idempotency-key".into(), format!("{keys}-{seq}"))],
                    ..Default::default()
                };
                client.publish_with_properties(topic, *qos, false, payload, properties).await.context("publish")
            }
        }
    }
}

/// An MQTT 5 client and its event loop, CONNACK received (publishers with idempotency keys).
async fn connect_v5(args: &MqttArgs, client_id: &str) -> anyhow::Result<(v5::AsyncClient, v5::EventLoop)> {
    let mut options = v5::MqttOptions::new(client_id, args.common.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    options.set_outgoing_inflight_upper_limit(args.inflight.max(1));
    if let Some(username) = &args.username {
        options.set_credentials(username.clone(), args.password.clone().unwrap_or_default());
    }
    options.set_network_options(no_delay(options.network_options()));
    let (client, mut events) = v5::AsyncClient::new(options, usize::from(args.inflight.max(1)));
    tokio::time::timeout(SETUP_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(v5::Event::Incoming(v5::Incoming::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => bail!("{client_id} could not connect to {}:{}: {error}", args.common.host, args.port),
            }
        }
    })
    .await
    .with_context(|| format!("{client_id}: no CONNACK in time"))??;
    Ok((client, events))
}

/// Whether an MQTT 5 acknowledgement's user properties carry Wharf's duplicate verdict.
fn is_duplicate_verdict(user_properties: &[(String, String)]) -> bool {
    user_properties.iter().any(|(key, value)| key == "idempotency-verdict" && value == "duplicate")
}

/// An MQTT 5 publisher's event loop: as [`count_acks`], telling duplicate verdicts apart.
async fn count_acks_v5(
    mut events: v5::EventLoop,
    qos: v5::mqttbytes::QoS,
    acks: Acks,
    mut done: watch::Receiver<bool>,
    index: u32,
) -> anyhow::Result<()> {
    use v5::mqttbytes::QoS as QoS5;
    // A QoS 2 exchange's verdict comes on its PUBREC; it counts when PUBCOMP completes it.
    let mut duplicate_pkids = std::collections::HashSet::new();
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(v5::Event::Incoming(v5::Incoming::PubAck(ack))) if qos == QoS5::AtLeastOnce => {
                    acks.count(ack.properties.is_some_and(|p| is_duplicate_verdict(&p.user_properties)));
                }
                Ok(v5::Event::Incoming(v5::Incoming::PubRec(rec))) if qos == QoS5::ExactlyOnce => {
                    if rec.properties.is_some_and(|p| is_duplicate_verdict(&p.user_properties)) {
                        duplicate_pkids.insert(rec.pkid);
                    }
                }
                Ok(v5::Event::Incoming(v5::Incoming::PubComp(comp))) if qos == QoS5::ExactlyOnce => {
                    acks.count(duplicate_pkids.remove(&comp.pkid));
                }
                Ok(v5::Event::Outgoing(Outgoing::Publish(_))) if qos == QoS5::AtMostOnce => acks.count(false),
                Ok(_) => {}
                Err(error) => return Err(anyhow::anyhow!("publisher {index}: {error}")),
            },
            _ = done.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wharfs_duplicate_verdict_counts_as_a_duplicate() {
        let property = |key: &str, value: &str| vec![(key.to_owned(), value.to_owned())];
        assert!(is_duplicate_verdict(&property("idempotency-verdict", "duplicate")));
        assert!(!is_duplicate_verdict(&property("idempotency-verdict", "new")));
        assert!(!is_duplicate_verdict(&property("other", "duplicate")));
        assert!(!is_duplicate_verdict(&[]));
    }
}
