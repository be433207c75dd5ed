//! Topic Name and Topic Filter grammar (MQTT 3.1.1 section 4.7, MQTT 5.0 sections 4.7 and 4.8):
//! which names a PUBLISH may carry and which filters a SUBSCRIBE may, including the shared
//! subscription form `$share/{ShareName}/{filter}`. Pure string checks; U+0000 and ill-formed UTF-8
//! were already refused when the string was read. Public so the server can reuse them.

/// The shared-subscription prefix (MQTT 5.0 section 4.8.2).
pub const SHARED_PREFIX: &str = "$share/";

/// Why `name` is not a valid Topic Name, if it is not: empty ([MQTT-4.7.3-1]) or containing a
/// wildcard ([MQTT-3.3.2-2], [MQTT-4.7.0-1]).
pub fn check_topic_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("[MQTT-4.7.3-1] topic name is empty");
    }
    if name.contains(['+', '#']) {
        return Err("[MQTT-3.3.2-2] topic name contains a wildcard");
    }
    Ok(())
}

/// Why `filter` is not a valid Topic Filter, if it is not. Rules: not empty ([MQTT-4.7.3-1]); `#`
/// alone in the last level ([MQTT-4.7.1-2]); `+` alone in its level ([MQTT-4.7.1-3]); a filter
/// starting with `$share/` must be `$share/{ShareName}/{filter}` with a non-empty ShareName without
/// `/`, `+` or `#` ([MQTT-4.8.2-1], [MQTT-4.8.2-2]) and a valid, non-empty filter after it.
///
/// The shared form is checked for every protocol version: 3.1.1 has no shared subscriptions, but
/// servers (this one included) offer them to 3.1.1 clients under the same syntax.
pub fn check_topic_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("[MQTT-4.7.3-1] topic filter is empty");
    }
    let filter = match parse_shared(filter) {
        Some((_, inner)) => inner,
        None if filter.starts_with(SHARED_PREFIX) => {
            return Err("[MQTT-4.8.2-1] shared subscription needs $share/{ShareName}/{filter}: \
                        a non-empty ShareName without '+', '#' or '/', then a non-empty filter");
        }
        None => filter,
    };
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("[MQTT-4.7.1-2] '#' must be alone in the last level");
        }
        if level.contains('+') && level != "+" {
            return Err("[MQTT-4.7.1-3] '+' must occupy a whole level");
        }
    }
    Ok(())
}

/// The ShareName and the inner filter of a well-formed shared subscription filter; `None` for a
/// filter that is not one (including a malformed `$share/...`). Does not check the inner filter's
/// wildcards: `check_topic_filter` does.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix(SHARED_PREFIX)?;
    let (share_name, inner) = rest.split_once('/')?;
    if share_name.is_empty() || share_name.contains(['+', '#']) || inner.is_empty() {
        return None;
    }
    Some((share_name, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "/", "a/b", "$SYS/x", " ", "a//b", "é"] {
            assert_eq!(check_topic_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "+", "#", "a/+", "a/#", "a+b"] {
            assert!(check_topic_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#",
            "+",
            "/",
            "a/#",
            "+/+",
            "+/#",
            "a/+/b",
            "//",
            "$SYS/#",
            "$share/g/a/#",
            "$share/g/#",
            "$share/g//",
            "$share",
            "$sharefoo/+",
            "sport/tennis/+",
        ] {
            assert_eq!(check_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "#/",
            "a/b#",
            "+a",
            "a+/b",
            "a/++",
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/+/a",
            "$share/g#/a",
            "$share/g/a#",
        ] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_filters_split() {
        assert_eq!(parse_shared("$share/group/a/b"), Some(("group", "a/b")));
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share/group"), None);
    }
}
