//! [`DeviceId`]: a device's name, checked once where it enters the system
//! (HTTP path, MQTT message, HELLO frame) and trusted everywhere after.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A device id usable as an MQTT topic level and in a HELLO frame: 1 to
/// [`MAX_LEN`](DeviceId::MAX_LEN) bytes of `A-Z a-z 0-9 - _ . :`. MQTT's
/// wildcards and separator (`+ # /`, MQTT 3.1.1 §4.7) cannot occur.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Why a string is not a [`DeviceId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device id must be 1 to 128 characters of A-Z a-z 0-9 - _ . : (got {0:?})")]
pub struct InvalidDeviceId(pub String);

impl DeviceId {
    /// Longest id, in bytes (what a HELLO frame carries).
    pub const MAX_LEN: usize = crate::frame::MAX_DEVICE_ID_LEN;

    /// Checks `id` and wraps it.
    pub fn parse(id: &str) -> Result<DeviceId, InvalidDeviceId> {
        DeviceId::try_from(id.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `id` would parse.
    pub fn is_valid(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;

    fn try_from(id: String) -> Result<DeviceId, InvalidDeviceId> {
        if DeviceId::is_valid(&id) {
            Ok(DeviceId(id))
        } else {
            // Shown in errors and logs: keep it short.
            Err(InvalidDeviceId(id.chars().take(DeviceId::MAX_LEN + 1).collect()))
        }
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;

    fn from_str(id: &str) -> Result<DeviceId, InvalidDeviceId> {
        DeviceId::parse(id)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_would_break_topics_or_frames_are_refused() {
        assert_eq!(DeviceId::parse("dev-0001").unwrap().as_str(), "dev-0001");
        assert!(DeviceId::parse(&"x".repeat(128)).is_ok());
        for bad in ["", "a/b", "a+", "#", "a b", "é", &"x".repeat(129)] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_is_a_plain_string_checked_on_the_way_in() {
        let id: DeviceId = serde_json::from_str(r#""meter-1""#).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""meter-1""#);
        assert!(serde_json::from_str::<DeviceId>(r#""a/b""#).is_err());
    }
}
