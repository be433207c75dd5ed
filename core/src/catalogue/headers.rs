//! Headers-exchange matching with RabbitMQ's semantics: a binding's arguments against a message's
//! headers, under the binding's `x-match` mode. Pure functions over `crate::model` values; touches
//! nothing else.
//!
//! - `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`.
//! - Binding arguments whose name starts with `x-` are ignored by `all` and `any`; the `-with-x` modes
//!   consider them. `x-match` itself is never a condition.
//! - A binding argument whose value is `Void` asks only that the header be present; otherwise the
//!   header must be present with an equal value (numbers compare by value across widths, as Erlang's
//!   `==` does in RabbitMQ).
//! - `all` with no conditions matches every message; `any` with no conditions matches none.
//! - A header named twice in a message is looked up by its first occurrence.

use crate::model::{FieldValue, Headers};

/// How a headers binding combines its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XMatch {
    /// Every condition must hold; `x-` arguments are not conditions.
    All,
    /// At least one condition must hold; `x-` arguments are not conditions.
    Any,
    /// Every condition must hold, `x-` arguments included.
    AllWithX,
    /// At least one condition must hold, `x-` arguments included.
    AnyWithX,
}

impl XMatch {
    /// The mode a binding's arguments ask for. The error is the reason, for a 406 reply at bind time.
    pub fn of_binding(arguments: &Headers) -> Result<Self, String> {
        match arguments.get("x-match") {
            None => Ok(Self::All),
            Some(FieldValue::LongString(mode)) => match mode.as_str() {
                "all" => Ok(Self::All),
                "any" => Ok(Self::Any),
                "all-with-x" => Ok(Self::AllWithX),
                "any-with-x" => Ok(Self::AnyWithX),
                other => Err(format!(
                    "Invalid x-match field value \"{other}\"; expected all, any, all-with-x, or any-with-x"
                )),
            },
            Some(other) => Err(format!("Invalid x-match field type {other:?}; expected longstr")),
        }
    }

    fn with_x(self) -> bool {
        matches!(self, Self::AllWithX | Self::AnyWithX)
    }

    fn is_all(self) -> bool {
        matches!(self, Self::All | Self::AllWithX)
    }
}

/// Whether a binding's arguments are valid for a headers exchange (its `x-match`).
pub fn validate_binding(arguments: &Headers) -> Result<(), String> {
    XMatch::of_binding(arguments).map(|_| ())
}

/// Whether a message with `headers` matches a headers-exchange binding with `binding_arguments`.
/// An invalid `x-match` (refused at bind time, so only from older state) is read as `all`.
pub fn matches(binding_arguments: &Headers, headers: &Headers) -> bool {
    let mode = XMatch::of_binding(binding_arguments).unwrap_or(XMatch::All);
    let mut conditions = binding_arguments
        .iter()
        .filter(|(name, _)| name != "x-match" && (mode.with_x() || !name.starts_with("x-")))
        .map(|(name, expected)| condition_holds(expected, headers.get(name)));
    if mode.is_all() { conditions.all(|held| held) } else { conditions.any(|held| held) }
}

fn condition_holds(expected: &FieldValue, actual: Option<&FieldValue>) -> bool {
    match (expected, actual) {
        (_, None) => false,
        (FieldValue::Void, Some(_)) => true,
        (expected, Some(actual)) => values_equal(expected, actual),
    }
}

/// Value equality as RabbitMQ's headers exchange sees it: integers of any width and floats compare
/// as numbers (`1 == 1.0`, as Erlang's `==`), strings and byte arrays compare as bytes (both are
/// Erlang binaries), anything else structurally.
pub fn values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_number(a), as_number(b)) {
        return x == y;
    }
    match (a, b) {
        (FieldValue::LongString(s), FieldValue::Bytes(bytes) | FieldValue::LongBytes(bytes))
        | (FieldValue::Bytes(bytes) | FieldValue::LongBytes(bytes), FieldValue::LongString(s)) => {
            s.as_bytes() == bytes.as_ref()
        }
        (FieldValue::Bytes(x) | FieldValue::LongBytes(x), FieldValue::Bytes(y) | FieldValue::LongBytes(y)) => x == y,
        _ => a == b,
    }
}

