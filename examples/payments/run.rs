//! The payments example's logic, shared by `examples/payments/main.rs` and the test that runs it
//! (`tests/examples.rs`): a broker process, payment orders from MQTT devices and an AMQP web
//! shop (retried with the same idempotency keys until confirmed), a processor on the native API
//! that acknowledges each order and publishes its ledger entry in one transaction, an AMQP
//! ledger consumer, optional chaos (the processor killed and restarted, the broker SIGKILLed and
//! restarted), and the final checks: every order applied exactly once, the ledger balanced.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::v5;
use wharf_client::{Client, ConsumeOptions, MessageExt, message};

use crate::broker::Broker;

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `wharf` binary.
    pub wharf: PathBuf,
    /// Payment orders, half from MQTT devices, half from the web shop.
    pub orders: u32,
    /// Kill and restart the processor and the broker at random points.
    pub chaos: bool,
    /// Seed of the chaos schedule (a run is repeatable up to thread timing).
    pub seed: u64,
    /// Longest time for the whole run.
    pub timeout: Duration,
}

/// What the run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub orders: u32,
    pub orders_from_mqtt: u32,
    pub orders_from_amqp: u32,
    pub producer_retries: u64,
    pub duplicate_verdicts: u64,
    pub broker_kills: u32,
    pub processor_kills: u32,
    pub transactions_committed: u64,
    pub transactions_aborted: u64,
    pub ledger_entries: u32,
    pub ledger_redeliveries: u64,
    pub lost: u32,
    pub duplicates: u32,
    pub expected_total_cents: u64,
    pub ledger_total_cents: u64,
    pub accounts_balanced: bool,
}

impl Report {
    /// Exactly once, and balanced.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.ledger_entries == self.orders
            && self.expected_total_cents == self.ledger_total_cents
            && self.accounts_balanced
    }

    pub fn text(&self) -> String {
        format!(
            "orders: {} ({} over MQTT, {} over AMQP), producer retries {}, duplicate verdicts {}\n\
             faults: broker killed {} times, processor killed {} times\n\
             transactions: {} committed, {} aborted (retried)\n\
             ledger: {} entries, {} redeliveries (same stored entry)\n\
             lost {} | duplicates {} | total {} cents expected, {} in the ledger | accounts balanced: {}\n\
             {}\n",
            self.orders,
            self.orders_from_mqtt,
            self.orders_from_amqp,
            self.producer_retries,
            self.duplicate_verdicts,
            self.broker_kills,
            self.processor_kills,
            self.transactions_committed,
            self.transactions_aborted,
            self.ledger_entries,
            self.ledger_redeliveries,
            self.lost,
            self.duplicates,
            self.expected_total_cents,
            self.ledger_total_cents,
            self.accounts_balanced,
            if self.ok() { "EXACTLY ONCE: every order applied once, the ledger balances" } else { "FAILED" },
        )
    }
}

/// Accounts orders are spread over.
const ACCOUNTS: u32 = 5;
/// A pause before a client tries again after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Longest wait for one acknowledgement before a producer gives up on its connection.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// A producer's pause between orders: orders keep flowing while the chaos strikes.
const ORDER_INTERVAL: Duration = Duration::from_millis(30);

fn amount_cents(order: u32) -> u64 {
    u64::from(order * 37 % 1000 + 1)
}

fn order_payload(order: u32) -> String {
    format!("order={order};account={};amount={}", order % ACCOUNTS, amount_cents(order))
}

/// `order=..;account=..;amount=..` (a ledger entry carries the same fields).
fn parse(payload: &[u8]) -> Option<(u32, u32, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.split(';').map(|field| field.split_once('=').map(|(_, value)| value));
    let order = fields.next()??.parse().ok()?;
    let account = fields.next()??.parse().ok()?;
    let amount = fields.next()??.parse().ok()?;
    Some((order, account, amount))
}

// ----- producers ------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Counters {
    retries: AtomicU64,
    duplicate_verdicts: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
    redeliveries: AtomicU64,
}

