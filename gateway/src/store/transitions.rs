//! Status changes: each a compare-and-set on the status and attempts just
//! read, committed with its event rows. `command::machine::step` decides what
//! a move writes; this module only makes it atomic, one command or a batch at
//! a time.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::rows::{Bound, MovedColumn, MOVED_COLUMNS};
use super::{marks, retry_transient, Result, Store, StoreError, Tx};
use crate::command::machine::step;
use crate::command::{now_ms, Change, Command, Move, Status};

/// How many times a compare-and-set is retried when another writer moved the row first.
const CAS_RETRIES: usize = 8;
/// Rows per multi-row compare-and-set UPDATE that writes a value per row
/// (`CASE id`, whose arms the database scans for every row: cost grows with
/// the square of the chunk).
const CAS_CHUNK: usize = 32;
/// Rows per multi-row compare-and-set UPDATE whose every column has one
/// value for the chunk (no `CASE`: cost grows with the chunk).
const CAS_CHUNK_SHARED: usize = 256;
/// How long the instance that made a command final has to publish its MQTT
/// caller's final reply before any instance's sweeper does it instead (ms).
pub const REPLY_GRACE_MS: i64 = 3_000;

/// What a move did.
#[derive(Debug)]
pub enum Moved {
    /// The command moved from `from`; `command` is its new state.
    Yes {
        from: Status,
        command: Command,
    },
    /// The move is not legal from where the command stands (e.g. already final).
    Refused(Command),
    NotFound,
}

impl Store {
    /// Moves a command to `to` if that is legal from where it stands, applying
    /// `change` and logging the move, atomically. `Contention` if the row kept
    /// changing under every attempt.
    pub async fn transition(&self, id: Uuid, to: Status, change: &Change) -> Result<Moved> {
        self.transition_with(id, |_| Some((to, change.clone()))).await
    }

    /// `transition` to the move `decide` picks from the command as it stands
    /// (read again if another writer moved it first); `None` refuses.
    pub async fn transition_with(
        &self,
        id: Uuid,
        decide: impl Fn(&Command) -> Option<(Status, Change)>,
    ) -> Result<Moved> {
        retry_transient(|| self.transition_once(id, &decide)).await
    }

    async fn transition_once(
        &self,
        id: Uuid,
        decide: &impl Fn(&Command) -> Option<(Status, Change)>,
    ) -> Result<Moved> {
        for _ in 0..CAS_RETRIES {
            let Some(current) = self.get_command(id).await? else {
                return Ok(Moved::NotFound);
            };
            let decided = decide(&current).and_then(|(to, change)| step(&current, to, &change, now_ms()));
            let Some((next, events)) = decided else {
                return Ok(Moved::Refused(current));
            };
            let mut tx = self.begin().await?;
            if !self.update_if_unchanged(&mut tx, &current, &next).await? {
                continue;
            }
            self.insert_events(&mut tx, &events).await?;
            self.owe_replies(&mut tx, &[&next]).await?;
            tx.commit().await?;
            self.recent.remember([&next]);
            return Ok(Moved::Yes { from: current.status, command: next });
        }
        Err(StoreError::Contention(format!("command {id} kept changing under {CAS_RETRIES} attempts")))
    }

