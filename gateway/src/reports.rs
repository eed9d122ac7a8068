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
        let result_timeout = Duration::from_millis(self.config().result_timeout_ms);
        let mut moves: Vec<Move> = Vec::with_capacity(reports.len());
        let mut applied: Vec<&Report> = Vec::with_capacity(reports.len());
        for report in reports {
            match report_move(report, now_ms(), result_timeout) {
                Some(m) => {
                    moves.push(m);
                    applied.push(report);
                }
                None => self.note_undeliverable(report).await?,
            }
        }
        if moves.is_empty() {
            return Ok(());
        }
        let outcomes = self.store().transition_many(&moves).await?;
        for ((m, report), outcome) in moves.iter().zip(applied).zip(outcomes) {
            self.after_report(m, report, outcome).await?;
        }
        Ok(())
    }

    async fn after_report(&self, m: &Move, report: &Report, outcome: Moved) -> Result<(), StoreError> {
        let (command_id, device_id) = (m.id, report.device_id.as_str());
        match outcome {
            Moved::Yes { from, command } => {
                self.metrics().reports_applied.inc();
                tracing::debug!(%command_id, device_id, %from, to = %command.status, receiver = %report.receiver_id, "report applied");
                if command.status.is_final() {
                    self.on_final(&command).await;
                }
            }
            // Not the completion of a cancel: logged, nothing moves.
            Moved::Refused(_) if matches!(report.kind, ReportKind::Undeliverable { .. }) => {
                self.note_undeliverable(report).await?;
            }
            Moved::Refused(current) => {
                self.metrics().reports_ignored.inc();
                tracing::debug!(%command_id, device_id, status = %current.status, report = ?report.kind, "report changes nothing");
                if matches!(report.kind, ReportKind::Result { .. }) && current.status == Status::Canceled {
                    let detail =
                        format!("result after cancel: {}", m.change.detail.clone().unwrap_or_default());
                    // Canceled is final: the note gets the status and attempt it was refused at.
                    self.store().note_as_it_stands(command_id, &detail).await?;
                }
            }
            Moved::NotFound => {
                self.metrics().reports_unknown.inc();
                tracing::warn!(%command_id, device_id, "report for an unknown command");
            }
        }
        Ok(())
    }

    async fn note_undeliverable(&self, report: &Report) -> Result<(), StoreError> {
        let ReportKind::Undeliverable { reason } = &report.kind else { return Ok(()) };
        let (command_id, receiver) = (report.command_id, &report.receiver_id);
        tracing::debug!(%command_id, device_id = report.device_id.as_str(), %receiver, %reason, "undeliverable");
        let detail = format!("undeliverable at receiver {receiver}: {reason}");
        if !self.store().note_as_it_stands(command_id, &detail).await? {
            self.metrics().reports_unknown.inc();
        }
        Ok(())
    }

    /// A command just became final: wake sync callers and long-polls, answer MQTT callers.
    pub async fn on_final(&self, command: &Command) {
        tracing::debug!(command_id = %command.id, device_id = command.device_id.as_str(), status = %command.status, "final");
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
            match decode_one_or_many::<Report>(&next.payload) {
                Ok(mut r) => reports.append(&mut r),
                Err(e) => {
                    app.metrics().reports_malformed.inc();
                    tracing::warn!(error = %e, "malformed reports message dropped");
                }
            }
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
