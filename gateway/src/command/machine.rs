//! A command's state machine, pure: given a command as it stands and what
//! happened — a receiver's report, an attempt, a deadline, a cancel — the
//! command as it will be and the events to log. The store writes what this
//! decides (as a compare-and-set); nothing here does I/O, so every rule is
//! unit-tested without a database (the way rumqttc keeps `state.rs` free of I/O).
//!
//! Legal moves are `Status::can_move_to`; statuses only move forward.

use std::time::Duration;

use protocol::envelope::{Report, ReportKind};
use protocol::DeviceId;
use uuid::Uuid;

use super::{Command, DeviceResult, Failure, FailureKind, NewCommand, Status};

/// Fields a move sets besides the status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// Set `delivered_at` (if not set yet).
    pub delivered: bool,
    pub result: Option<DeviceResult>,
    pub error: Option<Failure>,
    /// One more publication: `attempts + 1`.
    pub bump_attempts: bool,
    /// When the sweeper looks next (never later than the deadline); `None`
    /// keeps the current one.
    pub next_attempt_at: Option<i64>,
    /// The event log's detail for this move.
    pub detail: Option<String>,
    /// Record the caller's cancel request (`cancel_requested_at`); with the
    /// status unchanged, this is the only move to the same status.
    pub request_cancel: bool,
    /// Legal only for a command whose cancel was requested and that never
    /// reached a device (`delivered_at` unset): a receiver's `undeliverable`
    /// completes such a cancel.
    pub completes_cancel: bool,
    /// Legal only from this status (besides `Status::can_move_to`).
    pub only_from: Option<Status>,
    /// An attempt: the receiver it is published to (`sent_to`).
    pub sent_to: Option<String>,
    /// A receiver's report: legal only for a command published (`sent` or
    /// `delivered`) to that receiver, for that device (PROTOCOL 4.2).
    pub reported_by: Option<Reporter>,
}

/// Who a report comes from and what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    pub receiver: String,
    pub device: DeviceId,
}

impl Reporter {
    /// Whether `current` was sent to this receiver, for this device, and is
    /// still where a report can move it: never from `pending`/`scheduled`
    /// (not published) nor from a final status.
    pub fn may_move(&self, current: &Command) -> bool {
        matches!(current.status, Status::Sent | Status::Delivered)
            && current.sent_to.as_deref() == Some(self.receiver.as_str())
            && current.device_id == self.device
    }
}

/// One move to make: command `id` to status `to`, with `change`.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub id: Uuid,
    pub to: Status,
    pub change: Change,
}

/// One row of a command's event log, to write. `from` is `None` for the
/// command's first event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub command_id: Uuid,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub from: Option<Status>,
    pub to: Status,
    pub attempt: i64,
    pub detail: Option<String>,
}

/// What a move does to `current` at `now`: the command after it and the
/// events that log it, or `None` if the move is not legal from where the
/// command stands (a late or duplicate report, a cancel after the result).
pub fn step(current: &Command, to: Status, change: &Change, now: i64) -> Option<(Command, Vec<EventRecord>)> {
    let legal = if change.request_cancel {
        to == current.status && !to.is_final() && current.cancel_requested_at.is_none()
    } else {
        current.status.can_move_to(to)
    };
    let cancel_completable = current.cancel_requested_at.is_some() && current.delivered_at.is_none();
    let from_ok = change.only_from.is_none_or(|s| s == current.status);
    let reporter_ok = change.reported_by.as_ref().is_none_or(|r| r.may_move(current));
    if !legal || !from_ok || !reporter_ok || (change.completes_cancel && !cancel_completable) {
        return None;
    }
    let next = apply(current, to, change, now);
    let events = events_of_move(current, &next, change);
    Some((next, events))
}

/// The command after the move (legality already checked).
fn apply(current: &Command, to: Status, change: &Change, now: i64) -> Command {
    let mut next = current.clone();
    next.status = to;
    next.updated_at = now;
    if change.bump_attempts {
        next.attempts += 1;
    }
    if let Some(receiver) = &change.sent_to {
        next.sent_to = Some(receiver.clone());
    }
    if change.delivered && next.delivered_at.is_none() {
        next.delivered_at = Some(now);
    }
    if change.request_cancel {
        next.cancel_requested_at = Some(now);
    }
    if let Some(result) = &change.result {
        next.result = Some(result.clone());
    }
    if let Some(error) = &change.error {
        next.error = Some(error.clone());
    }
    if to.is_final() {
        next.completed_at = Some(now);
        next.next_attempt_at = None;
    } else {
        // Never later than the deadline, so the sweeper sees every expiry in time.
        let due = change.next_attempt_at.or(current.next_attempt_at).unwrap_or(now);
        next.next_attempt_at = Some(due.min(current.expires_at));
    }
    next
}

