//! How a fleet is configured: one [`FleetConfig`], the device id scheme, and
//! the parsers the CLI (and anyone else taking these values as text) uses.

use std::net::SocketAddr;
use std::path::PathBuf;

use protocol::DeviceId;

/// Everything a [`crate::Fleet`] needs; built once and handed over.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The receivers a device connects to, tried in this order: each device
    /// starts with the first and moves to the next (round robin) whenever a
    /// connect fails or its connection drops. At least one.
    pub connect: Vec<SocketAddr>,
    /// How many devices (connections) to simulate.
    pub devices: usize,
    /// Device ids are `<id_prefix><index>`, see [`device_id`].
    pub id_prefix: String,
    /// Index of the first device.
    pub id_start: usize,
    /// Probability (0.0..=1.0) that a command other than `fail` fails with code 1.
    pub fail_ratio: f64,
    /// Simulated work time per command, in milliseconds, drawn from `min..=max`.
    pub latency_ms: (u64, u64),
    /// Where to keep a JSON copy of the stats (rewritten every second and at the end).
    pub stats_file: Option<PathBuf>,
    /// Send every RESULT frame twice, to exercise dedupe downstream.
    pub duplicate_results: bool,
    /// Probability (0.0..=1.0) that a command with an id new to the device is
    /// ignored as if lost on the line: not run, not remembered, not answered.
    pub drop_ratio: f64,
    /// Each connection is dropped by the device after a time drawn from
    /// `min..=max` milliseconds (from its connect); `None` keeps it.
    pub churn_ms: Option<(u64, u64)>,
    /// The fleet secret each device's key derives from (PROTOCOL.md §5.9):
    /// a device answers a receiver's CHALLENGE with it; `None`: a challenge
    /// ends the connection with an error saying the receiver wants keys.
    pub device_key_secret: Option<protocol::device_auth::FleetSecret>,
    /// One device's own key, as the registry issued it (`POST
    /// /v1/devices/{id}/key`), instead of `device_key_secret`; only with
    /// `devices == 1`.
    pub device_key: Option<protocol::device_auth::DeviceKey>,
    /// The key generation the devices start with (1, 2, …; see
    /// [`crate::Fleet::set_key_generation`] to move a running fleet on).
    pub device_key_generation: u32,
    /// Connect over TLS, trusting the certificates in this PEM file.
    pub tls_ca: Option<PathBuf>,
    /// The name the receiver's certificate must carry (with `tls_ca`);
    /// default: the IP address connected to.
    pub tls_server_name: Option<String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            connect: vec![SocketAddr::from(([127, 0, 0, 1], 7000))],
            devices: 1,
            id_prefix: "dev-".to_owned(),
            id_start: 0,
            fail_ratio: 0.0,
            latency_ms: (0, 0),
            stats_file: None,
            duplicate_results: false,
            drop_ratio: 0.0,
            churn_ms: None,
            device_key_secret: None,
            device_key: None,
            device_key_generation: 1,
            tls_ca: None,
            tls_server_name: None,
        }
    }
}

impl FleetConfig {
    /// The ids of the devices this config describes, in index order. Fails
    /// on the first that is not a valid [`DeviceId`] (a prefix with a space
    /// or a `/`, or too long for a HELLO frame).
    pub fn device_ids(&self) -> Result<Vec<DeviceId>, ConfigError> {
        (self.id_start..self.id_start + self.devices)
            .map(|index| checked_id(&self.id_prefix, index))
            .collect()
    }

    /// Checks what [`crate::Fleet::start`] would otherwise have to quietly fix
    /// or could not use (an id a HELLO frame cannot carry).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect.is_empty() {
            return Err(ConfigError::NoReceiver);
        }
        check_probability(self.fail_ratio, ConfigError::FailRatioRange)?;
        check_probability(self.drop_ratio, ConfigError::DropRatioRange)?;
        check_latency(self.latency_ms)?;
        if let Some(churn) = self.churn_ms {
            check_churn(churn)?;
        }
        // The ids differ only in their digits, and the last is the longest.
        checked_id(&self.id_prefix, self.id_start + self.devices.max(1) - 1)?;
        if self.device_key_generation == 0 {
            return Err(ConfigError::GenerationZero);
        }
        if self.device_key.is_some() && (self.devices != 1 || self.device_key_secret.is_some()) {
            return Err(ConfigError::DeviceKeyForOne);
        }
        if let Some(ca) = &self.tls_ca {
            crate::tls::connector(ca).map_err(ConfigError::Tls)?;
        }
        if let Some(name) = &self.tls_server_name {
            crate::tls::server_name(name).map_err(ConfigError::Tls)?;
        }
        Ok(())
    }
}

