//! Python's pika against Wharf: the README example (declare, bind to `amq.topic`, publish with
//! publisher confirms, consume and ack), an MQTT publish reaching an AMQP queue bound to
//! `amq.topic`, and the AMQP topology: exchanges of every type, the default and predeclared
//! exchanges, exchange-to-exchange bindings, alternate and internal exchanges; queue declare,
//! passive declare, exclusive and auto-delete queues, purge, delete, bindings; and the queue
//! arguments (TTLs, `x-expires`, length limits and overflow modes, dead-lettering with `x-death`,
//! priorities, single active consumer, delivery limit, queue types, invalid values).
//!
//! Each test starts its own broker and runs one scenario of `pika_check.py`, which exits 0 only
//! when Wharf answered as RabbitMQ documents (reply codes and reply texts included; a channel
//! error must leave the connection usable). Touches only the broker it starts.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, python, require_program, run_with_timeout, workspace_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn run(broker: &Broker, scenario: &str) {
    let mut command = Command::new(python());
    command.arg(workspace_dir().join("conformance/amqp/pika_check.py")).arg(scenario).args([
        "--port",
        &broker.amqp_port().to_string(),
        "--mqtt-port",
        &broker.mqtt_port().to_string(),
        "--admin-port",
        &broker.admin_port().to_string(),
    ]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "pika scenario {scenario} failed: {status}\n{stdout}{stderr}\n{}", broker.log());
}

/// Run `scenario` against a broker of its own with the default settings.
fn run_alone(scenario: &str) {
    let broker = Broker::start();
    run(&broker, scenario);
}

#[test]
fn pika_readme_delayed_idempotent_publish_arrives_once_after_its_delay() {
    run_alone("readme-delayed");
}

#[test]
fn pika_exclusive_consumer_keeps_every_other_consumer_out_until_cancelled() {
    run_alone("exclusive-consumer");
}

#[test]
fn pika_consumer_priority_serves_the_higher_consumer_first() {
    run_alone("consumer-priority");
}

#[test]
fn pika_metrics_count_connections_channels_consumers_and_traffic_by_vhost() {
    run_alone("metrics-by-vhost");
}

#[test]
fn pika_disk_alarm_sends_connection_blocked_and_holds_publishers() {
    let broker = Broker::builder().env("WHARF__ALARMS__DISK_FREE_MIN_BYTES", u64::MAX - 1).start();
    run(&broker, "disk-alarm-blocks-publishers");
}

#[test]
fn pika_readme_example_publish_confirm_consume_ack() {
    let broker = Broker::start();
    run(&broker, "readme");
}

#[test]
fn pika_queue_bound_to_amq_topic_receives_mqtt_publishes() {
    require_program("mosquitto_pub");
    let broker = Broker::start();
    run(&broker, "from-mqtt");
}

// ----- exchanges ---------------------------------------------------------------------------------

#[test]
fn pika_direct_exchange_routes_by_exact_routing_key() {
    run_alone("exchange-direct");
}

#[test]
fn pika_fanout_exchange_routes_to_every_bound_queue_whatever_the_key() {
    run_alone("exchange-fanout");
}

#[test]
fn pika_topic_exchange_matches_star_as_one_word_and_hash_as_zero_or_more() {
    run_alone("exchange-topic");
}

#[test]
fn pika_headers_exchange_matches_x_match_all_and_any() {
    run_alone("exchange-headers");
}

#[test]
fn pika_default_exchange_routes_by_queue_name_and_refuses_bindings() {
    run_alone("default-exchange");
}

#[test]
fn pika_predeclared_amq_exchanges_exist_and_route() {
    run_alone("predeclared-exchanges");
}

#[test]
fn pika_declaring_an_amq_prefixed_exchange_is_access_refused() {
    run_alone("reserved-exchange-name");
}

#[test]
fn pika_passive_declare_of_a_missing_exchange_is_not_found() {
    run_alone("exchange-passive-missing");
}

#[test]
fn pika_exchange_redeclared_with_another_type_or_durability_is_precondition_failed() {
    run_alone("exchange-inequivalent");
}

#[test]
fn pika_exchange_to_exchange_binding_routes_and_unbind_stops_it() {
    run_alone("exchange-to-exchange");
}

#[test]
fn pika_alternate_exchange_receives_unroutable_messages() {
    run_alone("alternate-exchange");
}

#[test]
fn pika_internal_exchange_refuses_publishes_but_routes_from_a_bound_exchange() {
    run_alone("internal-exchange");
}

