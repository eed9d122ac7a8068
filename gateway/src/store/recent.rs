//! The commands this process wrote last, as it wrote them: the report
//! applier's base for its compare-and-set, so that applying a report does
//! not read the row again (one SELECT fewer per batch of reports).
//!
//! A remembered state may be stale (another instance moved the command, a
//! cancel was requested elsewhere, the sweeper put it off). That is safe
//! because it is only ever used to *move* a command: the compare-and-set
//! checks status, attempts and whether a cancel was requested against the
//! row, and a move that lost is retried on the row read again
//! (`Store::transition`). A move the remembered state would refuse is
//! decided on the row read again too (`Store::transition_many`), so a stale
//! state never refuses what the row allows. The columns another writer may
//! change without those three (`next_attempt_at`) are written only by moves
//! that set them.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

use crate::command::Command;

/// Commands remembered at most; past it the memory starts over.
const MAX_COMMANDS: usize = 8_192;
/// Commands with a larger payload are not remembered (bounds the memory at
/// about `MAX_COMMANDS` × this).
const MAX_PAYLOAD_BYTES: usize = 4_096;

/// Non-final commands as this process last wrote them, by id.
#[derive(Debug, Default)]
pub(super) struct Recent {
    commands: Mutex<HashMap<Uuid, Command>>,
}

impl Recent {
    /// Remembers `written` as committed; a final one is forgotten (no report
    /// moves it any more).
    pub(super) fn remember<'a>(&self, written: impl IntoIterator<Item = &'a Command>) {
        let mut commands = self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in written {
            if c.status.is_final() || c.payload.bytes.len() > MAX_PAYLOAD_BYTES {
                commands.remove(&c.id);
                continue;
            }
            if commands.len() >= MAX_COMMANDS && !commands.contains_key(&c.id) {
                commands.clear();
            }
            commands.insert(c.id, c.clone());
        }
    }

    /// Forgets these commands (their rows changed in a way not remembered).
    pub(super) fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a Uuid>) {
        let mut commands = self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in ids {
            commands.remove(id);
        }
    }

    /// The remembered states of `ids`, and the ids not remembered.
    pub(super) fn get_many(&self, ids: &[Uuid]) -> (HashMap<Uuid, Command>, Vec<Uuid>) {
        let commands = self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut found, mut missing) = (HashMap::with_capacity(ids.len()), Vec::new());
        for id in ids {
            match commands.get(id) {
                Some(c) => {
                    found.insert(*id, c.clone());
                }
                None => missing.push(*id),
            }
        }
        (found, missing)
    }
}
