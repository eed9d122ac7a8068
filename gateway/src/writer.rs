//! The group-commit writer: the single task that stores new commands. It takes
//! whatever submissions are waiting (up to `INSERT_BATCH`), looks up their
//! devices in one query, stores those whose device exists and is enabled in
//! one transaction, then answers each. Under load many submissions share one
//! query and one commit; alone, one waits for nothing.

use tokio::sync::{mpsc, oneshot};

use crate::command::{NewCommand, Status};
use crate::error::ApiError;
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

/// Starts the writer; it ends when every sender is gone.
pub(crate) fn start(store: Store, instance_id: String) -> mpsc::Sender<InsertRequest> {
    let (tx, rx) = mpsc::channel(INSERT_QUEUE);
    tokio::spawn(write_new_commands(store, instance_id, rx));
    tx
}

async fn write_new_commands(store: Store, instance_id: String, mut rx: mpsc::Receiver<InsertRequest>) {
    let mut batch = Vec::with_capacity(INSERT_BATCH);
    while rx.recv_many(&mut batch, INSERT_BATCH).await > 0 {
        let ids: Vec<_> = batch.iter().map(|r| &r.new.device_id).collect();
        let devices = match store.get_devices(&ids).await {
            Ok(devices) => devices,
            Err(e) => {
                answer_all(batch.drain(..), e);
                continue;
            }
        };
        let mut accepted: Vec<(InsertRequest, Option<String>)> = Vec::with_capacity(batch.len());
        for mut request in batch.drain(..) {
            let device_id = &request.new.device_id;
            match devices.get(device_id) {
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
