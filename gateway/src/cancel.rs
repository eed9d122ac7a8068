//! A caller's cancel. A command never published (`scheduled`, `pending`)
//! becomes `canceled` at once. One that was published may already be at a
//! receiver or on its device, so its cancel is a request (PROTOCOL 2.5.1):
//! recorded (`cancel_requested_at`), never sent again, receivers told; it
//! becomes `canceled` only when a receiver reports that it did not write it,
//! and `succeeded`/`failed` if the device's result comes (it ran). A caller
//! is never told `canceled` for a command that then runs.

use std::time::Duration;

use uuid::Uuid;

use crate::app::App;
use crate::command::machine::cancel_move;
use crate::command::{Command, Status};
use crate::error::ApiError;
use crate::store::Moved;

/// What became of a cancel, within the caller's wait.
#[derive(Debug)]
pub enum Canceled {
    /// `canceled`: it will not run.
    Yes(Command),
    /// Requested; the outcome is not known yet (the command as it stands).
    Requested(Command),
}

impl App {
    /// Cancels command `id`, waiting up to `wait` for the outcome of a
    /// request. Errors: 404 no such command, 409 already final (or it became
    /// final otherwise meanwhile: the device ran it), 503 store unavailable.
    #[tracing::instrument(name = "cancel", level = "debug", skip_all, fields(command_id = %id))]
    pub async fn cancel(&self, id: Uuid, wait: Duration) -> Result<Canceled, ApiError> {
        let command = match self.store().transition_with(id, cancel_move).await? {
            Moved::Yes { from, command } => {
                tracing::debug!(device_id = command.device_id.as_str(), %from, to = %command.status, "cancel");
                if command.status.is_final() {
                    self.on_final(&command).await;
                } else {
                    self.publish_cancel(&command).await;
                }
                command
            }
            Moved::Refused(c) if c.status.is_final() => {
                return Err(ApiError::conflict(format!("command {id} is already {}", c.status)))
            }
            // Its cancel was requested before: wait for the outcome as well.
            Moved::Refused(command) => command,
            Moved::NotFound => return Err(ApiError::not_found(format!("no command {id}"))),
        };
        let command = match command.status.is_final() {
            true => command,
            false => self.wait_final(id, wait).await?.unwrap_or(command),
        };
        match command.status {
            Status::Canceled => Ok(Canceled::Yes(command)),
            s if s.is_final() => Err(ApiError::conflict(format!("command {id} is already {s}"))),
            _ => Ok(Canceled::Requested(command)),
        }
    }
}
