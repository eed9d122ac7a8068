//! A bounded memory of recent ids (command ids a device answered, a receiver
//! saw canceled, …), each with an optional value: at most `capacity` are kept
//! and the oldest inserted is forgotten first. Reads do not refresh an entry,
//! so "oldest" means "inserted longest ago". Backed by `lru`.

use std::hash::Hash;
use std::num::NonZeroUsize;

use lru::LruCache;

/// Ids (`K`) with a value each (`V`, `()` for a plain set), oldest forgotten first.
#[derive(Debug)]
pub struct RecentIds<K: Hash + Eq, V = ()> {
    cache: LruCache<K, V>,
}

impl<K: Hash + Eq, V> RecentIds<K, V> {
    /// A memory of at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> RecentIds<K, V> {
        RecentIds { cache: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least 1")) }
    }

    /// Remembers `id` with `value`, forgetting the oldest id if full. Returns
    /// false, and changes nothing, when `id` is remembered already.
    pub fn insert(&mut self, id: K, value: V) -> bool {
        if self.cache.contains(&id) {
            return false;
        }
        self.cache.push(id, value);
        true
    }

    /// The value of `id`, if still remembered.
    pub fn get(&self, id: &K) -> Option<&V> {
        self.cache.peek(id)
    }

    pub fn contains(&self, id: &K) -> bool {
        self.cache.contains(id)
    }

    /// Forgets `id` (if remembered).
    pub fn forget(&mut self, id: &K) {
        self.cache.pop(id);
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_and_reads_do_not_refresh() {
        let mut r = RecentIds::<u32, &str>::new(2);
        assert!(r.insert(0, "a") && r.insert(1, "b") && !r.insert(1, "again"));
        assert_eq!(r.get(&1), Some(&"b"), "a second insert changes nothing");
        assert_eq!(r.get(&0), Some(&"a"));
        assert!(r.insert(2, "c"));
        assert!(!r.contains(&0), "the oldest insert goes first, though it was read last");
        assert!(r.contains(&1) && r.contains(&2));
        r.forget(&1);
        assert!(!r.contains(&1) && r.insert(1, "b") && r.len() == 2);
    }
}