/// [`device_id`], parsed.
fn checked_id(prefix: &str, index: usize) -> Result<DeviceId, ConfigError> {
    let id = device_id(prefix, index);
    DeviceId::parse(&id).map_err(|_| {
        if id.len() > DeviceId::MAX_LEN {
            ConfigError::DeviceIdTooLong(id)
        } else {
            ConfigError::InvalidDeviceId(id)
        }
    })
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("latency {0:?} is not `MIN..MAX` or a single number of milliseconds")]
    BadLatency(String),
    #[error("latency minimum {0} ms is above the maximum {1} ms")]
    LatencyOrder(u64, u64),
    #[error("fail ratio {0:?} is not a number")]
    BadFailRatio(String),
    #[error("fail ratio {0} is outside 0.0..=1.0")]
    FailRatioRange(f64),
    #[error("drop ratio {0:?} is not a number")]
    BadDropRatio(String),
    #[error("drop ratio {0} is outside 0.0..=1.0")]
    DropRatioRange(f64),
    #[error("churn {0:?} is not `MIN..MAX` or a single number of milliseconds")]
    BadChurn(String),
    #[error("churn minimum {0} ms is above the maximum {1} ms")]
    ChurnOrder(u64, u64),
    #[error("churn time must be at least 1 ms (a device would drop every connection at once)")]
    ChurnZero,
    #[error("device id {0:?} is longer than {max} bytes", max = DeviceId::MAX_LEN)]
    DeviceIdTooLong(String),
    #[error("device id {0:?} is not 1 to 128 characters of A-Z a-z 0-9 - _ . :")]
    InvalidDeviceId(String),
    #[error("no receiver address to connect to")]
    NoReceiver,
    #[error("key generation 0 does not exist (generations start at 1)")]
    GenerationZero,
    #[error("a device key belongs to one device: use it with --devices 1 and no --device-key-secret")]
    DeviceKeyForOne,
    #[error("TLS: {0}")]
    Tls(String),
}

/// `<prefix><index>`, the index zero-padded to 4 digits: `dev-0007`.
pub fn device_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:04}")
}

/// Parses `A..B` (milliseconds, inclusive) or a single `A` meaning `A..A`.
pub fn parse_latency_ms(text: &str) -> Result<(u64, u64), ConfigError> {
    parse_checked_range(text, ConfigError::BadLatency, check_latency)
}

/// Parses the time to a forced disconnect like [`parse_latency_ms`]; the
/// minimum must be at least 1 ms.
pub fn parse_churn_ms(text: &str) -> Result<(u64, u64), ConfigError> {
    parse_checked_range(text, ConfigError::BadChurn, check_churn)
}

/// Parses a probability in `0.0..=1.0`.
pub fn parse_fail_ratio(text: &str) -> Result<f64, ConfigError> {
    parse_probability(text, ConfigError::BadFailRatio, ConfigError::FailRatioRange)
}

/// Parses a probability in `0.0..=1.0`.
pub fn parse_drop_ratio(text: &str) -> Result<f64, ConfigError> {
    parse_probability(text, ConfigError::BadDropRatio, ConfigError::DropRatioRange)
}

/// A range of milliseconds from `text` that `check` accepts; `not_a_range`
/// names the setting when `text` is not `A..B`, `A..=B` or `A`.
fn parse_checked_range(
    text: &str,
    not_a_range: fn(String) -> ConfigError,
    check: fn((u64, u64)) -> Result<(), ConfigError>,
) -> Result<(u64, u64), ConfigError> {
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let range = match text.split_once("..") {
        Some((min, max)) => number(min).zip(number(max.trim_start_matches('='))),
        None => number(text).map(|single| (single, single)),
    };
    let range = range.ok_or_else(|| not_a_range(text.to_owned()))?;
    check(range)?;
    Ok(range)
}

/// A probability from `text`; the two errors name the setting.
fn parse_probability(
    text: &str,
    not_a_number: fn(String) -> ConfigError,
    out_of_range: fn(f64) -> ConfigError,
) -> Result<f64, ConfigError> {
    let ratio = text.trim().parse::<f64>().map_err(|_| not_a_number(text.to_owned()))?;
    check_probability(ratio, out_of_range)?;
    Ok(ratio)
}

fn check_latency((min, max): (u64, u64)) -> Result<(), ConfigError> {
    if min > max {
        return Err(ConfigError::LatencyOrder(min, max));
    }
    Ok(())
}

fn check_churn((min, max): (u64, u64)) -> Result<(), ConfigError> {
    if min > max {
        return Err(ConfigError::ChurnOrder(min, max));
    }
    if min == 0 {
        return Err(ConfigError::ChurnZero);
    }
    Ok(())
}

