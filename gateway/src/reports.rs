//! Receivers' reports in: `delivered`, the device's result, `undeliverable`.
//! The applier task takes them off the reports connection in batches, applies
//! each batch in one store transaction (moves decided by
//! `command::machine::report_move`), and only then acknowledges them to the
//! broker, so a crash or a database outage never loses one (the broker
//! redelivers; applying a report twice changes nothing). Final commands wake
//! their waiters and MQTT callers.

use std::time::Duration;

use plumbing::backoff::Backoff;
use rumqttc::{AsyncClient, Publish};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::command::machine::report_move;
use crate::command::{now_ms, Command, Move, Status};
use crate::store::{Moved, StoreError};
use protocol::envelope::{decode_one_or_many, Report, ReportKind};

/// A store transaction takes no more messages once it has this many reports
/// (a receiver's message may carry many).
const REPORT_BATCH: usize = 1024;

impl App {
    /// Applies receiver reports, in order, in one store transaction. Errors are
    /// store errors only: the caller retries the whole batch.
    pub async fn apply_reports(&self, reports: &[Report]) -> Result<(), StoreError> {
        if reports.is_empty() {
            return Ok(());
        }
        let result_timeout = Duration::from_millis(self.config().result_timeout_ms);
        let moves: Vec<Move> = reports.iter().map(|r| report_move(r, now_ms(), result_timeout)).collect();
        let outcomes = self.store().transition_many(&moves).await?;
        // Identical notes of the batch are written once, with their count: a
        // receiver repeating itself costs one event, not one per message.
        let mut notes: Vec<(&Report, i64)> = Vec::new();
        for ((m, report), outcome) in moves.iter().zip(reports).zip(outcomes) {
            if self.after_report(m, report, outcome).await? {
                match notes.iter_mut().find(|(r, _)| same_note(r, report)) {
                    Some((_, times)) => *times += 1,
                    None => notes.push((report, 1)),
                }
            }
        }
        for (report, times) in notes {
            self.note_undeliverable(report, times).await?;
        }
        Ok(())
    }

    /// What a report's move did, logged and counted; true if it is an
    /// `undeliverable` to note in the command's events (by the caller, which
    /// collapses repeats).
    async fn after_report(&self, m: &Move, report: &Report, outcome: Moved) -> Result<bool, StoreError> {
        let (command_id, device_id) = (m.id, report.device_id.as_str());
        match outcome {
            Moved::Yes { from, command } => {
                self.metrics().reports_applied.inc();
                tracing::debug!(%command_id, device_id, %from, to = %command.status, receiver = %report.receiver_id, "report applied");
                if command.status.is_final() {
                    self.on_final(&command).await;
                }
            }
            // Not from the receiver the command was sent to, or not about its
            // device: changes nothing, leaves no trace in the command's log.
            Moved::Refused(current)
                if !current.status.is_final()
                    && !m.change.reported_by.as_ref().is_some_and(|r| r.may_move(&current)) =>
            {
                let why = format!(
                    "report on command {command_id} (device {:?}) from receiver {:?}, but its attempt went to {:?} for device {:?}",
                    report.device_id.as_str(),
                    report.receiver_id,
                    current.sent_to,
                    current.device_id.as_str()
                );
                self.provenance().refuse("report", "not_sent_to_this_receiver", "", &why);
            }
            // Not the completion of a cancel: logged (if from the receiver the
            // command went to), nothing moves.
            Moved::Refused(current)
                if matches!(report.kind, ReportKind::Undeliverable { .. })
                    && current.sent_to.as_deref() == Some(report.receiver_id.as_str()) =>
            {
                return Ok(true);
            }
            Moved::Refused(current) => {
                self.metrics().reports_ignored.inc();
                tracing::debug!(%command_id, device_id, status = %current.status, report = ?report.kind, "report changes nothing");
                if matches!(report.kind, ReportKind::Result { .. }) && current.status == Status::Canceled {
                    let detail =
                        format!("result after cancel: {}", m.change.detail.clone().unwrap_or_default());
                    // Canceled is final: the note gets the status and attempt it was refused at.
                    self.store().note_as_it_stands(command_id, &detail, 1).await?;
                }
            }
            Moved::NotFound => {
                self.metrics().reports_unknown.inc();
                tracing::warn!(%command_id, device_id, "report for an unknown command");
            }
        }
        Ok(false)
    }

