//! The wire contract of the system, shared by `gateway`, `receiver` and
//! `firmware-sim`. Pure data and codecs, no I/O.
//!
//! - [`topics`]: MQTT topic names between gateway and receivers.
//! - [`envelope`]: the JSON messages carried on those topics.
//! - [`frame`]: the binary frame between a receiver and a device.
//!
//! `docs/PROTOCOL.md` describes the same contract for third parties.

pub mod envelope;
pub mod frame;
pub mod topics;

pub use frame::{Frame, FrameCodec, FrameError};
pub use topics::Topics;
