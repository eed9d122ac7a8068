//! A bounded memory of command ids: the most recent `capacity` are kept, the
//! oldest forgotten first. Used for canceled ids (bridge) and answered ids
//! (device connections).

use std::collections::{HashSet, VecDeque};

use uuid::Uuid;

#[derive(Debug)]
pub(crate) struct RecentIds {
    capacity: usize,
    set: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> RecentIds {
        RecentIds { capacity, set: HashSet::new(), order: VecDeque::new() }
    }

    /// Remembers `id`; false if it was remembered already.
    pub(crate) fn insert(&mut self, id: Uuid) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    pub(crate) fn contains(&self, id: &Uuid) -> bool {
        self.set.contains(id)
    }

    pub(crate) fn forget(&mut self, id: Uuid) {
        if self.set.remove(&id) {
            self.order.retain(|o| *o != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent() {
        let mut r = RecentIds::new(2);
        let ids: Vec<Uuid> = (0..3).map(Uuid::from_u128).collect();
        assert!(r.insert(ids[0]) && r.insert(ids[1]) && !r.insert(ids[1]));
        assert!(r.insert(ids[2]));
        assert!(!r.contains(&ids[0]) && r.contains(&ids[1]) && r.contains(&ids[2]));
        r.forget(ids[1]);
        assert!(!r.contains(&ids[1]) && r.insert(ids[1]));
    }
}
