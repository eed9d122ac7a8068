//! The wire contract of the system, shared by `gateway`, `receiver` and
//! `firmware-sim`. Pure data and codecs, no I/O.
//!
//! - [`device_id`]: the one check of a device's name.
//! - [`topics`]: MQTT topic names between gateway and receivers.
//! - [`envelope`]: the JSON messages carried on those topics.
//! - [`frame`]: the binary frame between a receiver and a device.
//! - [`seal`]: signed messages between gateway and receivers (who sent it, not replayed).
//! - [`limits`]: every size limit along a command's way, in one place.
//! - [`device_auth`]: per-device keys from a fleet secret, the HELLO challenge–response.
//! - [`serial_line`]: the character format of a serial line (`8N1`, …), as
//!   receivers and devices write it in their settings.
//!
//! `docs/PROTOCOL.md` describes the same contract for third parties.

pub mod device_auth;
pub mod device_id;
pub mod envelope;
pub mod frame;
pub mod limits;
pub mod seal;
pub mod serial_line;
pub mod topics;

pub use device_id::{DeviceId, InvalidDeviceId};
pub use frame::{Frame, FrameCodec, FrameError};
pub use serial_line::SerialFormat;
pub use topics::Topics;
