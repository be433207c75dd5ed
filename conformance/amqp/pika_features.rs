//! Python's pika against the real `wharf` binary, on Wharf's newest AMQP features: idempotency
//! keys (`x-idempotency-key` or `message-id`, by the `amqp.idempotency_key` setting), partition
//! keys (`x-partition-key` on a queue with `x-partitions`), delayed-message exchanges (the API of
//! RabbitMQ's rabbitmq-delayed-message-exchange plugin, across a restart too), global basic.qos
//! (with per-consumer qos, changed while consumers run), basic.cancel keeping unacked deliveries
//! and losing nothing in flight, mandatory returns at tx.commit and acks abandoned by tx.rollback.
//!
//! Each test starts its own broker (with the `WHARF__AMQP__*` settings it needs) and runs one
//! scenario of `pika_features_check.py`, which exits 0 only when Wharf answered as RabbitMQ (or
//! its plugin) documents, or, for the features RabbitMQ lacks, as Wharf documents them. Touches
//! only the broker it starts and a Python child process.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, python, run_with_timeout, workspace_dir};

/// Longest run of one scenario; the script's own watchdog fails it after 30 s, naming the cause.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Run `scenario` against `broker`, telling it the broker's `amqp.idempotency_key` source.
fn run_with_source(broker: &Broker, scenario: &str, source: &str) {
    let mut command = Command::new(python());
    command.arg(workspace_dir().join("conformance/amqp/pika_features_check.py")).arg(scenario).args([
        "--port",
        &broker.amqp_port().to_string(),
        "--idempotency-key",
        source,
    ]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "pika scenario {scenario} failed: {status}\n{stdout}{stderr}\n{}", broker.log());
}

/// Run `scenario` against `broker`, which has the default `amqp.idempotency_key` (`header`).
fn run(broker: &Broker, scenario: &str) {
    run_with_source(broker, scenario, "header");
}

/// Run `scenario` against a broker of its own with the default settings.
fn run_alone(scenario: &str) {
    let broker = Broker::start();
    run(&broker, scenario);
}

/// Run the idempotency-source scenario against a broker whose `amqp.idempotency_key` is `source`.
fn run_idempotency_source(source: &str) {
    let broker = Broker::builder().env("WHARF__AMQP__IDEMPOTENCY_KEY", source).start();
    run_with_source(&broker, "idempotency-by-source", source);
}

// ----- idempotency keys --------------------------------------------------------------------------

#[test]
fn pika_by_default_x_idempotency_key_deduplicates_and_message_id_does_not() {
    // The default source is the header: no setting given.
    let broker = Broker::start();
    run_with_source(&broker, "idempotency-by-source", "header");
}

#[test]
fn pika_idempotency_key_message_id_setting_deduplicates_by_message_id_only() {
    run_idempotency_source("message-id");
}

#[test]
fn pika_idempotency_key_header_or_message_id_setting_deduplicates_by_either_header_first() {
    run_idempotency_source("header-or-message-id");
}

#[test]
fn pika_idempotency_key_none_setting_deduplicates_nothing() {
    run_idempotency_source("none");
}

#[test]
fn pika_x_idempotency_key_repeat_is_not_stored_after_the_original_was_consumed() {
    run_alone("idempotency-key-outlives-consumption");
}

#[test]
fn pika_x_idempotency_key_is_stored_once_in_each_destination_queue() {
    run_alone("idempotency-key-per-queue");
}

#[test]
fn pika_non_string_x_idempotency_key_closes_the_channel_406() {
    run_alone("idempotency-key-not-a-string");
}

// ----- partition keys ----------------------------------------------------------------------------

#[test]
fn pika_x_partition_key_keeps_publish_order_across_routing_keys_on_a_partitioned_queue() {
    run_alone("partition-key-order");
}

#[test]
fn pika_non_string_x_partition_key_closes_the_channel_406() {
    run_alone("partition-key-not-a-string");
}

// ----- delayed-message exchanges -----------------------------------------------------------------

#[test]
fn pika_x_delayed_message_exchange_holds_a_message_for_its_x_delay_and_not_others() {
    run_alone("delayed-direct-holds-for-x-delay");
}

#[test]
fn pika_x_delayed_message_exchange_routes_as_its_x_delayed_type() {
    run_alone("delayed-routing-follows-delayed-type");
}

