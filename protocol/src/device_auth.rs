//! Device authentication: per-device keys derived from one fleet secret (the
//! "group enrollment" model of Azure DPS) and the challenge–response a device
//! answers after its HELLO (PROTOCOL.md §5.9). Pure computation, no I/O.
//!
//! ```text
//! device_key = HMAC-SHA256(fleet_secret, "iot-command/device-key/v1" 0x00 device_id 0x00 generation_u32_be)
//! proof      = HMAC-SHA256(device_key,   "iot-command/hello/v1"      0x00 device_id 0x00 nonce)
//! ```
//!
//! Whoever holds the fleet secret (the gateway, to issue keys; the receivers,
//! to check proofs) can compute any device's key, so nothing per device is
//! stored anywhere but in the device itself: the registry keeps only which
//! generations are valid. Secrets and keys never print (`Debug` is masked).

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::DeviceId;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a device key and of a proof (SHA-256's output).
pub const KEY_LEN: usize = 32;
/// Bytes of the nonce in a CHALLENGE frame.
pub const NONCE_LEN: usize = 32;
/// Shortest fleet secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Domain label of the key derivation.
pub const KEY_LABEL: &[u8] = b"iot-command/device-key/v1";
/// Domain label of the HELLO proof.
pub const HELLO_LABEL: &[u8] = b"iot-command/hello/v1";

/// The fleet secret: at least [`MIN_SECRET_LEN`] random bytes, held by the
/// gateway and the receivers, never by a device.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSecret(Vec<u8>);

/// A device's key for one generation: what a device is provisioned with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey([u8; KEY_LEN]);

/// Why a fleet secret or device key was refused (the text never contains it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("not hex and not base64")]
    Encoding,
    #[error("{0} bytes; at least {MIN_SECRET_LEN} are required")]
    TooShort(usize),
    #[error("a device key is {KEY_LEN} bytes, this is {0}")]
    KeyLength(usize),
}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetSecret(<{} bytes, hidden>)", self.0.len())
    }
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(<hidden>)")
    }
}

/// Bytes from text: hex when it is only hex digits (an even count), else
/// standard base64 (padded or not). Surrounding whitespace is ignored.
fn decode_text(text: &str) -> Result<Vec<u8>, SecretError> {
    let text = text.trim();
    if !text.is_empty() && text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let digit = |b: u8| (b as char).to_digit(16).expect("checked hex digit") as u8;
        return Ok(text.as_bytes().chunks(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect());
    }
    let engine = base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(text).map_err(|_| SecretError::Encoding)
}

impl FleetSecret {
    /// From raw bytes; at least [`MIN_SECRET_LEN`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<FleetSecret, SecretError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(FleetSecret(bytes))
    }

    /// From text (a flag, an environment variable, a file's contents): hex
    /// if it is only hex digits, else standard base64; at least 32 bytes.
    pub fn parse(text: &str) -> Result<FleetSecret, SecretError> {
        FleetSecret::from_bytes(decode_text(text)?)
    }

    /// The key of `device_id` at `generation` (1, 2, …).
    pub fn device_key(&self, device_id: &DeviceId, generation: u32) -> DeviceKey {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(KEY_LABEL);
        mac.update(&[0]);
        mac.update(device_id.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(&generation.to_be_bytes());
        DeviceKey(mac.finalize().into_bytes().into())
    }

    /// Checks an AUTH answer to `nonce` from `device_id`: true when `proof`
    /// was made with the device's key of `generation` (compared in constant time).
    pub fn verify(&self, device_id: &DeviceId, generation: u32, nonce: &[u8], proof: &[u8; KEY_LEN]) -> bool {
        let expected = self.device_key(device_id, generation).prove(device_id, nonce);
        bool::from(expected.ct_eq(proof))
    }
}

impl std::str::FromStr for FleetSecret {
    type Err = SecretError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        FleetSecret::parse(text)
    }
}

impl std::str::FromStr for DeviceKey {
    type Err = SecretError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        DeviceKey::parse(text)
    }
}