#[test]
fn pika_auto_delete_exchange_goes_away_with_its_last_binding() {
    run_alone("auto-delete-exchange");
}

#[test]
fn pika_exchange_delete_if_unused_of_a_bound_exchange_is_refused_and_of_a_missing_one_succeeds() {
    run_alone("exchange-delete");
}

// ----- queues ------------------------------------------------------------------------------------

#[test]
fn pika_durable_queue_and_exchange_survive_a_restart_and_transient_ones_do_not() {
    let mut broker = Broker::start();
    run(&broker, "queue-durable-before-restart");
    broker.stop();
    broker.restart();
    run(&broker, "queue-durable-after-restart");
}

#[test]
fn pika_passive_queue_declare_returns_ready_and_consumer_counts_and_missing_is_not_found() {
    run_alone("queue-passive");
}

#[test]
fn pika_server_named_queue_gets_an_amq_gen_name() {
    run_alone("queue-server-named");
}

#[test]
fn pika_queue_redeclared_with_other_flags_or_arguments_is_precondition_failed() {
    run_alone("queue-inequivalent");
}

#[test]
fn pika_queue_redeclared_with_an_added_argument_names_its_value_and_type() {
    run_alone("queue-inequivalent-added-argument");
}

#[test]
fn pika_exclusive_queue_is_locked_to_its_connection_and_deleted_when_it_closes() {
    run_alone("queue-exclusive");
}

#[test]
fn pika_auto_delete_queue_is_deleted_when_its_last_consumer_cancels() {
    run_alone("queue-auto-delete");
}

#[test]
fn pika_queue_purge_returns_the_count_and_empties_the_queue() {
    run_alone("queue-purge");
}

#[test]
fn pika_queue_delete_if_unused_and_if_empty_are_refused_and_delete_returns_the_count() {
    run_alone("queue-delete");
}

#[test]
fn pika_queue_bind_and_unbind_by_routing_key_and_by_header_arguments() {
    run_alone("queue-bind-unbind");
}

// ----- queue arguments ---------------------------------------------------------------------------

#[test]
fn pika_x_message_ttl_expires_queued_messages() {
    run_alone("message-ttl");
}

#[test]
fn pika_expiration_property_expires_a_message_and_the_shorter_ttl_wins() {
    run_alone("per-message-ttl");
}

#[test]
fn pika_x_expires_deletes_an_unused_queue() {
    run_alone("queue-expires");
}

#[test]
fn pika_x_max_length_drops_the_oldest_message() {
    run_alone("max-length-drop-head");
}

#[test]
fn pika_x_overflow_reject_publish_nacks_the_publish_and_keeps_the_queue() {
    run_alone("max-length-reject-publish");
}

#[test]
fn pika_x_overflow_reject_publish_dlx_nacks_and_dead_letters_the_publish() {
    run_alone("max-length-reject-publish-dlx");
}

#[test]
fn pika_x_max_length_bytes_counts_bodies_and_drops_the_oldest() {
    run_alone("max-length-bytes");
}

#[test]
fn pika_rejected_message_is_dead_lettered_with_rabbitmq_x_death_header() {
    run_alone("dead-letter-rejected");
}

#[test]
fn pika_expired_message_is_dead_lettered_with_x_death_and_original_expiration() {
    run_alone("dead-letter-expired");
}

#[test]
fn pika_message_dropped_by_max_length_is_dead_lettered_with_reason_maxlen() {
    run_alone("dead-letter-maxlen");
}

#[test]
fn pika_x_delivery_limit_dead_letters_a_message_returned_more_often_than_the_limit() {
    run_alone("delivery-limit");
}

#[test]
fn pika_x_max_priority_delivers_higher_priority_first_and_caps_at_the_maximum() {
    run_alone("max-priority");
}

#[test]
fn pika_x_max_priority_zero_is_accepted() {
    run_alone("max-priority-zero");
}

#[test]
fn pika_x_single_active_consumer_delivers_to_one_consumer_until_it_cancels() {
    run_alone("single-active-consumer");
}

#[test]
fn pika_x_queue_type_classic_and_quorum_are_accepted_and_stream_is_refused() {
    run_alone("queue-types");
}

#[test]
fn pika_invalid_queue_arguments_are_precondition_failed_with_rabbitmq_text() {
    run_alone("invalid-arguments");
}

#[test]
fn pika_unknown_x_overflow_is_precondition_failed_with_rabbitmq_text() {
    run_alone("invalid-overflow-text");
}
