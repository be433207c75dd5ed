//! Python's pika against Wharf: the README example (declare, bind to `amq.topic`, publish with
//! publisher confirms, consume and ack), and an MQTT publish reaching an AMQP queue bound to
//! `amq.topic`. The scenarios are in `pika_check.py`; each must exit 0.

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
    ]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, RUN_TIMEOUT);
    assert!(status.success(), "pika scenario {scenario} failed: {status}\n{stdout}{stderr}\n{}", broker.log());
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