impl DeviceKey {
    /// The key from its 32 bytes as text (hex or base64, as the registry
    /// API's `key` and the simulator's flags give it).
    pub fn parse(text: &str) -> Result<DeviceKey, SecretError> {
        let bytes = decode_text(text)?;
        let key: [u8; KEY_LEN] =
            bytes.as_slice().try_into().map_err(|_| SecretError::KeyLength(bytes.len()))?;
        Ok(DeviceKey(key))
    }

    /// The raw key, to hand to a device once (base64 in the registry API).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key in standard base64, as the registry API returns it.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The proof a device sends in its AUTH frame in answer to `nonce`.
    pub fn prove(&self, device_id: &DeviceId, nonce: &[u8]) -> [u8; KEY_LEN] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(HELLO_LABEL);
        mac.update(&[0]);
        mac.update(device_id.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(nonce);
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The vector printed in PROTOCOL.md §5.9 (computed independently with
    /// Python's `hmac`): a third party checks their firmware against it.
    #[test]
    fn the_documented_vector() {
        // The secret 00 01 02 … 1f, the nonce a0 a1 … bf.
        let secret =
            FleetSecret::parse("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f").unwrap();
        let device = DeviceId::parse("dev-0001").unwrap();
        let key = secret.device_key(&device, 1);
        let nonce: Vec<u8> = (0xA0u8..=0xBF).collect();
        let proof = key.prove(&device, &nonce);
        assert_eq!(hex(key.as_bytes()), "e3ebffd32f2e84483a36e29be136e6b00556e2a069fda3ae6b5e003f44fc53b1");
        assert_eq!(hex(&proof), "aaf03c823bf61faa82e0dd7157f6fe82bf7ba7f35c9347e480b51a1f15f7a1ca");
        assert!(secret.verify(&device, 1, &nonce, &proof));
    }

    #[test]
    fn keys_differ_per_device_and_generation_and_proofs_per_nonce() {
        let secret = FleetSecret::from_bytes(vec![7; 32]).unwrap();
        let (a, b) = (DeviceId::parse("a").unwrap(), DeviceId::parse("b").unwrap());
        assert_ne!(secret.device_key(&a, 1), secret.device_key(&b, 1));
        assert_ne!(secret.device_key(&a, 1), secret.device_key(&a, 2));
        let key = secret.device_key(&a, 1);
        let proof = key.prove(&a, &[1; 32]);
        assert_ne!(proof, key.prove(&a, &[2; 32]));
        assert!(secret.verify(&a, 1, &[1; 32], &proof));
        assert!(!secret.verify(&a, 2, &[1; 32], &proof), "another generation");
        assert!(!secret.verify(&b, 1, &[1; 32], &proof), "another device");
        assert!(!secret.verify(&a, 1, &[2; 32], &proof), "another nonce");
        let other = FleetSecret::from_bytes(vec![8; 32]).unwrap();
        assert!(!other.verify(&a, 1, &[1; 32], &proof), "another fleet");
    }

    #[test]
    fn secrets_parse_from_hex_or_base64_and_never_print() {
        let hex_text = "ab".repeat(32);
        let from_hex = FleetSecret::parse(&format!(" {hex_text}\n")).unwrap();
        assert_eq!(from_hex.0, vec![0xab; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([0xab; 32]);
        assert_eq!(FleetSecret::parse(&b64).unwrap(), from_hex);
        assert_eq!(FleetSecret::parse(b64.trim_end_matches('=')).unwrap(), from_hex);
        assert_eq!(FleetSecret::parse(&"ab".repeat(31)), Err(SecretError::TooShort(31)));
        assert_eq!(FleetSecret::parse("not a secret!"), Err(SecretError::Encoding));
        assert!(!format!("{from_hex:?}").contains("ab"), "{from_hex:?}");
        let key = from_hex.device_key(&DeviceId::parse("d").unwrap(), 1);
        assert_eq!(format!("{key:?}"), "DeviceKey(<hidden>)");
        assert_eq!(DeviceKey::parse(&key.to_base64()), Ok(key));
        assert_eq!(DeviceKey::parse(&hex(key.as_bytes())), Ok(key));
        assert_eq!(DeviceKey::parse("abcd"), Err(SecretError::KeyLength(2)));
    }
}