/// The events of one move: one, or two when a result reaches a `sent`
/// command whose `delivered` report never came on its own (a receiver folds
/// it into a quick result): the result proves the delivery ("implied delivered").
fn events_of_move(current: &Command, next: &Command, change: &Change) -> Vec<EventRecord> {
    let event = |from: Status, to: Status, detail: Option<String>| EventRecord {
        command_id: current.id,
        at: next.updated_at,
        from: Some(from),
        to,
        attempt: next.attempts,
        detail,
    };
    if current.status == Status::Sent && change.result.is_some() && next.status.is_final() {
        vec![
            event(Status::Sent, Status::Delivered, Some("implied by the result".to_owned())),
            event(Status::Delivered, next.status, change.detail.clone()),
        ]
    } else {
        vec![event(current.status, next.status, change.detail.clone())]
    }
}

/// A new command's first events: `→ pending` (or `→ scheduled`), and
/// `pending → sent` when the first attempt is claimed with the insert.
pub fn accepted_events(new: &NewCommand) -> Vec<EventRecord> {
    let (command_id, at) = (new.id, new.created_at);
    if new.status == Status::Sent {
        let detail = new.first_attempt_detail.clone();
        vec![
            EventRecord { command_id, at, from: None, to: Status::Pending, attempt: 0, detail: None },
            EventRecord { command_id, at, from: Some(Status::Pending), to: Status::Sent, attempt: 1, detail },
        ]
    } else {
        vec![EventRecord { command_id, at, from: None, to: new.status, attempt: 0, detail: None }]
    }
}

/// The move a receiver's report asks for: `delivered` (next look after
/// `result_timeout`) or the device's result (`succeeded` for code 0, else
/// `failed`). `undeliverable` moves only a command whose cancel was
/// requested and that never reached a device: to `canceled` (a receiver
/// writes no `undeliverable` for a command it has written, PROTOCOL 4.5);
/// otherwise it moves nothing (it is logged; re-sending is the sweeper's job).
/// Every report move is legal only for a command sent to the reporting
/// receiver, for the device named ([`Reporter::may_move`]).
pub fn report_move(report: &Report, now: i64, result_timeout: Duration) -> Move {
    let receiver = &report.receiver_id;
    let (to, change) = match &report.kind {
        ReportKind::Delivered => (
            Status::Delivered,
            Change {
                delivered: true,
                next_attempt_at: Some(now + result_timeout.as_millis() as i64),
                detail: Some(format!("receiver {receiver}")),
                ..Change::default()
            },
        ),
        ReportKind::Queued => (
            Status::Sent,
            Change {
                next_attempt_at: Some(now + result_timeout.as_millis() as i64),
                detail: Some(format!("waiting at receiver {receiver} for its device")),
                only_from: Some(Status::Sent),
                ..Change::default()
            },
        ),
        ReportKind::Result { code, payload_base64 } => result_change(*code, payload_base64, receiver),
        ReportKind::ResultTooLarge { size, limit } => {
            let message = format!(
                "the device answered {size} bytes; receiver {receiver} forwards at most {limit} (its --max-result-bytes)"
            );
            let error = Some(Failure { kind: FailureKind::ResultTooLarge, message: message.clone() });
            let change = Change { error, detail: Some(message), delivered: true, ..Change::default() };
            (Status::Failed, change)
        }
        ReportKind::Undeliverable { reason } => {
            let message = format!("canceled by the caller; receiver {receiver} did not write it: {reason}");
            let error = Some(Failure { kind: FailureKind::Canceled, message: message.clone() });
            let change = Change { error, detail: Some(message), completes_cancel: true, ..Change::default() };
            (Status::Canceled, change)
        }
    };
    let reported_by = Some(Reporter { receiver: receiver.clone(), device: report.device_id.clone() });
    Move { id: report.command_id, to, change: Change { reported_by, ..change } }
}

fn result_change(code: i32, payload: &[u8], receiver: &str) -> (Status, Change) {
    let detail = Some(format!("code {code} via receiver {receiver}"));
    let result = Some(DeviceResult { code: i64::from(code), payload: payload.to_vec(), message: None });
    // A result proves delivery: `delivered_at` is set if no `delivered` report came first.
    if code == 0 {
        (Status::Succeeded, Change { result, detail, delivered: true, ..Change::default() })
    } else {
        let message = format!("the device answered with error code {code}");
        let error = Some(Failure { kind: FailureKind::DeviceError, message });
        (Status::Failed, Change { result, error, detail, delivered: true, ..Change::default() })
    }
}