#[test]
fn pika_queue_ttl_of_a_delayed_message_counts_from_the_end_of_its_delay() {
    run_alone("delayed-ttl-starts-after-delay");
}

#[test]
fn pika_x_delayed_message_without_x_delayed_type_is_precondition_failed_with_the_plugin_text() {
    run_alone("delayed-type-missing");
}

#[test]
fn pika_x_delayed_type_x_delayed_message_is_precondition_failed_with_the_plugin_text() {
    run_alone("delayed-type-self");
}

#[test]
fn pika_delayed_message_survives_a_restart_and_arrives_after_its_delay() {
    let mut broker = Broker::start();
    run(&broker, "delayed-restart-before");
    broker.stop();
    broker.restart();
    run(&broker, "delayed-restart-after");
}

#[test]
fn pika_mandatory_unroutable_publish_to_a_delayed_exchange_is_returned_at_publish() {
    run_alone("delayed-mandatory");
}

#[test]
fn pika_delayed_message_is_delivered_with_x_delay_negated_as_the_plugin_does() {
    run_alone("delayed-header-negated");
}

#[test]
fn pika_x_delay_given_as_a_string_delays_the_message_as_the_plugin_does() {
    run_alone("delayed-x-delay-converted");
}

// ----- global basic.qos --------------------------------------------------------------------------

#[test]
fn pika_global_qos_limits_unacked_deliveries_across_the_channels_consumers_and_raising_it_lets_more_through() {
    run_alone("global-qos-limits-the-channel");
}

#[test]
fn pika_global_qos_lowered_below_the_unacked_count_holds_deliveries_until_acks_bring_it_under() {
    run_alone("global-qos-lowered");
}

#[test]
fn pika_global_qos_of_zero_lifts_the_channel_limit() {
    run_alone("global-qos-zero-lifts-the-limit");
}

#[test]
#[ignore = "wharf bug: with the global window full, the starved consumer's first message is taken from its queue \
            and held in the channel: the queue counts 2 ready of 3 and basic.get elsewhere gets q2-1, not q2-0"]
fn pika_global_qos_full_window_leaves_other_queues_messages_ready_for_others() {
    run_alone("global-qos-window-leaves-messages-ready");
}

#[test]
fn pika_global_qos_channel_close_requeues_messages_never_sent_without_redelivered() {
    run_alone("global-qos-close-requeues-unsent-unredelivered");
}

#[test]
fn pika_global_and_per_consumer_qos_both_apply() {
    run_alone("global-and-per-consumer-qos");
}

#[test]
fn pika_per_consumer_qos_applies_to_consumers_started_afterwards_only() {
    run_alone("per-consumer-qos-applies-to-later-consumers");
}

// ----- basic.cancel ------------------------------------------------------------------------------

#[test]
fn pika_basic_cancel_keeps_unacked_deliveries_ackable_and_requeued_only_by_nack_or_channel_close() {
    run_alone("cancel-keeps-unacked");
}

#[test]
fn pika_ack_multiple_settles_a_cancelled_consumers_deliveries_with_a_later_consumers() {
    run_alone("cancel-then-ack-multiple");
}

#[test]
fn pika_messages_published_after_basic_cancel_ok_stay_in_the_queue() {
    run_alone("cancel-then-publish");
}

#[test]
fn pika_cancelling_an_auto_ack_consumer_with_a_backlog_in_flight_loses_no_message() {
    run_alone("cancel-auto-ack-with-backlog");
}

#[test]
fn pika_cancelling_a_manual_ack_consumer_with_a_backlog_in_flight_loses_no_message() {
    run_alone("cancel-manual-ack-with-backlog");
}

// ----- transactions ------------------------------------------------------------------------------

#[test]
fn pika_tx_mandatory_unroutable_publish_is_returned_at_commit_and_not_after_rollback() {
    run_alone("tx-mandatory-returned-at-commit");
}

#[test]
fn pika_tx_mandatory_publish_whose_queue_is_deleted_before_commit_is_returned_at_commit() {
    run_alone("tx-mandatory-queue-deleted-before-commit");
}

#[test]
fn pika_tx_rollback_leaves_acked_deliveries_unacked_to_be_acked_again() {
    run_alone("tx-rollback-keeps-acks-unacked");
}

#[test]
fn pika_tx_rollback_then_channel_close_requeues_the_deliveries_redelivered() {
    run_alone("tx-rollback-then-close-requeues");
}
