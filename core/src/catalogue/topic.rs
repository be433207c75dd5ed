//! AMQP topic-exchange pattern matching: a trie of binding patterns used by routing, and a matcher for
//! one pattern against one routing key. Pure functions over strings; touches nothing else.
//!
//! Words are separated by `.`; in a pattern `*` stands for exactly one word and `#` for zero or more
//! words, anywhere in the pattern. An empty routing key or pattern is one empty word, and empty words
//! are ordinary words (`a..b` has three). A `*` or `#` inside a longer word (`a*`) is a literal.
//!
//! The `$` rule, for bindings that ask for it ([`EXCLUDE_DOLLAR_TOPICS`]): a pattern whose first
//! word is `*` or `#` does not match a routing key whose first word starts with `$`. This is MQTT's
//! rule (3.1.1 and 5.0, section 4.7.2: topics such as `$SYS/...` are not matched by a filter
//! starting with a wildcard); a pattern starting with a literal word is unaffected, so `$SYS.#`
//! still matches.

use std::collections::{BTreeMap, BTreeSet};

/// The binding argument that turns the `$` rule on for a topic-exchange binding, when its value is
/// `FieldValue::Bool(true)`. Without it matching follows AMQP, where `$` is an ordinary character.
pub const EXCLUDE_DOLLAR_TOPICS: &str = "x-exclude-dollar-topics";

/// Whether `pattern` matches `routing_key`.
///
/// Runs in O(pattern words × key words) time whatever the pattern, unlike the naive backtracking
/// definition, which is exponential in the number of `#`s. Used where one pattern is checked against
/// one key (retained-message lookups, tests); routing many bindings uses [`TopicTrie`].
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let key: Vec<&str> = routing_key.split('.').collect();
    // reachable[j]: the pattern words read so far can consume exactly the first j key words.
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for word in pattern_words(pattern) {
        match word {
            "#" => {
                // Zero or more words: every position at or after a reachable one becomes reachable.
                let mut any = false;
                for slot in reachable.iter_mut() {
                    any |= *slot;
                    *slot = any;
                }
            }
            _ => {
                // Exactly one word, any word for `*`, an equal word otherwise.
                for j in (1..=key.len()).rev() {
                    reachable[j] = reachable[j - 1] && (word == "*" || key[j - 1] == word);
                }
                reachable[0] = false;
            }
        }
    }
    reachable[key.len()]
}

/// Whether `pattern` matches `routing_key` under the `$` rule (see the module comment): as
/// [`matches()`], except that a pattern starting with a `*` or `#` word never matches a key whose
/// first word starts with `$`.
pub fn matches_excluding_dollar(pattern: &str, routing_key: &str) -> bool {
    !(starts_with_wildcard(pattern) && routing_key.starts_with('$')) && matches(pattern, routing_key)
}

/// Whether a pattern's first word is `*` or `#`: the patterns the `$` rule applies to.
fn starts_with_wildcard(pattern: &str) -> bool {
    matches!(pattern.split('.').next(), Some("*" | "#"))
}

/// The words of a pattern with runs of `#` collapsed to one: `#.#` matches exactly what `#` matches,
/// and collapsing them keeps a hostile pattern like `#.#.#.#` from multiplying the matching work.
fn pattern_words(pattern: &str) -> impl Iterator<Item = &str> {
    let mut previous_hash = false;
    pattern.split('.').filter(move |word| {
        let hash = *word == "#";
        let keep = !(hash && previous_hash);
        previous_hash = hash;
        keep
    })
}

/// A trie of topic patterns, each carrying values (binding destinations), for matching a routing key
/// against every pattern at once.
///
/// Patterns inserted under the `$` rule ([`TopicTrie::insert_excluding_dollar`]) that start with a
/// wildcard live in a second trie, which matching skips when the key's first word starts with `$`:
/// the rule costs one check per key, not one per binding. (Under the rule a pattern starting with a
/// literal word matches exactly what it matches without it, so it goes to the first trie.)
///
/// A value may be inserted several times under one pattern (two bindings with the same key and
/// destination but different arguments); it is counted, and stays until removed as many times.
/// Matching visits only the branches a key can take, so its cost depends on the key and the patterns
/// that share its words, not on the number of bindings. Removal prunes emptied branches, so a trie's
/// shape depends only on what it holds, not on its history (equality compares contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTrie<T> {
    root: Node<T>,
    /// Patterns starting with `*` or `#` inserted under the `$` rule.
    root_excluding_dollar: Node<T>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node<T> {
    /// Children by literal word.
    literal: BTreeMap<String, Node<T>>,
    /// Child for `*`.
    star: Option<Box<Node<T>>>,
    /// Child for `#`.
    hash: Option<Box<Node<T>>>,
    /// Values of the patterns that end here, with how many times each was inserted.
    values: BTreeMap<T, u32>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self { literal: BTreeMap::new(), star: None, hash: None, values: BTreeMap::new() }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.literal.is_empty() && self.star.is_none() && self.hash.is_none()
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        Self { root: Node::default(), root_excluding_dollar: Node::default() }
    }
}

