//! Python's pika against the real `wharf` binary: the basic class (publish, returns, properties
//! and headers, consume, cancel, get, ack/nack/reject/recover, qos), publisher confirms,
//! transactions and connection negotiation, with RabbitMQ's reply codes and texts. Each test
//! starts its own broker and runs one scenario of `pika_basic_check.py`, which exits 0 or says
//! what differed. Touches only the broker it starts and a Python child process.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, python, run_with_timeout, workspace_dir};

/// Longest run of one scenario; the script's own watchdog fails it after 25 s, naming its step.
const RUN_TIMEOUT: Duration = Duration::from_secs(40);

/// Start a broker and run `scenario` against it; fails the test with the script's output and
/// the broker's log unless the scenario exits 0.
fn check(scenario: &str) {
    let broker = Broker::start();
    let mut command = Command::new(python());
    command
        .arg(workspace_dir().join("conformance/amqp/pika_basic_check.py"))
        .arg(scenario)
        .args(["--port", &broker.amqp_port().to_string()]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "pika scenario {scenario} failed: {status}\n{stdout}{stderr}");
}

// Publishing.

#[test]
fn pika_mandatory_unroutable_publish_is_returned_312_no_route() {
    check("mandatory-unroutable-returned");
}

#[test]
fn pika_non_mandatory_unroutable_publish_is_dropped_and_confirmed() {
    check("unroutable-dropped-and-confirmed");
}

#[test]
fn pika_publish_to_missing_exchange_closes_channel_404() {
    check("publish-to-missing-exchange-404");
}

#[test]
fn pika_publish_with_foreign_user_id_closes_channel_406() {
    check("publish-foreign-user-id-406");
}

#[test]
fn pika_message_larger_than_frame_max_arrives_intact_in_body_frames() {
    check("large-message-split-into-frames");
}

#[test]
fn pika_empty_body_is_delivered() {
    check("empty-body");
}

// Properties and headers.

#[test]
fn pika_every_basic_property_and_header_type_is_preserved() {
    check("properties-and-headers-preserved");
}

// Consuming.

#[test]
fn pika_consume_with_server_generated_and_client_chosen_tags() {
    check("consumer-tags");
}

#[test]
fn pika_reused_consumer_tag_on_a_channel_closes_connection_530() {
    check("consumer-tag-reuse-530");
}

#[test]
fn pika_consume_on_missing_queue_closes_channel_404() {
    check("consume-missing-queue-404");
}

#[test]
fn pika_basic_cancel_stops_deliveries() {
    check("cancel-stops-deliveries");
}

#[test]
fn pika_queue_delete_sends_consumer_cancel_notification() {
    check("cancel-notification-on-queue-delete");
}

#[test]
fn pika_no_ack_consume_removes_messages_without_acks() {
    check("no-ack-consume");
}

#[test]
fn pika_exclusive_consume_on_queue_with_consumer_closes_channel_403() {
    check("exclusive-consume-refused-403");
}

#[test]
fn pika_two_consumers_of_one_queue_get_messages_round_robin() {
    check("round-robin");
}

#[test]
fn pika_basic_get_reports_remaining_message_count_and_get_empty() {
    check("basic-get");
}

// Settling.

#[test]
fn pika_ack_single_and_multiple_settle_exactly_those_tags() {
    check("ack-single-and-multiple");
}

#[test]
fn pika_nack_multiple_with_requeue_redelivers_with_redelivered_flag() {
    check("nack-multiple-requeue");
}

#[test]
fn pika_nack_multiple_without_requeue_dead_letters_or_drops() {
    check("nack-multiple-no-requeue");
}

#[test]
fn pika_reject_with_requeue_sets_redelivered() {
    check("reject-requeue");
}

#[test]
fn pika_reject_without_requeue_discards_the_message() {
    check("reject-discard");
}

#[test]
fn pika_ack_of_unknown_delivery_tag_closes_channel_406() {
    check("unknown-delivery-tag-406");
}

#[test]
fn pika_acking_a_tag_twice_closes_channel_406() {
    check("double-ack-406");
}

#[test]
fn pika_basic_recover_requeue_redelivers_unacked_messages() {
    check("recover-requeue");
}

#[test]
fn pika_channel_close_requeues_unacked_messages_to_other_consumers() {
    check("channel-close-requeues");
}

#[test]
fn pika_prefetch_count_limits_unacked_deliveries() {
    check("prefetch");
}

// Publisher confirms.

#[test]
fn pika_publisher_confirms_ack_every_publish_in_order() {
    check("confirms-in-order");
}

#[test]
fn pika_publish_refused_by_full_reject_publish_queue_is_nacked() {
    check("confirm-nack-reject-publish");
}

// Transactions.

#[test]
fn pika_tx_publishes_are_invisible_until_commit() {
    check("tx-commit");
}

#[test]
fn pika_tx_rollback_discards_publishes() {
    check("tx-rollback");
}

#[test]
fn pika_tx_acks_take_effect_only_at_commit() {
    check("tx-acks-at-commit");
}

#[test]
fn pika_tx_reject_takes_effect_only_at_commit() {
    check("tx-reject-at-commit");
}

#[test]
fn pika_tx_publishes_to_several_queues_and_ack_are_all_or_nothing() {
    check("tx-all-or-nothing");
}

#[test]
fn pika_tx_commit_and_rollback_on_non_transactional_channel_close_it_406() {
    check("tx-not-transactional-406");
}

#[test]
fn pika_confirm_select_on_transactional_channel_closes_it_406() {
    check("confirm-after-tx-406");
}

#[test]
fn pika_tx_select_on_confirm_channel_closes_it_406() {
    check("tx-after-confirm-406");
}

// Negotiation.

#[test]
fn pika_wrong_password_is_refused_403_access_refused() {
    check("wrong-password-403");
}

#[test]
fn pika_missing_vhost_is_refused_530_not_allowed() {
    check("missing-vhost-530");
}

#[test]
fn pika_negotiated_heartbeat_keeps_idle_connection_open() {
    check("heartbeat");
}

#[test]
fn pika_missed_client_heartbeats_close_the_connection() {
    check("missed-heartbeats");
}

#[test]
fn pika_client_connection_close_gets_close_ok() {
    check("client-close");
}