/// A numeric value as f64, for comparisons that involve a float.
fn as_number(value: &FieldValue) -> Option<f64> {
    match *value {
        FieldValue::F32(v) => Some(v.into()),
        FieldValue::F64(v) => Some(v),
        // Precision loss above 2^53 is accepted: Erlang's `==` also compares such a pair as floats.
        _ => value.as_i64().map(|v| v as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(entries: &[(&str, FieldValue)]) -> Headers {
        Headers(entries.iter().map(|(name, value)| ((*name).to_owned(), value.clone())).collect())
    }

    fn text(value: &str) -> FieldValue {
        FieldValue::LongString(value.to_owned())
    }

    #[test]
    fn all_and_any() {
        let message = headers(&[("format", text("pdf")), ("type", text("report")), ("x-tag", text("t"))]);
        let all = headers(&[("format", text("pdf")), ("type", text("report"))]);
        assert!(matches(&all, &message));
        let all_miss = headers(&[("format", text("pdf")), ("type", text("log"))]);
        assert!(!matches(&all_miss, &message));
        let any = headers(&[("x-match", text("any")), ("format", text("zip")), ("type", text("report"))]);
        assert!(matches(&any, &message));
        let any_miss = headers(&[("x-match", text("any")), ("format", text("zip"))]);
        assert!(!matches(&any_miss, &message));
    }

    #[test]
    fn empty_conditions() {
        let message = headers(&[("a", text("1"))]);
        assert!(matches(&Headers::new(), &message), "all of nothing holds");
        assert!(!matches(&headers(&[("x-match", text("any"))]), &message), "any of nothing fails");
    }

    #[test]
    fn x_arguments_only_count_with_x() {
        let message = headers(&[("x-tag", text("t"))]);
        let binding = headers(&[("x-tag", text("other"))]);
        assert!(matches(&binding, &message), "ignored by all");
        let binding = headers(&[("x-match", text("all-with-x")), ("x-tag", text("other"))]);
        assert!(!matches(&binding, &message));
        let binding = headers(&[("x-match", text("any-with-x")), ("x-tag", text("t"))]);
        assert!(matches(&binding, &message));
        let binding = headers(&[("x-match", text("any")), ("x-tag", text("t"))]);
        assert!(!matches(&binding, &message), "any ignores x- so nothing can hold");
    }

    #[test]
    fn void_means_present_and_numbers_compare_by_value() {
        let message = headers(&[("n", FieldValue::I64(5)), ("f", FieldValue::F64(2.0))]);
        assert!(matches(&headers(&[("n", FieldValue::Void)]), &message));
        assert!(!matches(&headers(&[("m", FieldValue::Void)]), &message));
        assert!(matches(&headers(&[("n", FieldValue::U8(5))]), &message));
        assert!(matches(&headers(&[("f", FieldValue::I32(2))]), &message));
        assert!(!matches(&headers(&[("n", text("5"))]), &message), "a string is not a number");
        assert!(values_equal(&text("ab"), &FieldValue::Bytes(bytes::Bytes::from_static(b"ab"))));
    }

    #[test]
    fn x_match_validation() {
        assert_eq!(XMatch::of_binding(&Headers::new()), Ok(XMatch::All));
        assert_eq!(XMatch::of_binding(&headers(&[("x-match", text("any-with-x"))])), Ok(XMatch::AnyWithX));
        assert!(validate_binding(&headers(&[("x-match", text("some"))])).is_err());
        assert!(validate_binding(&headers(&[("x-match", FieldValue::Bool(true))])).is_err());
    }

    /// Reference: count the conditions and the ones that hold, then decide; looks headers up by a
    /// linear scan of its own rather than `Headers::get`.
    fn reference(binding: &Headers, message: &Headers) -> bool {
        let mode = match binding.0.iter().find(|(name, _)| name == "x-match").map(|(_, value)| value) {
            Some(FieldValue::LongString(mode)) if mode == "any" => "any",
            Some(FieldValue::LongString(mode)) if mode == "any-with-x" => "any-with-x",
            Some(FieldValue::LongString(mode)) if mode == "all-with-x" => "all-with-x",
            _ => "all",
        };
        let with_x = mode.ends_with("with-x");
        let mut total = 0;
        let mut held = 0;
        for (name, expected) in &binding.0 {
            if name == "x-match" || (!with_x && name.starts_with("x-")) {
                continue;
            }
            total += 1;
            let mut first = None;
            for (header, value) in &message.0 {
                if header == name {
                    first = Some(value);
                    break;
                }
            }
            if let Some(actual) = first {
                let equal = match (expected, actual) {
                    (FieldValue::Void, _) => true,
                    (FieldValue::LongString(x), FieldValue::LongString(y)) => x == y,
                    (FieldValue::Bool(x), FieldValue::Bool(y)) => x == y,
                    (x, y) => match (x.as_i64(), y.as_i64()) {
                        (Some(x), Some(y)) => x == y,
                        _ => false,
                    },
                };
                if equal {
                    held += 1;
                }
            }
        }
        if mode.starts_with("all") { held == total } else { held > 0 }
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "x-a", "x-b"]).prop_map(str::to_owned)
    }

    /// Values limited to strings, booleans, integers of several widths and void, so the reference can
    /// stay simple.
    fn value() -> impl Strategy<Value = FieldValue> {
        prop_oneof![
            prop::sample::select(vec!["1", "2"]).prop_map(|v| FieldValue::LongString(v.to_owned())),
            any::<bool>().prop_map(FieldValue::Bool),
            (0i64..3).prop_map(FieldValue::I64),
            (0u8..3).prop_map(FieldValue::U8),
            (0i32..3).prop_map(FieldValue::I32),
        ]
    }

    fn table(with_void: bool) -> impl Strategy<Value = Vec<(String, FieldValue)>> {
        let value =
            if with_void { prop_oneof![3 => value(), 1 => Just(FieldValue::Void)].boxed() } else { value().boxed() };
        prop::collection::vec((name(), value), 0..5)
    }

    fn mode() -> impl Strategy<Value = Option<FieldValue>> {
        prop::option::of(
            prop::sample::select(vec!["all", "any", "all-with-x", "any-with-x"])
                .prop_map(|mode| FieldValue::LongString(mode.to_owned())),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn matcher_agrees_with_reference(mode in mode(), binding in table(true), message in table(false)) {
            let mut binding = Headers(binding);
            if let Some(mode) = mode {
                binding.0.insert(0, ("x-match".to_owned(), mode));
            }
            let message = Headers(message);
            prop_assert_eq!(matches(&binding, &message), reference(&binding, &message));
        }
    }
}