/// `ratio` if it is in `0.0..=1.0` (not NaN), else `out_of_range(ratio)`.
fn check_probability(ratio: f64, out_of_range: fn(f64) -> ConfigError) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(out_of_range(ratio));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_zero_padded() {
        assert_eq!(device_id("dev-", 0), "dev-0000");
        assert_eq!(device_id("dev-", 42), "dev-0042");
        assert_eq!(device_id("x", 12345), "x12345");
        let config = FleetConfig { devices: 2, id_start: 9, ..FleetConfig::default() };
        assert_eq!(config.device_ids().unwrap(), ["dev-0009", "dev-0010"]);
    }

    #[test]
    fn latency_accepts_ranges_and_single_numbers() {
        assert_eq!(parse_latency_ms("5..20"), Ok((5, 20)));
        assert_eq!(parse_latency_ms("5..=20"), Ok((5, 20)));
        assert_eq!(parse_latency_ms("7"), Ok((7, 7)));
        assert_eq!(parse_latency_ms("0..0"), Ok((0, 0)));
        assert_eq!(parse_latency_ms("20..5"), Err(ConfigError::LatencyOrder(20, 5)));
        assert!(matches!(parse_latency_ms("a..b"), Err(ConfigError::BadLatency(_))));
        assert!(matches!(parse_latency_ms("-1"), Err(ConfigError::BadLatency(_))));
        assert!(matches!(parse_latency_ms(""), Err(ConfigError::BadLatency(_))));
    }

    #[test]
    fn fail_ratio_must_be_a_probability() {
        assert_eq!(parse_fail_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_fail_ratio("1"), Ok(1.0));
        assert_eq!(parse_fail_ratio("1.5"), Err(ConfigError::FailRatioRange(1.5)));
        assert!(matches!(parse_fail_ratio("NaN"), Err(ConfigError::FailRatioRange(_))));
        assert!(matches!(parse_fail_ratio("lots"), Err(ConfigError::BadFailRatio(_))));
    }

    #[test]
    fn drop_ratio_must_be_a_probability() {
        assert_eq!(parse_drop_ratio("0"), Ok(0.0));
        assert_eq!(parse_drop_ratio(" 1.0 "), Ok(1.0));
        assert_eq!(parse_drop_ratio("-0.1"), Err(ConfigError::DropRatioRange(-0.1)));
        assert!(matches!(parse_drop_ratio("NaN"), Err(ConfigError::DropRatioRange(_))));
        assert!(matches!(parse_drop_ratio("half"), Err(ConfigError::BadDropRatio(_))));
    }

    #[test]
    fn churn_accepts_ranges_and_single_numbers_but_not_zero() {
        assert_eq!(parse_churn_ms("50..80"), Ok((50, 80)));
        assert_eq!(parse_churn_ms("50..=80"), Ok((50, 80)));
        assert_eq!(parse_churn_ms("1000"), Ok((1000, 1000)));
        assert_eq!(parse_churn_ms("80..50"), Err(ConfigError::ChurnOrder(80, 50)));
        assert_eq!(parse_churn_ms("0"), Err(ConfigError::ChurnZero));
        assert_eq!(parse_churn_ms("0..100"), Err(ConfigError::ChurnZero));
        assert!(matches!(parse_churn_ms("soon"), Err(ConfigError::BadChurn(_))));
        assert!(matches!(parse_churn_ms("5.."), Err(ConfigError::BadChurn(_))));
    }

    #[test]
    fn validate_checks_the_fault_knobs() {
        let config = |drop_ratio, churn_ms| FleetConfig { drop_ratio, churn_ms, ..FleetConfig::default() };
        assert_eq!(config(1.0, Some((1, 1))).validate(), Ok(()));
        assert_eq!(config(2.0, None).validate(), Err(ConfigError::DropRatioRange(2.0)));
        assert_eq!(config(0.0, Some((9, 3))).validate(), Err(ConfigError::ChurnOrder(9, 3)));
        assert_eq!(config(0.0, Some((0, 0))).validate(), Err(ConfigError::ChurnZero));
        let nowhere = FleetConfig { connect: Vec::new(), ..FleetConfig::default() };
        assert_eq!(nowhere.validate(), Err(ConfigError::NoReceiver));
    }

    #[test]
    fn validate_checks_the_key_settings() {
        let key = protocol::device_auth::DeviceKey::parse(&"00".repeat(32)).unwrap();
        let one = FleetConfig { device_key: Some(key), ..FleetConfig::default() };
        assert_eq!(one.validate(), Ok(()));
        let two = FleetConfig { devices: 2, ..one.clone() };
        assert_eq!(two.validate(), Err(ConfigError::DeviceKeyForOne));
        let zero = FleetConfig { device_key_generation: 0, ..FleetConfig::default() };
        assert_eq!(zero.validate(), Err(ConfigError::GenerationZero));
        let ca = FleetConfig { tls_ca: Some("/nonexistent/ca.pem".into()), ..FleetConfig::default() };
        assert!(matches!(ca.validate(), Err(ConfigError::Tls(e)) if e.contains("--tls-ca")));
    }

    #[test]
    fn validate_rejects_ids_a_hello_cannot_carry() {
        let config = FleetConfig { id_prefix: "p".repeat(130), ..FleetConfig::default() };
        assert!(matches!(config.validate(), Err(ConfigError::DeviceIdTooLong(_))));
        assert_eq!(FleetConfig::default().validate(), Ok(()));
        let config = FleetConfig { id_prefix: "a/".into(), ..FleetConfig::default() };
        assert_eq!(config.validate(), Err(ConfigError::InvalidDeviceId("a/0000".into())));
    }
}