    /// Applies many moves in one transaction (one commit, one multi-row event
    /// insert): the batch form of `transition`, with the same rules. Each
    /// command's base is its state as this process last wrote it when
    /// remembered (`recent`), else its row; a move that base would refuse is
    /// decided on the row, read again.
    pub async fn transition_many(&self, moves: &[Move]) -> Result<Vec<Moved>> {
        let ids: Vec<Uuid> = moves.iter().map(|m| m.id).collect();
        let (mut read, mut missing) = self.recent.get_many(&ids);
        let now = now_ms();
        missing.extend(
            moves
                .iter()
                .filter(|m| read.get(&m.id).is_some_and(|c| step(c, m.to, &m.change, now).is_none()))
                .map(|m| m.id),
        );
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            for id in &missing {
                read.remove(id);
            }
            read.extend(self.get_commands(&missing).await?);
        }
        let tx = self.begin().await?;
        self.transition_many_in(tx, &read, moves).await
    }

    /// Applies `moves` in `tx`, which the caller opened (e.g. holding the
    /// rows of `read` locked, `Store::apply_due`), from `read` (the base of
    /// every compare-and-set), and commits it. Moves are applied in order, a
    /// later move of the same command seeing the earlier one, and each
    /// command is written once, from the state read to the last one reached
    /// (a fast device's `delivered` and result cost one UPDATE). Rows are
    /// written in id order, so two batches never wait on each other's locks
    /// in a cycle. A command whose compare-and-set lost to another writer has
    /// its moves retried one by one after the commit.
    pub(super) async fn transition_many_in(
        &self,
        mut tx: Tx,
        read: &HashMap<Uuid, Command>,
        moves: &[Move],
    ) -> Result<Vec<Moved>> {
        let now = now_ms();
        let mut current = read.clone();
        let mut outcomes = Vec::with_capacity(moves.len());
        let mut events = Vec::new();
        for Move { id, to, change } in moves {
            let Some(cur) = current.get(id) else {
                outcomes.push(Moved::NotFound);
                continue;
            };
            let Some((next, logged)) = step(cur, *to, change, now) else {
                outcomes.push(Moved::Refused(cur.clone()));
                continue;
            };
            events.extend(logged);
            outcomes.push(Moved::Yes { from: cur.status, command: next.clone() });
            current.insert(*id, next);
        }
        let mut changed: Vec<Uuid> =
            moves.iter().map(|m| m.id).filter(|id| current.get(id) != read.get(id)).collect();
        changed.sort_unstable();
        changed.dedup();
        let pairs: Vec<(&Command, &Command)> = changed.iter().map(|id| (&read[id], &current[id])).collect();
        let mut lost = HashSet::new();
        if !self.update_all_if_unchanged(&mut tx, &pairs).await? {
            // Some row moved under us: start over row by row to learn which.
            tx.rollback().await?;
            tx = self.begin().await?;
            for (before, after) in &pairs {
                if !self.update_if_unchanged(&mut tx, before, after).await? {
                    lost.insert(before.id);
                }
            }
        }
        events.retain(|e| !lost.contains(&e.command_id));
        self.insert_events(&mut tx, &events).await?;
        let written: Vec<&Command> =
            pairs.iter().map(|(_, after)| *after).filter(|c| !lost.contains(&c.id)).collect();
        self.owe_replies(&mut tx, &written).await?;
        tx.commit().await?;
        self.recent.remember(written);
        // Moved by another writer: retried below on the row read again.
        self.recent.forget(&lost);
        let mut done = Vec::with_capacity(moves.len());
        for (m, outcome) in moves.iter().zip(outcomes) {
            done.push(if lost.contains(&m.id) {
                self.transition(m.id, m.to, &m.change).await?
            } else {
                outcome
            });
        }
        Ok(done)
    }

    /// Records, with the move, the final answers owed to MQTT callers among
    /// `moved` (commands with a `reply_to` that are now final): due for the
    /// sweeper after `REPLY_GRACE_MS` unless `reply_sent` comes first.
    async fn owe_replies(&self, tx: &mut Tx, moved: &[&Command]) -> Result<()> {
        let owed: Vec<&&Command> =
            moved.iter().filter(|c| c.status.is_final() && c.reply_to.is_some()).collect();
        for chunk in owed.chunks(200) {
            let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!("INSERT INTO pending_replies (command_id, due_at, owner) VALUES {rows}");
            let mut q = self.query(&sql);
            for c in chunk {
                let owner = self.reply_owner.get().cloned();
                q = q.bind(c.id.to_string()).bind(c.updated_at + REPLY_GRACE_MS).bind(owner);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// The compare-and-set for many commands at once, one UPDATE per chunk
    /// (see [`ChunkPlan`]): up to `CAS_CHUNK_SHARED` rows when every column
    /// the chunk changes gets one value and every row was read alike (a
    /// sweeper batch of first attempts), else up to `CAS_CHUNK`. A column no
    /// move changes keeps whatever the row has. True if every row still had
    /// its read status and attempts and so was written; false if any had
    /// moved (then the caller must roll back: other rows were written).
    async fn update_all_if_unchanged(&self, tx: &mut Tx, pairs: &[(&Command, &Command)]) -> Result<bool> {
        let mut rest = pairs;
        while !rest.is_empty() {
            // A chunk with anything per row (a result batch's payloads) is
            // planned once, on `CAS_CHUNK` rows; only one without is widened.
            let narrow = &rest[..rest.len().min(CAS_CHUNK)];
            let narrow_plan = ChunkPlan::of(narrow);
            let wide_plan = (!narrow_plan.per_row() && rest.len() > CAS_CHUNK)
                .then(|| {
                    let wide = &rest[..rest.len().min(CAS_CHUNK_SHARED)];
                    (wide, ChunkPlan::of(wide))
                })
                .filter(|(_, plan)| !plan.per_row());
            let (chunk, plan) = wide_plan.unwrap_or((narrow, narrow_plan));
            rest = &rest[chunk.len()..];
            if let [(before, after)] = chunk {
                if !self.update_if_unchanged(tx, before, after).await? {
                    return Ok(false);
                }
                continue;
            }
            // Padded to a power of two with copies of the first row (a repeated
            // WHEN never wins, a repeated IN item matches once), so that few
            // statement shapes exist and the prepared-statement cache keeps them.
            let size = chunk.len().next_power_of_two();
            let rows: Vec<&(&Command, &Command)> =
                chunk.iter().chain(std::iter::repeat(&chunk[0])).take(size).collect();
            let ids: Vec<String> = rows.iter().map(|(before, _)| before.id.to_string()).collect();
            let mut sets = Vec::with_capacity(plan.columns.len());
            let mut values = Vec::new();
            for ((name, value), shared) in plan.columns {
                match shared {
                    Some(one) => {
                        sets.push(format!("{name} = ?"));
                        values.push(one);
                    }
                    None => {
                        sets.push(format!("{name} = CASE id {} END", vec!["WHEN ? THEN ?"; size].join(" ")));
                        for (id, (_, after)) in ids.iter().zip(&rows) {
                            values.push(Bound::Text(Some(id)));
                            values.push(value(after));
                        }
                    }
                }
            }
            let check = if plan.alike {
                format!("AND {CAS_CHECK}")
            } else {
                format!("AND CASE id {} ELSE 0 END", vec![format!("WHEN ? THEN {CAS_CHECK}"); size].join(" "))
            };
            let sql =
                format!("UPDATE commands SET {} WHERE id IN ({}) {check}", sets.join(", "), marks(size));
            let mut q = self.query(&sql);
            for value in values {
                q = value.bind_to(q);
            }
            for id in &ids {
                q = q.bind(id.as_str());
            }
            if plan.alike {
                q = bind_check(q, chunk[0].0);
            } else {
                for (id, (before, _)) in ids.iter().zip(&rows) {
                    q = bind_check(q.bind(id.as_str()), before);
                }
            }
            if q.execute(&mut **tx).await?.rows_affected() != chunk.len() as u64 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The compare-and-set itself: writes `next` if the row still has `current`'s status and attempts.
    async fn update_if_unchanged(&self, tx: &mut Tx, current: &Command, next: &Command) -> Result<bool> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let sets: Vec<String> = MOVED_COLUMNS.iter().map(|(name, _)| format!("{name} = ?")).collect();
            format!("UPDATE commands SET {} WHERE id = ? AND {CAS_CHECK}", sets.join(", "))
        });
        let mut q = self.query(&SQL);
        for (_, value) in &MOVED_COLUMNS {
            q = value(next).bind_to(q);
        }
        let done = bind_check(q.bind(current.id.to_string()), current).execute(&mut **tx).await?;
        Ok(done.rows_affected() == 1)
    }
}

/// What a compare-and-set compares: the status, the attempts, and whether a
/// cancel was requested (a request changes neither of the others, and a
/// move read before it must not write over it).
const CAS_CHECK: &str = "status = ? AND attempts = ? AND (cancel_requested_at IS NULL) = ?";

/// How one chunk of a multi-row compare-and-set is written: the columns
/// some row of it changes (`updated_at` always: it changes with every move),
/// each with the one value every row gets (`col = ?`) or `None` for a value
/// per row (`CASE id WHEN … THEN …`); and whether every row was read alike,
/// so that the check is written once for the chunk.
struct ChunkPlan<'c> {
    columns: Vec<(MovedColumn, Option<Bound<'c>>)>,
    alike: bool,
}

impl<'c> ChunkPlan<'c> {
    fn of(chunk: &[(&'c Command, &'c Command)]) -> ChunkPlan<'c> {
        let mut columns = Vec::new();
        for (name, value) in MOVED_COLUMNS {
            if name != "updated_at" && chunk.iter().all(|(before, after)| value(before) == value(after)) {
                continue;
            }
            let first = value(chunk[0].1);
            let shared = chunk[1..].iter().all(|(_, after)| value(after) == first).then_some(first);
            columns.push(((name, value), shared));
        }
        let alike = chunk[1..].iter().all(|(before, _)| same_check(before, chunk[0].0));
        ChunkPlan { columns, alike }
    }

    /// Whether any part of the statement is written per row.
    fn per_row(&self) -> bool {
        !self.alike || self.columns.iter().any(|(_, shared)| shared.is_none())
    }
}

