//! What one device remembers about the commands it has run: the answers to the
//! most recent [`CAPACITY`] ids, so a command sent again is answered but not
//! re-run, and — only so the stats can prove it — every id it ever executed.

use std::collections::HashSet;

use bytes::Bytes;
use plumbing::memory::RecentIds;
use uuid::Uuid;

/// How many answered command ids a device keeps.
pub(crate) const CAPACITY: usize = 4096;

/// The stored outcome of a command, sent again for every repeat of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) code: i32,
    pub(crate) payload: Bytes,
}

/// Bounded id → answer memory, forgetting the oldest first.
#[derive(Debug)]
pub(crate) struct CommandMemory {
    answers: RecentIds<Uuid, Answer>,
    /// Unbounded on purpose: it is the honest check behind
    /// `executed_ids_repeated`, independent of the bounded memory it audits.
    executed_ever: HashSet<Uuid>,
}

impl Default for CommandMemory {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl CommandMemory {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self { answers: RecentIds::new(capacity), executed_ever: HashSet::new() }
    }

    /// The stored answer for `id`, if it is still remembered.
    pub(crate) fn answer(&self, id: &Uuid) -> Option<&Answer> {
        self.answers.get(id)
    }

    /// Stores the answer of a command just executed. Returns `true` if this id
    /// had been executed before, which only happens once it was forgotten.
    pub(crate) fn remember(&mut self, id: Uuid, answer: Answer) -> bool {
        let repeated = !self.executed_ever.insert(id);
        // Only an id not remembered is executed, so this never meets one already there.
        self.answers.insert(id, answer);
        repeated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: i32) -> Answer {
        Answer { code, payload: Bytes::from_static(b"{}") }
    }

    #[test]
    fn remembers_answers_until_capacity_then_forgets_the_oldest() {
        let mut memory = CommandMemory::with_capacity(2);
        let ids: Vec<Uuid> = (1..=3).map(Uuid::from_u128).collect();
        for (code, id) in ids.iter().enumerate() {
            assert!(!memory.remember(*id, answer(code as i32)));
        }
        assert_eq!(memory.answer(&ids[0]), None);
        assert_eq!(memory.answer(&ids[1]), Some(&answer(1)));
        assert_eq!(memory.answer(&ids[2]), Some(&answer(2)));
    }

    #[test]
    fn executing_a_forgotten_id_again_is_reported() {
        let mut memory = CommandMemory::with_capacity(1);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(!memory.remember(a, answer(0)));
        assert!(!memory.remember(b, answer(0)));
        assert!(memory.answer(&a).is_none());
        assert!(memory.remember(a, answer(0)), "a ran twice and must be counted");
    }
}