/// The change that claims the next attempt of `command` (`sent`, attempts + 1,
/// next look after `ack_timeout` plus `backoff`). The caller commits it, then
/// publishes: claim first, so a crash between the two leaves a `sent` command
/// with no delivery, which the ack timeout re-sends, and a fast delivery
/// report cannot overtake the claim.
pub fn attempt_change(
    command: &Command,
    receiver: &str,
    why: &str,
    instance_id: &str,
    now: i64,
    wait: Duration,
) -> Change {
    let attempt = command.attempts + 1;
    Change {
        bump_attempts: true,
        sent_to: Some(receiver.to_owned()),
        next_attempt_at: Some(now + wait.as_millis() as i64),
        detail: Some(format!("attempt {attempt} by {instance_id} to receiver {receiver}: {why}")),
        ..Change::default()
    }
}

/// The caller's cancel, as it applies to `c`: `canceled` at once if it was
/// never published (`scheduled`, `pending`); otherwise — a receiver or its
/// device may have it — a request: recorded, no more re-sends, the status
/// unchanged until a receiver confirms it did not write it (`canceled`) or
/// the device's result comes (`succeeded`/`failed`: it ran). `None` when `c`
/// is final or its cancel was already requested.
pub fn cancel_move(c: &Command) -> Option<(Status, Change)> {
    match c.status {
        Status::Scheduled | Status::Pending => Some((Status::Canceled, cancel_change())),
        s if s.is_final() || c.cancel_requested_at.is_some() => None,
        s => {
            let detail = Some("cancel requested by the caller; no more attempts".to_owned());
            Some((s, Change { request_cancel: true, detail, ..Change::default() }))
        }
    }
}

/// The caller's cancel of a command never published.
pub fn cancel_change() -> Change {
    let message = "canceled by the caller".to_owned();
    Change {
        error: Some(Failure { kind: FailureKind::Canceled, message: message.clone() }),
        detail: Some(message),
        ..Change::default()
    }
}

/// What the sweeper must do with a command whose `next_attempt_at` has come.
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// Its cancel was requested: never sent again; tell the receivers once
    /// more (a cancel lost on the way) and look again after the ack timeout,
    /// until a receiver answers, a result comes, or the deadline passes.
    CancelAgain,
    /// Move it (expire it, give it up, or claim its next attempt).
    Move(Status, Change),
    /// Publish it again, for this reason (the caller builds the attempt change).
    Attempt(&'static str),
    /// Its device is offline: wait, without using an attempt.
    Wait,
}