/// An MQTT 5 device publishing its orders at QoS 1, each with an `idempotency-key` user
/// property, one at a time, again (same key) until a PUBACK comes.
async fn device(mqtt_port: u16, orders: Vec<u32>, counters: Arc<Counters>) {
    for order in orders {
        tokio::time::sleep(ORDER_INTERVAL).await;
        loop {
            match device_publish(mqtt_port, order, &counters).await {
                Ok(()) => break,
                Err(error) => {
                    verbose(&format!("device: order {order}: {error}; again with the same key"));
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

async fn device_publish(mqtt_port: u16, order: u32, counters: &Counters) -> anyhow::Result<()> {
    let mut options = v5::MqttOptions::new(format!("device-{order}"), "127.0.0.1", mqtt_port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = v5::AsyncClient::new(options, 10);
    let properties = v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("idempotency-key".into(), format!("order-{order}"))],
        ..Default::default()
    };
    client
        .publish_with_properties(
            format!("payments/orders/{}", order % ACCOUNTS),
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            order_payload(order),
            properties,
        )
        .await?;
    let acked = tokio::time::timeout(ACK_TIMEOUT, async {
        loop {
            match events.poll().await? {
                v5::Event::Incoming(v5::Incoming::PubAck(ack)) => {
                    let duplicate = ack.properties.is_some_and(|p| {
                        p.user_properties.iter().any(|(k, v)| k == "idempotency-verdict" && v == "duplicate")
                    });
                    return Ok::<bool, v5::ConnectionError>(duplicate);
                }
                _ => continue,
            }
        }
    })
    .await??;
    if acked {
        counters.duplicate_verdicts.fetch_add(1, Ordering::Relaxed);
    }
    let _ = client.disconnect().await;
    Ok(())
}

/// The web shop: AMQP with publisher confirms, an `x-idempotency-key` header per order, again
/// (same key) until confirmed.
async fn shop(uri: String, orders: Vec<u32>, counters: Arc<Counters>) {
    let mut channel: Option<(Connection, lapin::Channel)> = None;
    for order in orders {
        tokio::time::sleep(ORDER_INTERVAL).await;
        loop {
            if channel.is_none() {
                channel = shop_connect(&uri).await.ok();
            }
            let Some((_, open)) = &channel else {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let mut headers = FieldTable::default();
            headers.insert("x-idempotency-key".into(), AMQPValue::LongString(format!("order-{order}").as_str().into()));
            let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
            let publish = async {
                open.basic_publish(
                    "".into(),
                    "orders".into(),
                    BasicPublishOptions::default(),
                    order_payload(order).as_bytes(),
                    properties,
                )
                .await?
                .await
            };
            match tokio::time::timeout(ACK_TIMEOUT, publish).await {
                Ok(Ok(confirmation)) if confirmation.is_ack() => break,
                outcome => {
                    verbose(&format!("shop: order {order}: {outcome:?}; again with the same key"));
                    channel = None;
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
}

/// An AMQP connection and a channel with confirms; every step bounded (a broker killed
/// mid-handshake must not leave the client waiting).
async fn shop_connect(uri: &str) -> anyhow::Result<(Connection, lapin::Channel)> {
    tokio::time::timeout(ACK_TIMEOUT, async {
        let connection = Connection::connect(uri, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>((connection, channel))
    })
    .await?
    .map_err(Into::into)
}

// ----- the processor (native API) -------------------------------------------------------------

/// Consume orders and, for each, acknowledge it and publish its ledger entry in one transaction.
/// Runs until aborted (chaos) or the broker stops answering, then returns for a restart.
async fn processor(url: String, counters: Arc<Counters>) {
    loop {
        if let Err(error) = process(&url, &counters).await {
            verbose(&format!("processor: {error}; reconnecting"));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

fn verbose(line: &str) {
    if std::env::var_os("PAYMENTS_VERBOSE").is_some() {
        eprintln!("{line}");
    }
}

async fn process(url: &str, counters: &Counters) -> anyhow::Result<()> {
    let (client, mut orders) = tokio::time::timeout(ACK_TIMEOUT, async {
        let client = Client::connect(url.to_owned()).await?;
        let orders = client.consume("/", "orders", ConsumeOptions { credit: 20, ..ConsumeOptions::default() }).await?;
        Ok::<_, wharf_client::Error>((client, orders))
    })
    .await??;
    while let Some(delivery) = orders.next().await? {
        let Some((order, account, amount)) = delivery.message.as_ref().and_then(|m| parse(&m.payload)) else {
            bail!("an order that does not parse");
        };
        let entry = message("", "ledger", format!("order={order};account={account};amount={amount}"))
            .key(format!("ledger-{order}"));
        match client.consume_transform_produce(&orders, &delivery, vec![("/".into(), entry)]).await {
            Ok(_) => {
                counters.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) if error.reason() == Some("ABORTED") => {
                counters.aborted.fetch_add(1, Ordering::Relaxed);
                // Rolled back: the order is still held (or back in the queue) and is processed
                // again. If its entry is in the ledger already (the order came twice), just ack it.
                if client.query_key("/", "ledger", &format!("ledger-{order}")).await?.is_some() {
                    orders.ack(&delivery).await?;
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

// ----- the ledger (AMQP) ----------------------------------------------------------------------

#[derive(Debug, Default)]
struct Ledger {
    /// Applied entries by order: (account, amount).
    entries: BTreeMap<u32, (u32, u64)>,
    /// Second stored copies of an entry (delivered as new, not as a redelivery).
    duplicates: u32,
}

/// Apply ledger entries (idempotently by order: a redelivery of an entry not yet acknowledged
/// when a connection broke is applied once) and acknowledge them.
async fn ledger(uri: String, book: Arc<Mutex<Ledger>>, counters: Arc<Counters>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::Relaxed) {
        if let Err(error) = read_ledger(&uri, &book, &counters, &done).await {
            verbose(&format!("ledger: {error}; reconnecting"));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn read_ledger(uri: &str, book: &Mutex<Ledger>, counters: &Counters, done: &AtomicBool) -> anyhow::Result<()> {
    let (_connection, channel) = shop_connect(uri).await?;
    let mut deliveries = tokio::time::timeout(ACK_TIMEOUT, async {
        channel.basic_qos(50, BasicQosOptions::default()).await?;
        let options = BasicConsumeOptions::default();
        channel.basic_consume("ledger".into(), "ledger".into(), options, FieldTable::default()).await
    })
    .await??;
    while !done.load(Ordering::Relaxed) {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await else { continue };
        let Some(delivery) = next else { bail!("the ledger consumer was closed") };
        let delivery = delivery?;
        let (order, account, amount) = parse(&delivery.data).context("a ledger entry that does not parse")?;
        {
            let mut book = book.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if delivery.redelivered {
                counters.redeliveries.fetch_add(1, Ordering::Relaxed);
            } else if book.entries.contains_key(&order) {
                book.duplicates += 1;
            }
            book.entries.entry(order).or_insert((account, amount));
        }
        tokio::time::timeout(ACK_TIMEOUT, delivery.ack(BasicAckOptions::default())).await??;
    }
    Ok(())
}

// ----- the run ------------------------------------------------------------------------------

/// A small deterministic generator for the chaos schedule (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low))
    }
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    let mut broker = Broker::start(options.wharf.clone())?;
    let admin = Client::connect(broker.native_url()).await?;
    admin.declare_queue("orders").await?;
    admin.declare_queue("ledger").await?;
    admin.bind_queue("orders", "amq.topic", "payments.orders.*").await?;

    let counters = Arc::new(Counters::default());
    let book = Arc::new(Mutex::new(Ledger::default()));
    let done = Arc::new(AtomicBool::new(false));
    let (mqtt_orders, amqp_orders): (Vec<u32>, Vec<u32>) = (0..options.orders).partition(|order| order % 2 == 0);
    let mut report = Report {
        orders: options.orders,
        orders_from_mqtt: mqtt_orders.len() as u32,
        orders_from_amqp: amqp_orders.len() as u32,
        ..Report::default()
    };
    let producers = [
        tokio::spawn(device(broker.mqtt, mqtt_orders, Arc::clone(&counters))),
        tokio::spawn(shop(broker.amqp_uri(), amqp_orders, Arc::clone(&counters))),
    ];
    let ledger_task =
        tokio::spawn(ledger(broker.amqp_uri(), Arc::clone(&book), Arc::clone(&counters), Arc::clone(&done)));
    let mut processor_task = tokio::spawn(processor(broker.native_url(), Arc::clone(&counters)));

    let deadline = Instant::now() + options.timeout;
    let applied = |book: &Mutex<Ledger>| book.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entries.len();
    let mut rng = Rng(options.seed | 1);
    let mut next_fault = Instant::now() + rng.millis(100, 600);
    // Chaos lasts while orders are being produced and processed, and stops in time for the rest
    // to settle.
    let chaos_until = Instant::now() + options.timeout / 2;
    while applied(&book) < options.orders as usize {
        if Instant::now() > deadline {
            break;
        }
        if options.chaos && Instant::now() >= next_fault && Instant::now() < chaos_until {
            // The first two faults are one of each kind; the rest are drawn.
            let faults = report.broker_kills + report.processor_kills;
            let kill_broker = match faults {
                0 => true,
                1 => false,
                _ => rng.next().is_multiple_of(2),
            };
            if kill_broker {
                broker.kill();
                report.broker_kills += 1;
                tokio::time::sleep(rng.millis(50, 500)).await;
                tokio::task::block_in_place(|| broker.spawn())?;
            } else {
                processor_task.abort();
                report.processor_kills += 1;
                tokio::time::sleep(rng.millis(0, 300)).await;
                processor_task = tokio::spawn(processor(broker.native_url(), Arc::clone(&counters)));
            }
            next_fault = Instant::now() + rng.millis(200, 900);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for producer in producers {
        if tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), producer).await.is_err() {
            bail!(
                "the producers did not finish in time ({} of {} orders applied); broker log:\n{}",
                applied(&book),
                options.orders,
                broker.log()
            );
        }
    }
    // A quiet moment: a late duplicate would show now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    processor_task.abort();
    let _ = ledger_task.await;

    let book = Arc::try_unwrap(book)
        .map_err(|_| anyhow::anyhow!("ledger still shared"))?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut expected_by_account: HashMap<u32, u64> = HashMap::new();
    for order in 0..options.orders {
        *expected_by_account.entry(order % ACCOUNTS).or_default() += amount_cents(order);
    }
    let mut ledger_by_account: HashMap<u32, u64> = HashMap::new();
    for (account, amount) in book.entries.values() {
        *ledger_by_account.entry(*account).or_default() += amount;
    }
    report.producer_retries = counters.retries.load(Ordering::Relaxed);
    report.duplicate_verdicts = counters.duplicate_verdicts.load(Ordering::Relaxed);
    report.transactions_committed = counters.committed.load(Ordering::Relaxed);
    report.transactions_aborted = counters.aborted.load(Ordering::Relaxed);
    report.ledger_redeliveries = counters.redeliveries.load(Ordering::Relaxed);
    report.ledger_entries = book.entries.len() as u32;
    report.lost = (0..options.orders).filter(|order| !book.entries.contains_key(order)).count() as u32;
    report.duplicates = book.duplicates;
    report.expected_total_cents = expected_by_account.values().sum();
    report.ledger_total_cents = ledger_by_account.values().sum();
    report.accounts_balanced = expected_by_account == ledger_by_account;
    if !report.ok() {
        eprintln!("broker log:\n{}", broker.log());
    }
    Ok(report)
}