/// Whether [`CAS_CHECK`] compares `a` and `b` with the same values.
fn same_check(a: &Command, b: &Command) -> bool {
    a.status == b.status
        && a.attempts == b.attempts
        && a.cancel_requested_at.is_none() == b.cancel_requested_at.is_none()
}

/// Binds [`CAS_CHECK`]'s values as `before` has them.
fn bind_check<'q>(q: super::Query<'q>, before: &Command) -> super::Query<'q> {
    q.bind(before.status.as_str()).bind(before.attempts).bind(i64::from(before.cancel_requested_at.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Failure, FailureKind, NewCommand, Payload};
    use protocol::DeviceId;

    fn new_command(device_id: &DeviceId) -> NewCommand {
        let now = now_ms();
        NewCommand {
            id: Uuid::now_v7(),
            device_id: device_id.clone(),
            name: "noop".into(),
            payload: Payload::json(&serde_json::json!({})),
            max_attempts: 5,
            status: Status::Pending,
            first_attempt_detail: None,
            created_at: now,
            scheduled_at: None,
            expires_at: now + 60_000,
            next_attempt_at: now + 60_000,
            idempotency_key: None,
            request_hash: String::new(),
            reply_to: None,
            submission_key: None,
            sent_to: None,
        }
    }

    /// A fresh SQLite store holding `n` pending commands of one device (their ids).
    async fn store_with_pending(n: usize) -> (tempfile::TempDir, Store, Vec<Uuid>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite:{}", dir.path().join("gw.db").display())).await.unwrap();
        let device = DeviceId::parse("d").unwrap();
        store.upsert_device(&device, true, &serde_json::json!({})).await.unwrap();
        let news: Vec<NewCommand> = (0..n).map(|_| new_command(&device)).collect();
        store.insert_commands(&news).await.unwrap();
        (dir, store, news.iter().map(|n| n.id).collect())
    }

    /// An attempt: `→ sent`, attempts + 1, acknowledged within 5 s.
    fn sent_change() -> Change {
        Change { bump_attempts: true, next_attempt_at: Some(now_ms() + 5_000), ..Change::default() }
    }

    fn next_states(read: &HashMap<Uuid, Command>, to: Status, change: &Change) -> HashMap<Uuid, Command> {
        let now = now_ms();
        read.iter().map(|(id, c)| (*id, step(c, to, change, now).unwrap().0)).collect()
    }

    /// A command with an MQTT caller owes its final reply from the moment it
    /// is final, to its owner: past the grace another process takes it only
    /// once the owner is dead (a live but slow owner sends its own: two
    /// senders would make two replies); the owner itself only deletes it.
    #[tokio::test]
    async fn a_final_reply_is_owed_by_its_process_until_sent() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("gw.db").display());
        let (owner, other) = (Store::connect(&url).await.unwrap(), Store::connect(&url).await.unwrap());
        let start = now_ms();
        owner.claim_instance("gw-a", "nonce-a", start, start - 5_000).await.unwrap();
        owner.set_reply_owner("nonce-a");
        other.set_reply_owner("nonce-b");
        let device = DeviceId::parse("d").unwrap();
        owner.upsert_device(&device, true, &serde_json::json!({})).await.unwrap();
        let mut new = new_command(&device);
        new.reply_to =
            Some(crate::command::ReplyTo { topic: "t/replies".into(), correlation_id: "c-1".into() });
        owner.insert_commands(std::slice::from_ref(&new)).await.unwrap();
        let canceled = Change {
            error: Some(Failure { kind: FailureKind::Canceled, message: "test".into() }),
            ..Change::default()
        };
        let Moved::Yes { command, .. } = owner.transition(new.id, Status::Canceled, &canceled).await.unwrap()
        else {
            panic!("canceled")
        };
        let now = now_ms();
        assert!(
            other.claim_due_replies(now, 10, now + 1, start).await.unwrap().is_empty(),
            "within the grace"
        );
        let later = command.updated_at + REPLY_GRACE_MS;
        let owner_alive_since = start;
        assert!(
            other.claim_due_replies(later, 10, later + 1_000, owner_alive_since).await.unwrap().is_empty(),
            "its owner is alive"
        );
        assert_eq!(owner.claim_due_replies(later, 10, later + 1_000, start).await.unwrap(), [(new.id, true)]);
        // Not deleted (say the owner's delete failed), and the owner died:
        let (after, owner_dead_since) = (later + 2_000, later + 2_000);
        assert_eq!(
            other.claim_due_replies(after, 10, after + 1_000, owner_dead_since).await.unwrap(),
            [(new.id, false)]
        );
        assert!(
            other.claim_due_replies(after, 10, after + 1_000, owner_dead_since).await.unwrap().is_empty(),
            "once"
        );
        other.reply_sent(new.id).await.unwrap();
        assert!(
            other
                .claim_due_replies(after + 5_000, 10, after + 6_000, after + 9_000)
                .await
                .unwrap()
                .is_empty(),
            "sent"
        );
        owner.close().await;
        other.close().await;
    }

    /// What this process remembers of a command may be stale (another
    /// instance moved it): a move that stale state would refuse is decided on
    /// the row, and a stale base loses its compare-and-set instead of
    /// writing over the row.
    #[tokio::test]
    async fn a_stale_remembered_state_neither_refuses_nor_overwrites() {
        use crate::command::machine::{attempt_change, Reporter};
        use crate::command::DeviceResult;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("gw.db").display());
        let (here, elsewhere) = (Store::connect(&url).await.unwrap(), Store::connect(&url).await.unwrap());
        let device = DeviceId::parse("d").unwrap();
        here.upsert_device(&device, true, &serde_json::json!({})).await.unwrap();
        let new = new_command(&device);
        here.insert_commands(std::slice::from_ref(&new)).await.unwrap();
        let wait = std::time::Duration::from_secs(5);
        let send = |c: &Command| attempt_change(c, "rx-1", "test", "gw-elsewhere", now_ms(), wait);
        let Moved::Yes { command: sent, .. } =
            elsewhere.transition(new.id, Status::Sent, &send(&new.to_command())).await.unwrap()
        else {
            panic!("published elsewhere")
        };
        let by_rx1 = Some(Reporter { receiver: "rx-1".into(), device: device.clone() });

        // Here the command is still remembered `pending`, where no report moves it.
        let delivered = Change {
            delivered: true,
            next_attempt_at: Some(now_ms() + 5_000),
            reported_by: by_rx1.clone(),
            ..Change::default()
        };
        let moved = here
            .transition_many(&[Move { id: new.id, to: Status::Delivered, change: delivered }])
            .await
            .unwrap();
        assert!(
            matches!(&moved[0], Moved::Yes { command, .. } if command.status == Status::Delivered),
            "{moved:?}"
        );

        // Elsewhere it is sent again (attempt 2); here remembers attempt 1, delivered.
        let again = elsewhere.get_command(new.id).await.unwrap().unwrap();
        assert!(matches!(
            elsewhere.transition(new.id, Status::Sent, &send(&again)).await.unwrap(),
            Moved::Yes { .. }
        ));
        let result = Change {
            result: Some(DeviceResult { code: 0, payload: b"ok".to_vec(), message: None }),
            reported_by: by_rx1,
            ..Change::default()
        };
        let moved = here
            .transition_many(&[Move { id: new.id, to: Status::Succeeded, change: result }])
            .await
            .unwrap();
        let row = here.get_command(new.id).await.unwrap().unwrap();
        assert_eq!(
            (row.attempts, row.sent_to.as_deref()),
            (2, Some("rx-1")),
            "attempt 2 is not written over"
        );
        match &moved[0] {
            Moved::Yes { command, .. } => assert_eq!(command, &row, "the outcome is the row as written"),
            Moved::Refused(command) => assert_eq!(command, &row, "refused on the row as it stands"),
            Moved::NotFound => panic!("the command exists"),
        }
        assert_eq!(sent.attempts, 1);
        here.close().await;
        elsewhere.close().await;
    }

    /// The multi-row compare-and-set writes every row, or reports that one had
    /// moved (and the caller's rollback leaves every row as it was); 300 rows
    /// that share every value go in chunks of `CAS_CHUNK_SHARED`.
    #[tokio::test]
    async fn many_rows_in_one_compare_and_set() {
        let (_dir, store, ids) = store_with_pending(300).await;
        let sent = sent_change();

        let read = store.get_commands(&ids).await.unwrap();
        let next = next_states(&read, Status::Sent, &sent);
        let pairs: Vec<(&Command, &Command)> = ids.iter().map(|id| (&read[id], &next[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.commit().await.unwrap();
        let now = store.get_commands(&ids).await.unwrap();
        for id in &ids {
            assert_eq!(now[id], next[id], "every row written, each with its own values");
        }

        // One command (in the second chunk) moves behind the batch's back: the
        // batch must not overwrite it.
        let read = now;
        let canceled = Change {
            error: Some(Failure { kind: FailureKind::Canceled, message: "test".into() }),
            ..Change::default()
        };
        assert!(matches!(
            store.transition(ids[290], Status::Canceled, &canceled).await.unwrap(),
            Moved::Yes { .. }
        ));
        let delivered = Change { delivered: true, ..Change::default() };
        let next = next_states(&read, Status::Delivered, &delivered);
        let pairs: Vec<(&Command, &Command)> = ids.iter().map(|id| (&read[id], &next[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(!store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.rollback().await.unwrap();
        let after = store.get_commands(&ids).await.unwrap();
        assert_eq!(after[&ids[290]].status, Status::Canceled);
        assert!(ids.iter().filter(|id| **id != ids[290]).all(|id| after[id] == read[id]));

        // The batch form finds out which one lost and applies the rest.
        let moves: Vec<Move> =
            ids.iter().map(|id| Move { id: *id, to: Status::Delivered, change: delivered.clone() }).collect();
        let outcomes = store.transition_many(&moves).await.unwrap();
        let yes = outcomes.iter().filter(|o| matches!(o, Moved::Yes { .. })).count();
        assert_eq!(yes, 299);
        assert!(matches!(&outcomes[290], Moved::Refused(c) if c.status == Status::Canceled));
        store.close().await;
    }

    /// Rows read at different attempts that get different values (each its
    /// own result) are written row by row (`CASE id`, chunks of `CAS_CHUNK`),
    /// and a row that moved meanwhile is still caught.
    #[tokio::test]
    async fn a_mixed_chunk_writes_each_row_its_own_values() {
        use crate::command::DeviceResult;
        let (_dir, store, ids) = store_with_pending(40).await;
        let sent = sent_change();
        for id in &ids {
            store.transition(*id, Status::Sent, &sent).await.unwrap();
        }
        // Half of them at a second attempt: the rows are not read alike.
        for id in ids.iter().step_by(2) {
            store.transition(*id, Status::Sent, &sent).await.unwrap();
        }
        let read = store.get_commands(&ids).await.unwrap();
        assert_eq!(read.values().filter(|c| c.attempts == 2).count(), 20);
        let finals: HashMap<Uuid, Command> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let change = Change {
                    result: Some(DeviceResult { code: 0, payload: vec![i as u8; i + 1], message: None }),
                    ..Change::default()
                };
                (*id, step(&read[id], Status::Succeeded, &change, now_ms()).unwrap().0)
            })
            .collect();

        // One of them is canceled behind the chunk's back: caught, nothing written.
        let canceled = Change {
            error: Some(Failure { kind: FailureKind::Canceled, message: "test".into() }),
            ..Change::default()
        };
        store.transition(ids[1], Status::Canceled, &canceled).await.unwrap();
        let pairs: Vec<(&Command, &Command)> = ids.iter().map(|id| (&read[id], &finals[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(!store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.rollback().await.unwrap();

        let read = store.get_commands(&ids).await.unwrap();
        let rest: Vec<Uuid> = ids.iter().copied().filter(|id| *id != ids[1]).collect();
        let pairs: Vec<(&Command, &Command)> = rest.iter().map(|id| (&read[id], &finals[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.commit().await.unwrap();
        let now = store.get_commands(&ids).await.unwrap();
        for id in &rest {
            assert_eq!(now[id], finals[id], "each row its own result and attempts");
        }
        assert_eq!(now[&ids[1]].status, Status::Canceled);
        store.close().await;
    }
}