/// What is due for `c` at `now`: the deadline first, then exhausted attempts,
/// then — if its device is online — the next attempt.
pub fn due(c: &Command, now: i64, device_online: bool) -> Due {
    let give_up = |kind: FailureKind, message: String| Change {
        error: Some(Failure { kind, message: message.clone() }),
        detail: Some(message),
        ..Change::default()
    };
    if now >= c.expires_at {
        let message = format!("no final result by the deadline; {} attempt(s) used", c.attempts);
        return Due::Move(Status::Expired, give_up(FailureKind::DeadlinePassed, message));
    }
    if c.cancel_requested_at.is_some() {
        return Due::CancelAgain;
    }
    if matches!(c.status, Status::Sent | Status::Delivered) && c.attempts >= c.max_attempts {
        let message = format!("no result after {} attempt(s)", c.attempts);
        return Due::Move(Status::Failed, give_up(FailureKind::AttemptsExhausted, message));
    }
    if !device_online {
        return Due::Wait;
    }
    Due::Attempt(match c.status {
        Status::Scheduled => "scheduled time reached",
        Status::Pending => "not yet published",
        Status::Sent => "no delivery report within the ack timeout",
        _ => "no result within the result timeout",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::a_command;

    fn sent() -> Command {
        let mut c = a_command();
        c.status = Status::Sent;
        c.attempts = 1;
        c.result = None;
        c.delivered_at = None;
        c.completed_at = None;
        c.next_attempt_at = Some(5_000);
        c
    }

    fn report(c: &Command, kind: ReportKind) -> Report {
        Report {
            command_id: c.id,
            device_id: DeviceId::parse("dev-1").unwrap(),
            receiver_id: "receiver-1".into(),
            kind,
        }
    }

    #[test]
    fn only_the_receiver_an_attempt_went_to_moves_the_command_by_its_reports() {
        let c = sent();
        let ok = |receiver: &str, device: &str| Report {
            command_id: c.id,
            device_id: DeviceId::parse(device).unwrap(),
            receiver_id: receiver.into(),
            kind: ReportKind::Result { code: 0, payload_base64: b"forged".to_vec() },
        };
        let moves = |r: &Report, c: &Command| {
            let m = report_move(r, 100, Duration::from_secs(15));
            step(c, m.to, &m.change, 100).is_some()
        };
        assert!(moves(&ok("receiver-1", "dev-1"), &c));
        assert!(!moves(&ok("attacker", "dev-1"), &c), "another receiver");
        assert!(!moves(&ok("receiver-1", "dev-2"), &c), "about another device");
        for status in [Status::Pending, Status::Scheduled] {
            let mut unpublished = c.clone();
            (unpublished.status, unpublished.attempts, unpublished.sent_to) = (status, 0, None);
            assert!(!moves(&ok("receiver-1", "dev-1"), &unpublished), "never {status} → final");
            unpublished.sent_to = Some("receiver-1".into());
            assert!(!moves(&ok("receiver-1", "dev-1"), &unpublished), "never {status} → final");
        }
        // A re-send to another receiver: the first one's reports no longer count.
        let change = attempt_change(&c, "receiver-2", "why", "gw-1", 1_000, Duration::from_secs(5));
        let (resent, _) = step(&c, Status::Sent, &change, 1_000).unwrap();
        assert_eq!(resent.sent_to.as_deref(), Some("receiver-2"));
        assert!(!moves(&ok("receiver-1", "dev-1"), &resent));
        assert!(moves(&ok("receiver-2", "dev-1"), &resent));
    }

    #[test]
    fn a_quick_result_implies_the_delivery() {
        let c = sent();
        let ok = report(&c, ReportKind::Result { code: 0, payload_base64: b"{}".to_vec() });
        let m = report_move(&ok, 100, Duration::from_secs(15));
        let (next, events) = step(&c, m.to, &m.change, 100).unwrap();
        assert_eq!(
            (next.status, next.delivered_at, next.completed_at),
            (Status::Succeeded, Some(100), Some(100))
        );
        assert_eq!(next.next_attempt_at, None, "a final command is never looked at again");
        let moves: Vec<_> = events.iter().map(|e| (e.from, e.to)).collect();
        assert_eq!(
            moves,
            [(Some(Status::Sent), Status::Delivered), (Some(Status::Delivered), Status::Succeeded)]
        );
        assert_eq!(events[0].detail.as_deref(), Some("implied by the result"));
    }

    #[test]
    fn a_result_after_delivered_is_one_event_and_keeps_delivered_at() {
        let c = sent();
        let delivered = report_move(&report(&c, ReportKind::Delivered), 50, Duration::from_secs(15));
        let (c, events) = step(&c, delivered.to, &delivered.change, 50).unwrap();
        assert_eq!((c.status, c.delivered_at, events.len()), (Status::Delivered, Some(50), 1));
        assert_eq!(c.next_attempt_at, Some(c.expires_at.min(50 + 15_000)));
        let failed = report(&c, ReportKind::Result { code: 7, payload_base64: vec![] });
        let m = report_move(&failed, 90, Duration::from_secs(15));
        let (c, events) = step(&c, m.to, &m.change, 90).unwrap();
        assert_eq!((c.status, c.delivered_at, events.len()), (Status::Failed, Some(50), 1));
        assert_eq!(c.error.map(|e| e.kind), Some(FailureKind::DeviceError));
        assert_eq!(c.result.map(|r| r.code), Some(7));
    }

    #[test]
    fn late_and_duplicate_reports_move_nothing() {
        let done = a_command();
        let late = report_move(&report(&done, ReportKind::Delivered), 1, Duration::ZERO);
        assert!(step(&done, late.to, &late.change, 1).is_none());
        assert!(step(&done, Status::Canceled, &cancel_change(), 1).is_none());
        let undeliverable = report(&done, ReportKind::Undeliverable { reason: "gone".into() });
        let m = report_move(&undeliverable, 1, Duration::ZERO);
        assert!(step(&done, m.to, &m.change, 1).is_none());
        assert!(step(&sent(), m.to, &m.change, 1).is_none(), "no cancel was requested");
    }

    #[test]
    fn a_queued_command_waits_the_result_timeout_without_an_attempt() {
        let c = sent();
        let queued = report_move(&report(&c, ReportKind::Queued), 100, Duration::from_secs(15));
        let (next, events) = step(&c, queued.to, &queued.change, 100).unwrap();
        assert_eq!((next.status, next.attempts), (Status::Sent, c.attempts));
        assert_eq!(next.next_attempt_at, Some(c.expires_at.min(100 + 15_000)));
        assert_eq!((events[0].from, events[0].to), (Some(Status::Sent), Status::Sent));
        let mut delivered = c;
        delivered.status = Status::Delivered;
        assert!(step(&delivered, queued.to, &queued.change, 100).is_none(), "never back from delivered");
    }

    #[test]
    fn a_cancel_is_immediate_only_for_what_was_never_published() {
        let mut scheduled = sent();
        scheduled.status = Status::Scheduled;
        scheduled.attempts = 0;
        let (to, change) = cancel_move(&scheduled).unwrap();
        assert_eq!(step(&scheduled, to, &change, 9).unwrap().0.status, Status::Canceled);

        // Published: a request, recorded; the status stays; no more attempts.
        let c = sent();
        let (to, change) = cancel_move(&c).unwrap();
        let (requested, events) = step(&c, to, &change, 9).unwrap();
        assert_eq!((requested.status, requested.cancel_requested_at), (Status::Sent, Some(9)));
        assert_eq!((events[0].from, events[0].to), (Some(Status::Sent), Status::Sent));
        assert!(cancel_move(&requested).is_none(), "requested once");
        assert_eq!(due(&requested, 10, true), Due::CancelAgain);

        // A receiver that did not write it completes the cancel…
        let no = report(&c, ReportKind::Undeliverable { reason: "canceled before delivery".into() });
        let m = report_move(&no, 10, Duration::ZERO);
        let (canceled, _) = step(&requested, m.to, &m.change, 10).unwrap();
        assert_eq!(canceled.status, Status::Canceled);
        // …unless the command reached a device: then only its result or the deadline ends it.
        let mut delivered = requested.clone();
        delivered.status = Status::Delivered;
        delivered.delivered_at = Some(9);
        assert!(step(&delivered, m.to, &m.change, 10).is_none());
        let ran = report(&c, ReportKind::Result { code: 0, payload_base64: vec![] });
        let m = report_move(&ran, 11, Duration::ZERO);
        assert_eq!(step(&delivered, m.to, &m.change, 11).unwrap().0.status, Status::Succeeded);
        let mut late = delivered;
        late.expires_at = 5;
        assert!(matches!(due(&late, 10, true), Due::Move(Status::Expired, _)));
    }

    #[test]
    fn an_attempt_bumps_attempts_and_never_looks_past_the_deadline() {
        let c = sent();
        let change = attempt_change(&c, "receiver-1", "why", "gw-1", 1_000, Duration::from_secs(3_600));
        let (next, events) = step(&c, Status::Sent, &change, 1_000).unwrap();
        assert_eq!(next.attempts, 2);
        assert_eq!(next.next_attempt_at, Some(c.expires_at), "capped at the deadline");
        assert_eq!(events[0].detail.as_deref(), Some("attempt 2 by gw-1 to receiver receiver-1: why"));
        assert_eq!(events[0].attempt, 2);
    }

    #[test]
    fn the_sweeper_expires_first_then_gives_up_then_waits_for_the_device() {
        let mut c = sent();
        assert!(matches!(due(&c, c.expires_at, true), Due::Move(Status::Expired, _)));
        c.attempts = c.max_attempts;
        assert!(matches!(due(&c, 0, true), Due::Move(Status::Failed, ref ch)
            if ch.error.as_ref().map(|e| e.kind) == Some(FailureKind::AttemptsExhausted)));
        c.attempts = 1;
        assert_eq!(due(&c, 0, false), Due::Wait);
        assert_eq!(due(&c, 0, true), Due::Attempt("no delivery report within the ack timeout"));
    }

    #[test]
    fn a_claimed_first_attempt_logs_two_events() {
        let c = sent();
        let mut new = NewCommand {
            id: c.id,
            device_id: c.device_id.clone(),
            name: c.name.clone(),
            payload: c.payload.clone(),
            max_attempts: 5,
            status: Status::Sent,
            first_attempt_detail: Some("attempt 1".into()),
            created_at: 7,
            scheduled_at: None,
            expires_at: 60_000,
            next_attempt_at: 5_000,
            idempotency_key: None,
            request_hash: String::new(),
            reply_to: None,
            submission_key: None,
            sent_to: Some("receiver-1".into()),
        };
        let to: Vec<_> = accepted_events(&new).iter().map(|e| (e.to, e.attempt)).collect();
        assert_eq!(to, [(Status::Pending, 0), (Status::Sent, 1)]);
        assert_eq!(new.to_command().attempts, 1);
        new.status = Status::Scheduled;
        assert_eq!(accepted_events(&new).len(), 1);
    }
}