    /// Logs an `undeliverable` report (`times` identical ones) in the command's
    /// events; a repeat of the latest event only counts there.
    async fn note_undeliverable(&self, report: &Report, times: i64) -> Result<(), StoreError> {
        let ReportKind::Undeliverable { reason } = &report.kind else { return Ok(()) };
        let (command_id, receiver) = (report.command_id, &report.receiver_id);
        tracing::debug!(%command_id, device_id = report.device_id.as_str(), %receiver, ?reason, times, "undeliverable");
        let detail = format!("undeliverable at receiver {receiver}: {reason}");
        if !self.store().note_as_it_stands(command_id, &detail, times).await? {
            self.metrics().reports_unknown.inc();
        }
        Ok(())
    }

    /// A command just became final: wake sync callers and long-polls, answer MQTT callers.
    pub async fn on_final(&self, command: &Command) {
        tracing::debug!(command_id = %command.id, device_id = command.device_id.as_str(), status = %command.status, "final");
        self.metrics().commands_final.inc();
        self.waiters().notify(command);
        self.publish_final_notice(command).await;
        if let Some(reply) = &command.reply_to {
            self.reply(reply, "final", command.to_json()).await;
            if let Err(e) = self.store().reply_sent(command.id).await {
                // The sweeper sends it once more after the grace: at least once.
                tracing::warn!(command_id = %command.id, error = %e, "final reply sent but not recorded");
            }
        }
    }
}

/// Two reports that would write the same note on the same command.
fn same_note(a: &Report, b: &Report) -> bool {
    a.command_id == b.command_id && a.receiver_id == b.receiver_id && a.kind == b.kind
}

/// The applier task: applies reports in arrival order, in batches of what has
/// arrived (one store transaction each), acknowledging each only after its
/// batch is committed. Acks go in the order the reports came (rumqttd
/// disconnects a client that acks out of order).
pub(crate) async fn apply_until_shutdown(
    app: App,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = rx.recv() => p,
        };
        let Some(mut next) = first else { return };
        let mut reports = Vec::new();
        loop {
            reports.append(&mut verified_reports(&app, &next));
            batch.push(next);
            if reports.len() >= REPORT_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(p) => next = p,
                Err(_) => break,
            }
        }
        if !apply_until_committed(&app, &reports, &shutdown).await {
            return; // shutting down: not acked, so the broker redelivers them
        }
        for publish in batch.drain(..) {
            if let Err(e) = client.ack(&publish).await {
                tracing::warn!(error = %e, "could not ack a report; the broker will redeliver it");
            }
        }
    }
}

/// The reports of one message, if it passes `Provenance::open` (signed by a
/// receiver) and decodes, each one naming the receiver that signed it;
/// anything else is counted and dropped (and acknowledged: redelivery would
/// not change it).
fn verified_reports(app: &App, message: &Publish) -> Vec<Report> {
    let topic = &*message.topic;
    let Some(verified) = app.provenance().open("report", topic, &message.payload, |_| false) else {
        return Vec::new();
    };
    let mut reports = match decode_one_or_many::<Report>(verified.body) {
        Ok(reports) => reports,
        Err(e) => {
            app.metrics().reports_malformed.inc();
            tracing::warn!(error = %e, "malformed reports message dropped");
            return Vec::new();
        }
    };
    // The signer's bucket (unsigned: the first report's receiver's).
    let sender = verified.from.as_deref().or(reports.first().map(|r| r.receiver_id.as_str())).unwrap_or("");
    if !app.receiver_limits().allow_reports(sender, reports.len()) {
        return Vec::new();
    }
    reports.retain(|r| {
        if !protocol::DeviceId::is_valid(&r.receiver_id) {
            app.provenance().refuse_invalid_receiver("report", topic, &r.receiver_id);
            return false;
        }
        let own = crate::provenance::sent_by(&verified, &r.receiver_id);
        if !own {
            let why = format!("a report naming receiver {:?} signed by {:?}", r.receiver_id, verified.from);
            app.provenance().refuse("report", "wrong_sender", topic, &why);
        }
        own
    });
    reports
}

/// Retries a batch's store write until it succeeds; false if shut down first.
async fn apply_until_committed(app: &App, reports: &[Report], shutdown: &CancellationToken) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match app.apply_reports(reports).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(reports = reports.len(), error = %e, "reports not applied yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}
