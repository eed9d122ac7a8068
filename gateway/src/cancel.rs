//! A caller's cancel: the command moves to `canceled` if it is not final; if
//! it was already published, receivers are told and drop it unless it has
//! reached the device (a result arriving later is only logged).

use uuid::Uuid;

use crate::app::App;
use crate::command::machine::cancel_change;
use crate::command::{Command, Status};
use crate::error::ApiError;
use crate::store::Moved;

impl App {
    /// Cancels command `id`. Errors: 404 no such command, 409 already final,
    /// 503 store unavailable.
    #[tracing::instrument(name = "cancel", level = "debug", skip_all, fields(command_id = %id))]
    pub async fn cancel(&self, id: Uuid) -> Result<Command, ApiError> {
        match self.store().transition(id, Status::Canceled, &cancel_change()).await? {
            Moved::Yes { from, command } => {
                tracing::debug!(device_id = command.device_id.as_str(), %from, "canceled");
                if matches!(from, Status::Sent | Status::Delivered) {
                    self.publish_cancel(&command).await;
                }
                self.on_final(&command).await;
                Ok(command)
            }
            Moved::Refused(c) => Err(ApiError::conflict(format!("command {id} is already {}", c.status))),
            Moved::NotFound => Err(ApiError::not_found(format!("no command {id}"))),
        }
    }
}