impl<T: Ord + Clone> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no pattern is stored.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty() && self.root_excluding_dollar.is_empty()
    }

    /// The trie a pattern is stored in.
    fn root_mut(&mut self, pattern: &str, exclude_dollar: bool) -> &mut Node<T> {
        if exclude_dollar && starts_with_wildcard(pattern) { &mut self.root_excluding_dollar } else { &mut self.root }
    }

    /// Add `value` under `pattern` (once more, if it is already there).
    pub fn insert(&mut self, pattern: &str, value: T) {
        Self::insert_at(self.root_mut(pattern, false), pattern, value);
    }

    /// Add `value` under `pattern` with the `$` rule: if the pattern starts with `*` or `#`, it
    /// does not match keys whose first word starts with `$`. Counted apart from
    /// [`TopicTrie::insert`]: remove it with [`TopicTrie::remove_excluding_dollar`].
    pub fn insert_excluding_dollar(&mut self, pattern: &str, value: T) {
        Self::insert_at(self.root_mut(pattern, true), pattern, value);
    }

    fn insert_at(root: &mut Node<T>, pattern: &str, value: T) {
        let mut node = root;
        for word in pattern_words(pattern) {
            node = match word {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                _ => node.literal.entry(word.to_owned()).or_default(),
            };
        }
        *node.values.entry(value).or_insert(0) += 1;
    }

    /// Remove one insertion of `value` under `pattern`, pruning branches left empty. Returns whether
    /// it was there.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let words: Vec<&str> = pattern_words(pattern).collect();
        Self::remove_at(self.root_mut(pattern, false), &words, value)
    }

    /// Remove one insertion made by [`TopicTrie::insert_excluding_dollar`]. Returns whether it was
    /// there.
    pub fn remove_excluding_dollar(&mut self, pattern: &str, value: &T) -> bool {
        let words: Vec<&str> = pattern_words(pattern).collect();
        Self::remove_at(self.root_mut(pattern, true), &words, value)
    }

    fn remove_at(node: &mut Node<T>, words: &[&str], value: &T) -> bool {
        let Some((word, rest)) = words.split_first() else {
            let Some(count) = node.values.get_mut(value) else { return false };
            *count -= 1;
            if *count == 0 {
                node.values.remove(value);
            }
            return true;
        };
        match *word {
            "*" | "#" => {
                let slot = if *word == "*" { &mut node.star } else { &mut node.hash };
                let Some(child) = slot.as_mut() else { return false };
                let removed = Self::remove_at(child, rest, value);
                if child.is_empty() {
                    *slot = None;
                }
                removed
            }
            _ => {
                let Some(child) = node.literal.get_mut(*word) else { return false };
                let removed = Self::remove_at(child, rest, value);
                if child.is_empty() {
                    node.literal.remove(*word);
                }
                removed
            }
        }
    }

    /// Call `found` for the value of every pattern matching the routing key split into `words`
    /// (`routing_key.split('.')`). A value may be reported more than once (under several matching
    /// patterns); callers collect into a set.
    pub fn for_each_match<'a>(&'a self, words: &[&str], found: &mut impl FnMut(&'a T)) {
        // Entries (`#` node, key position) already visited: without this, patterns with several `#`s
        // reach the same node at the same position along many paths (polynomially many in the key).
        let mut hash_visits = BTreeSet::new();
        Self::visit(&self.root, words, 0, &mut hash_visits, found);
        if !words.first().is_some_and(|word| word.starts_with('$')) {
            Self::visit(&self.root_excluding_dollar, words, 0, &mut hash_visits, found);
        }
    }

    /// Every value matching `routing_key`, once each, in order.
    pub fn matching(&self, routing_key: &str) -> BTreeSet<&T> {
        let words: Vec<&str> = routing_key.split('.').collect();
        let mut out = BTreeSet::new();
        self.for_each_match(&words, &mut |value| {
            out.insert(value);
        });
        out
    }

    /// Recursion depth is bounded by the trie's depth (each call descends one node), that is by the
    /// longest pattern, which the name length limit bounds; the key's length only widens loops.
    fn visit<'a>(
        node: &'a Node<T>,
        words: &[&str],
        at: usize,
        hash_visits: &mut BTreeSet<(usize, usize)>,
        found: &mut impl FnMut(&'a T),
    ) {
        match words.get(at) {
            None => node.values.keys().for_each(&mut *found),
            Some(word) => {
                if let Some(child) = node.literal.get(*word) {
                    Self::visit(child, words, at + 1, hash_visits, found);
                }
                if let Some(child) = &node.star {
                    Self::visit(child, words, at + 1, hash_visits, found);
                }
            }
        }
        if let Some(child) = &node.hash {
            // `#` consumes words at..next, for every next up to the end of the key.
            let id = std::ptr::from_ref::<Node<T>>(child).addr();
            for next in at..=words.len() {
                if hash_visits.insert((id, next)) {
                    Self::visit(child, words, next, hash_visits, found);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, written as directly as possible: the reference the others are checked against.
    fn naive(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| naive(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && naive(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && naive(rest, &key[1..]),
        }
    }

    fn naive_str(pattern: &str, key: &str) -> bool {
        naive_rule(pattern, key, false)
    }

    /// The `$` rule on top of the definition, as MQTT states it: with the rule, a pattern whose
    /// first word is a wildcard does not match a key whose first word starts with `$`.
    fn naive_rule(pattern: &str, key: &str, exclude_dollar: bool) -> bool {
        let pattern: Vec<&str> = pattern.split('.').collect();
        let key: Vec<&str> = key.split('.').collect();
        if exclude_dollar && matches!(pattern[0], "*" | "#") && key[0].starts_with('$') {
            return false;
        }
        naive(&pattern, &key)
    }

    #[test]
    fn examples() {
        let cases: &[(&str, &str, bool)] = &[
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b", false),
            ("#.a", "a", true),
            ("#.a", "x.y.a", true),
            ("#.a.#", "x.a.y", true),
            ("#.a.#", "x.b.y", false),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y.c", false),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("*.*", ".", true),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("#.*", "", true),
            ("*.#", "", true),
            ("#.*", "a.b", true),
            ("a*", "ab", false),
            ("a*", "a*", true),
            ("#.#", "", true),
            ("#", "$SYS.x", true),
            ("*.x", "$SYS.x", true),
        ];
        for &(pattern, key, expected) in cases {
            assert_eq!(naive_str(pattern, key), expected, "naive {pattern} ~ {key}");
            assert_eq!(matches(pattern, key), expected, "dp {pattern} ~ {key}");
            let mut trie = TopicTrie::new();
            trie.insert(pattern, 1u8);
            assert_eq!(!trie.matching(key).is_empty(), expected, "trie {pattern} ~ {key}");
        }
    }

    /// MQTT 3.1.1 and 5.0, section 4.7.2 (`$` topics), written with `.` for `/`.
    #[test]
    fn mqtt_4_7_2_wildcards_do_not_match_dollar_topics() {
        let cases: &[(&str, &str, bool)] = &[
            // "#" does not match "$SYS/...", nor "+/monitor/Clients" "$SYS/monitor/Clients".
            ("#", "$SYS.broker.uptime", false),
            ("#", "$SYS", false),
            ("*.monitor.Clients", "$SYS.monitor.Clients", false),
            ("*", "$", false),
            ("#.x", "$a.x", false),
            // "$SYS/#" and "$SYS/monitor/+" match.
            ("$SYS.#", "$SYS.broker.uptime", true),
            ("$SYS.monitor.*", "$SYS.monitor.Clients", true),
            // Only the first word counts, on both sides.
            ("#", "a.$SYS", true),
            ("a.#", "a.$b", true),
            ("a.*", "a.$b", true),
            ("#", "a$", true),
            ("#", "", true),
            ("*.x", "a.x", true),
        ];
        for &(pattern, key, expected) in cases {
            assert_eq!(naive_rule(pattern, key, true), expected, "naive {pattern} ~ {key}");
            assert_eq!(matches_excluding_dollar(pattern, key), expected, "dp {pattern} ~ {key}");
            let mut trie = TopicTrie::new();
            trie.insert_excluding_dollar(pattern, 1u8);
            assert_eq!(!trie.matching(key).is_empty(), expected, "trie {pattern} ~ {key}");
            // Without the rule `$` is an ordinary character (AMQP).
            assert_eq!(matches(pattern, key), naive_rule(pattern, key, false), "dp {pattern} ~ {key}");
            assert!(trie.remove_excluding_dollar(pattern, &1));
            assert!(trie.is_empty());
        }
    }

    #[test]
    fn one_pattern_with_and_without_the_rule_is_two_insertions() {
        let mut trie = TopicTrie::new();
        trie.insert("#", 1u8);
        trie.insert_excluding_dollar("#", 1u8);
        assert_eq!(trie.matching("$SYS.x"), BTreeSet::from([&1]), "the plain insertion still matches");
        assert!(!trie.remove_excluding_dollar("$SYS.#", &1), "never inserted with the rule");
        assert!(trie.remove("#", &1));
        assert!(trie.matching("$SYS.x").is_empty(), "only the insertion under the rule is left");
        assert_eq!(trie.matching("a"), BTreeSet::from([&1]));
        assert!(!trie.remove("#", &1), "the insertion under the rule is removed apart");
        assert!(trie.remove_excluding_dollar("#", &1));
        assert!(trie.is_empty());
    }

    #[test]
    fn counted_insert_and_pruning_remove() {
        let mut trie = TopicTrie::new();
        trie.insert("a.#.b", 1u8);
        trie.insert("a.#.b", 1u8);
        trie.insert("a.*", 2u8);
        assert!(trie.remove("a.#.b", &1));
        assert_eq!(trie.matching("a.x.b"), BTreeSet::from([&1]), "still inserted once");
        assert!(trie.remove("a.#.b", &1));
        assert!(!trie.remove("a.#.b", &1), "removed as often as inserted");
        assert!(trie.matching("a.x.b").is_empty());
        assert!(!trie.remove("a.*", &3), "wrong value");
        assert!(trie.remove("a.*", &2));
        assert!(trie.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn collapsed_hashes_are_one_pattern() {
        let mut trie = TopicTrie::new();
        trie.insert("a.#.#.b", 1u8);
        assert!(trie.remove("a.#.b", &1), "runs of # are stored collapsed");
        assert!(trie.is_empty());
    }

    #[test]
    fn many_hashes_long_key_is_fast() {
        // Backtracking would take C(200+9, 9) steps here; the trie's visit memo keeps it small.
        let pattern = "#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.z";
        let key = vec!["a"; 200].join(".");
        let mut trie = TopicTrie::new();
        trie.insert(pattern, 1u8);
        assert!(trie.matching(&key).is_empty());
        assert!(!matches(pattern, &key));
        assert!(matches(pattern, &format!("{key}.z")));
    }

    fn word() -> impl Strategy<Value = &'static str> {
        // `$a` and `$` exercise the `$` rule; in a pattern they are literals.
        prop::sample::select(vec!["a", "b", "c", "", "*", "#", "$a", "$"])
    }

    fn key_word() -> impl Strategy<Value = &'static str> {
        // Keys may contain "*" and "#" words too: in a key they are literals.
        prop::sample::select(vec!["a", "b", "c", "", "*", "#", "$a", "$", "a$"])
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop::collection::vec(word(), 1..6).prop_map(|words| words.join("."))
    }

    fn key() -> impl Strategy<Value = String> {
        prop::collection::vec(key_word(), 1..7).prop_map(|words| words.join("."))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn dp_matches_naive(pattern in pattern(), key in key()) {
            prop_assert_eq!(matches(&pattern, &key), naive_rule(&pattern, &key, false));
            prop_assert_eq!(matches_excluding_dollar(&pattern, &key), naive_rule(&pattern, &key, true));
        }

        /// Patterns inserted with and without the `$` rule, some removed again, match as the naive
        /// definition says for each.
        #[test]
        fn trie_matches_naive(
            patterns in prop::collection::vec((pattern(), any::<bool>()), 0..12),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            keys in prop::collection::vec(key(), 1..8),
        ) {
            let mut trie = TopicTrie::new();
            for (value, (pattern, exclude_dollar)) in patterns.iter().enumerate() {
                if *exclude_dollar {
                    trie.insert_excluding_dollar(pattern, value);
                } else {
                    trie.insert(pattern, value);
                }
            }
            // Remove a few to exercise pruning; the reference drops the same ones.
            let mut live: BTreeSet<usize> = (0..patterns.len()).collect();
            if !patterns.is_empty() {
                for index in &removed {
                    let value = index.index(patterns.len());
                    let (pattern, exclude_dollar) = &patterns[value];
                    let was_there = if *exclude_dollar {
                        trie.remove_excluding_dollar(pattern, &value)
                    } else {
                        trie.remove(pattern, &value)
                    };
                    prop_assert_eq!(was_there, live.remove(&value));
                }
            }
            for key in &keys {
                let expected: BTreeSet<usize> = live
                    .iter()
                    .copied()
                    .filter(|&value| naive_rule(&patterns[value].0, key, patterns[value].1))
                    .collect();
                let got: BTreeSet<usize> = trie.matching(key).into_iter().copied().collect();
                prop_assert_eq!(got, expected, "key {:?}", key);
            }
            prop_assert_eq!(trie.is_empty(), live.is_empty());
        }
    }
}
