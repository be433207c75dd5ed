//! MQTT topic names and filters, and their mapping onto AMQP topic-exchange routing keys and
//! binding patterns. Pure functions over strings; touches nothing else.
//!
//! The mapping swaps `/` and `.` (as RabbitMQ's MQTT plugin does), so it is a bijection on topic
//! names: `a/b.c` is the routing key `a.b/c`, and back. In filters `+` becomes `*` and `#` stays
//! `#`. A filter level that is a literal `*` (legal in MQTT) would become an AMQP wildcard: the
//! front-end re-checks every delivery against the MQTT filter (`filter_matches`), so such a
//! subscription receives exactly what MQTT says it should.

/// The AMQP routing key of an MQTT topic name.
pub fn topic_to_routing_key(topic: &str) -> String {
    swap_separators(topic)
}

/// The MQTT topic name of an AMQP routing key (the inverse of [`topic_to_routing_key`]).
pub fn routing_key_to_topic(routing_key: &str) -> String {
    swap_separators(routing_key)
}

/// The AMQP topic binding pattern of an MQTT topic filter (not a shared one).
pub fn filter_to_pattern(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| match level {
            "+" => "*".to_owned(),
            "#" => "#".to_owned(),
            other => other.replace('.', "/"),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn swap_separators(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            other => other,
        })
        .collect()
}

/// Whether the MQTT `filter` matches the topic name `topic` (MQTT 4.7): `+` one level, `#` the
/// parent level and every level below, and a filter starting with a wildcard does not match a
/// topic starting with `$` [MQTT-4.7.2-1].
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_a_bijection_on_topic_names() {
        for topic in ["a/b", "a.b/c", "", "/", "a//b", "$SYS/broker/uptime", "sport/tennis/player1.x"] {
            let key = topic_to_routing_key(topic);
            assert_eq!(routing_key_to_topic(&key), topic);
        }
        assert_eq!(topic_to_routing_key("a/b.c"), "a.b/c");
    }

    #[test]
    fn filters_become_patterns() {
        assert_eq!(filter_to_pattern("a/+/c"), "a.*.c");
        assert_eq!(filter_to_pattern("a/#"), "a.#");
        assert_eq!(filter_to_pattern("#"), "#");
        assert_eq!(filter_to_pattern("a.b/+"), "a/b.*");
    }

    // [MQTT-4.7.1-1], [MQTT-4.7.1-2], [MQTT-4.7.2-1] and the examples of section 4.7.
    #[test]
    fn mqtt_4_7_filter_matching() {
        assert!(filter_matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(filter_matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("#", "a/b/c"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!filter_matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(!filter_matches("#", "$SYS/uptime"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(filter_matches("a/*", "a/*"));
        assert!(!filter_matches("a/*", "a/b"));
    }
}
