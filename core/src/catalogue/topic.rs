//! AMQP topic-exchange pattern matching: a trie of binding patterns used by routing, and a matcher for
//! one pattern against one routing key. Pure functions over strings; touches nothing else.
//!
//! Words are separated by `.`; in a pattern `*` stands for exactly one word and `#` for zero or more
//! words, anywhere in the pattern. An empty routing key or pattern is one empty word, and empty words
//! are ordinary words (`a..b` has three). A `*` or `#` inside a longer word (`a*`) is a literal.

use std::collections::{BTreeMap, BTreeSet};

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
/// A value may be inserted several times under one pattern (two bindings with the same key and
/// destination but different arguments); it is counted, and stays until removed as many times.
/// Matching visits only the branches a key can take, so its cost depends on the key and the patterns
/// that share its words, not on the number of bindings. Removal prunes emptied branches, so a trie's
/// shape depends only on what it holds, not on its history (equality compares contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTrie<T> {
    root: Node<T>,
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
        Self { root: Node::default() }
    }
}

impl<T: Ord + Clone> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no pattern is stored.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Add `value` under `pattern` (once more, if it is already there).
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
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
        Self::remove_at(&mut self.root, &words, value)
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
        let pattern: Vec<&str> = pattern.split('.').collect();
        let key: Vec<&str> = key.split('.').collect();
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
        ];
        for &(pattern, key, expected) in cases {
            assert_eq!(naive_str(pattern, key), expected, "naive {pattern} ~ {key}");
            assert_eq!(matches(pattern, key), expected, "dp {pattern} ~ {key}");
            let mut trie = TopicTrie::new();
            trie.insert(pattern, 1u8);
            assert_eq!(!trie.matching(key).is_empty(), expected, "trie {pattern} ~ {key}");
        }
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
        prop::sample::select(vec!["a", "b", "c", "", "*", "#"])
    }

    fn key_word() -> impl Strategy<Value = &'static str> {
        // Keys may contain "*" and "#" words too: in a key they are literals.
        prop::sample::select(vec!["a", "b", "c", "", "*", "#"])
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
            prop_assert_eq!(matches(&pattern, &key), naive_str(&pattern, &key));
        }

        #[test]
        fn trie_matches_naive(
            patterns in prop::collection::vec(pattern(), 0..12),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            keys in prop::collection::vec(key(), 1..8),
        ) {
            let mut trie = TopicTrie::new();
            for (value, pattern) in patterns.iter().enumerate() {
                trie.insert(pattern, value);
            }
            // Remove a few to exercise pruning; the reference drops the same ones.
            let mut live: BTreeSet<usize> = (0..patterns.len()).collect();
            if !patterns.is_empty() {
                for index in &removed {
                    let value = index.index(patterns.len());
                    prop_assert_eq!(trie.remove(&patterns[value], &value), live.remove(&value));
                }
            }
            for key in &keys {
                let expected: BTreeSet<usize> =
                    live.iter().copied().filter(|&value| naive_str(&patterns[value], key)).collect();
                let got: BTreeSet<usize> = trie.matching(key).into_iter().copied().collect();
                prop_assert_eq!(got, expected, "key {:?}", key);
            }
        }
    }
}
