//! The group-commit writer: the single task that stores new commands. It takes
//! whatever submissions are waiting (up to `INSERT_BATCH`), looks up their
//! devices in one query, stores those whose device exists and is enabled in
//! one transaction, then answers each. Under load many submissions share one
//! query and one commit; alone, one waits for nothing.
//!
//! The per-device cap (`--max-device-queue`) is checked here, per batch: one
//! query counts the batch's devices' non-final commands, and a submission
//! that would take its device past the cap is refused (429
//! `device_queue_full`) unless it repeats an accepted command's idempotency
//! key. This task is the only writer of new commands of its instance, so the
//! cap is exact for one instance; instances sharing a database may together
//! overshoot it by the batches the others have in flight (at most
//! `INSERT_BATCH` each).

use std::collections::HashMap;

use plumbing::metrics::Counter;
use protocol::DeviceId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::command::{NewCommand, Status};
use crate::error::{ApiError, ErrorKind};
use crate::store::{Inserted, Store, StoreError};

/// New commands waiting for the writer. When full, submissions wait (back-pressure).
const INSERT_QUEUE: usize = 1024;
/// New commands stored per transaction at most.
const INSERT_BATCH: usize = 128;

/// A new command and where its outcome goes.
#[derive(Debug)]
pub(crate) struct InsertRequest {
    pub(crate) new: NewCommand,
    pub(crate) done: oneshot::Sender<Result<Stored, ApiError>>,
}

/// The writer's answer for one command.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) inserted: Inserted,
    /// The receiver to publish to, when the first attempt was claimed with the insert.
    pub(crate) receiver: Option<String>,
}

/// The per-device cap as the writer applies it.
#[derive(Debug, Clone)]
pub(crate) struct DeviceCap {
    /// Non-final commands a device may have.
    pub(crate) max: u64,
    /// The retry hint of a refusal, in ms.
    pub(crate) retry_after_ms: u64,
    /// Counts refusals (`gateway_device_queue_full_total`).
    pub(crate) refused: Counter,
}

/// Starts the writer; it ends when every sender is gone, or when `close` is
/// cancelled and it has stored (or refused) every request already queued —
/// later sends fail, and their submissions are answered 503.
pub(crate) fn start(
    store: Store,
    instance_id: String,
    cap: DeviceCap,
    close: CancellationToken,
) -> (mpsc::Sender<InsertRequest>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(INSERT_QUEUE);
    let task = tokio::spawn(write_new_commands(store, instance_id, cap, rx, close));
    (tx, task)
}

/// Takes the requests that would go past their device's cap out of `batch`
/// and refuses them (`queued`: each device's commands not yet final, as read
/// with the batch's devices); a request repeating an existing idempotency key
/// stays.
async fn apply_cap(
    store: &Store,
    cap: &DeviceCap,
    mut queued: HashMap<DeviceId, u64>,
    batch: &mut Vec<InsertRequest>,
) -> Result<(), StoreError> {
    let mut kept = Vec::with_capacity(batch.len());
    for request in batch.drain(..) {
        let device = &request.new.device_id;
        let count = queued.entry(device.clone()).or_default();
        if *count < cap.max {
            *count += 1;
            kept.push(request);
            continue;
        }
        if let Some(key) = &request.new.idempotency_key {
            if store.has_idempotency_key(device, key).await? {
                kept.push(request);
                continue;
            }
        }
        cap.refused.inc();
        let message = format!(
            "device {:?} has {count} commands not yet final, its cap (--max-device-queue {}); \
             try again when some are final",
            device.as_str(),
            cap.max
        );
        let refusal = ApiError::new(ErrorKind::DeviceQueueFull, message).retry_after(cap.retry_after_ms);
        let _ = request.done.send(Err(refusal));
    }
    *batch = kept;
    Ok(())
}

async fn write_new_commands(
    store: Store,
    instance_id: String,
    cap: DeviceCap,
    mut rx: mpsc::Receiver<InsertRequest>,
    close: CancellationToken,
) {
    let mut batch = Vec::with_capacity(INSERT_BATCH);
    loop {
        // `recv_many` is cancel-safe: nothing is taken when `close` wins.
        let taken = tokio::select! {
            taken = rx.recv_many(&mut batch, INSERT_BATCH) => taken,
            () = close.cancelled(), if !rx.is_closed() => {
                // No new requests; those queued are still received, then 0.
                rx.close();
                continue;
            }
        };
        if taken == 0 {
            break;
        }
        // One query: the batch's devices with their counts of commands not yet final.
        let mut ids: Vec<_> = batch.iter().map(|r| &r.new.device_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let devices = match store.devices_with_queued(&ids).await {
            Ok(devices) => devices,
            Err(e) => {
                answer_all(batch.drain(..), e);
                continue;
            }
        };
        let queued = devices.iter().map(|(id, (_, n))| (id.clone(), *n)).collect();
        if let Err(e) = apply_cap(&store, &cap, queued, &mut batch).await {
            answer_all(batch.drain(..), e);
            continue;
        }
        let mut accepted: Vec<(InsertRequest, Option<String>)> = Vec::with_capacity(batch.len());
        for mut request in batch.drain(..) {
            let device_id = &request.new.device_id;
            match devices.get(device_id).map(|(d, _)| d) {
                None => {
                    let _ = request
                        .done
                        .send(Err(ApiError::not_found(format!("unknown device {:?}", device_id.as_str()))));
                }
                Some(d) if !d.enabled => {
                    let _ = request.done.send(Err(ApiError::conflict(format!(
                        "device {:?} is disabled",
                        device_id.as_str()
                    ))));
                }
                Some(d) => {
                    // Scheduled commands, and commands for a device no receiver holds
                    // now, wait in the store: the sweeper publishes them when due.
                    // Otherwise the first attempt is claimed in the same transaction
                    // as the insert and published right after the commit (a crash in
                    // between: the ack timeout re-sends).
                    let receiver = d.receiver_id.clone().filter(|_| d.online);
                    if request.new.status == Status::Pending && receiver.is_some() {
                        request.new.status = Status::Sent;
                        request.new.sent_to = receiver.clone();
                        request.new.first_attempt_detail =
                            Some(format!("attempt 1 by {instance_id}: accepted"));
                    }
                    accepted.push((request, receiver));
                }
            }
        }
        let news: Vec<NewCommand> = accepted.iter().map(|(r, _)| r.new.clone()).collect();
        match store.insert_commands(&news).await {
            Ok(done) => {
                for ((request, receiver), inserted) in accepted.into_iter().zip(done) {
                    let _ = request.done.send(Ok(Stored { inserted, receiver }));
                }
            }
            Err(e) => answer_all(accepted.into_iter().map(|(r, _)| r), e),
        }
    }
}

/// The store failed: every request of the batch learns it (nothing was stored).
fn answer_all(requests: impl Iterator<Item = InsertRequest>, error: StoreError) {
    let refusal = ApiError::from(error);
    for request in requests {
        let _ = request.done.send(Err(refusal.clone()));
    }
}
