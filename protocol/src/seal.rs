//! Signed ("sealed") MQTT messages between the gateway and a receiver
//! (PROTOCOL 4.7): who sent a message, proven with HMAC-SHA256 under a key
//! only that receiver and the gateways hold, so that neither a client of
//! the broker nor the broker itself can forge or alter one, and a replayed
//! one is recognised. Pure: times and nonces come from the caller.
//!
//! A sealed message is one JSON object:
//!
//! ```json
//! {"sealed":1,"from":"receiver-1","gen":1,"ts":1764100683120,
//!  "nonce":"q83vEjRWeJCrze8SNFZ4kA","mac":"…base64…","body":{…the message…}}
//! ```
//!
//! `body` is the unsealed message (an object or an array) exactly as it
//! would travel unsigned; the MAC covers its bytes as they appear in the
//! message, so a receiver written in any language can check it without
//! re-serialising JSON. The MAC input ([`mac_input`]) is
//! `"iot-command/seal/v1\n" topic "\n" from "\n" gen "\n" ts "\n" nonce "\n" body`
//! (numbers in decimal, `nonce` as written in the message): the topic is
//! covered, so a message cannot be moved to another topic.
//!
//! Keys: one per receiver and key generation, derived from the gateways'
//! message secret ([`receiver_key`]); both directions between the gateway
//! and receiver `r` use `r`'s key, `from` telling them apart (`"gateway"` or
//! the receiver id).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The `from` of a message a gateway sends to a receiver.
pub const FROM_GATEWAY: &str = "gateway";
/// Domain separation of the MAC input (its first line).
const MAC_CONTEXT: &str = "iot-command/seal/v1";
/// Domain separation of the receiver key derivation.
const KEY_CONTEXT: &[u8] = b"iot-command/receiver-key/v1";
/// Shortest message secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// A 256-bit HMAC key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// Parses a key written as standard base64 (what `gateway receiver-key`
    /// prints) or 64 hex digits.
    pub fn parse(text: &str) -> Result<Key, SealError> {
        let text = text.trim();
        let bytes = match text.len() {
            64 if text.bytes().all(|b| b.is_ascii_hexdigit()) => (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| SealError::BadKey)?,
            _ => STANDARD.decode(text).map_err(|_| SealError::BadKey)?,
        };
        bytes.try_into().map(Key).map_err(|_| SealError::BadKey)
    }

    /// Standard base64, the form `Key::parse` reads.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = SealError;
    fn from_str(s: &str) -> Result<Key, SealError> {
        Key::parse(s)
    }
}

/// Receiver `receiver_id`'s key of generation `generation`:
/// `HMAC-SHA256(secret, "iot-command/receiver-key/v1" 0x00 receiver_id 0x00 generation_u32_be)`.
/// The gateways derive every receiver's key from their shared secret; a
/// receiver is given only its own (`gateway receiver-key`).
pub fn receiver_key(secret: &[u8], receiver_id: &str, generation: u32) -> Key {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(KEY_CONTEXT);
    mac.update(&[0]);
    mac.update(receiver_id.as_bytes());
    mac.update(&[0]);
    mac.update(&generation.to_be_bytes());
    Key(mac.finalize().into_bytes().into())
}

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed message: {0}")]
    NotSealed(String),
    #[error("the signature does not match (forged, altered, or signed with another key)")]
    BadMac,
    #[error("signed by {from:?}, expected {expected:?}")]
    WrongSender { from: String, expected: String },
    #[error("key generation {gen} of {from:?} is revoked (lowest accepted: {min})")]
    RevokedKey { from: String, gen: u32, min: u32 },
    #[error("no key for generation {0}")]
    UnknownGeneration(u32),
    #[error("signed at {ts}, outside the accepted window around now ({now})")]
    Stale { ts: i64, now: i64 },
    #[error("already seen (a replay, or a copy delivered twice)")]
    Replayed,
    #[error("a key is 32 bytes, written as standard base64 or 64 hex digits")]
    BadKey,
}

impl SealError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SealError::NotSealed(_) => "unsigned",
            SealError::BadMac => "bad_signature",
            SealError::WrongSender { .. } => "wrong_sender",
            SealError::RevokedKey { .. } => "revoked_key",
            SealError::UnknownGeneration(_) => "unknown_key",
            SealError::Stale { .. } => "stale",
            SealError::Replayed => "replayed",
            SealError::BadKey => "bad_key",
        }
    }
}

/// The header fields of a sealed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// `"gateway"`, or the sending receiver's id.
    pub from: &'a str,
    /// The key generation used.
    pub gen: u32,
    /// Signing time, ms since the Unix epoch.
    pub ts: i64,
    /// 16 random bytes, fresh per message.
    pub nonce: [u8; 16],
}

/// `body` (JSON text: an object or an array) sealed for `topic` under `key`.
pub fn seal(key: &Key, topic: &str, header: &Header<'_>, body: &[u8]) -> Vec<u8> {
    let nonce = URL_SAFE_NO_PAD.encode(header.nonce);
    let mac = STANDARD.encode(mac(key, topic, header.from, header.gen, header.ts, &nonce, body));
    let from = serde_json::to_string(header.from).expect("a str serialises");
    let mut out = Vec::with_capacity(body.len() + 160);
    out.extend_from_slice(
        format!(
            r#"{{"sealed":1,"from":{from},"gen":{},"ts":{},"nonce":"{nonce}","mac":"{mac}","body":"#,
            header.gen, header.ts
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out.push(b'}');
    out
}

/// A received sealed message, parsed but not verified yet.
#[derive(Debug)]
pub struct Opened<'a> {
    pub from: String,
    pub gen: u32,
    pub ts: i64,
    /// As written in the message (it is part of the MAC input).
    nonce_text: String,
    nonce: [u8; 16],
    mac: Vec<u8>,
    /// The message inside, exactly as it was signed.
    pub body: &'a [u8],
}

#[derive(Deserialize)]
struct Wire<'a> {
    sealed: u32,
    from: String,
    gen: u32,
    ts: i64,
    nonce: String,
    mac: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Parses a sealed message (no verification: see [`Opened::verify`]).
pub fn open(payload: &[u8]) -> Result<Opened<'_>, SealError> {
    let wire: Wire<'_> = serde_json::from_slice(payload).map_err(|e| SealError::NotSealed(e.to_string()))?;
    if wire.sealed != 1 {
        return Err(SealError::NotSealed(format!("unknown seal version {}", wire.sealed)));
    }
    let nonce: [u8; 16] = URL_SAFE_NO_PAD
        .decode(&wire.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| SealError::NotSealed("nonce is not 16 bytes of unpadded base64url".into()))?;
    let mac = STANDARD.decode(&wire.mac).map_err(|_| SealError::NotSealed("mac is not base64".into()))?;
    // The raw text borrows from `payload`: find it there to hand out bytes of `payload`.
    let raw = wire.body.get().as_bytes();
    let start = raw.as_ptr() as usize - payload.as_ptr() as usize;
    Ok(Opened {
        from: wire.from,
        gen: wire.gen,
        ts: wire.ts,
        nonce_text: wire.nonce,
        nonce,
        mac,
        body: &payload[start..start + raw.len()],
    })
}

impl Opened<'_> {
    /// Checks the MAC for `topic` under `key`, in constant time.
    pub fn verify(&self, key: &Key, topic: &str) -> Result<(), SealError> {
        let mut m = HmacSha256::new_from_slice(&key.0).expect("HMAC takes keys of any length");
        m.update(mac_input(topic, &self.from, self.gen, self.ts, &self.nonce_text, self.body).as_slice());
        m.verify_slice(&self.mac).map_err(|_| SealError::BadMac)
    }

    pub fn nonce(&self) -> [u8; 16] {
        self.nonce
    }
}

/// The bytes the MAC is computed over (PROTOCOL 4.7).
pub fn mac_input(topic: &str, from: &str, gen: u32, ts: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let head = format!("{MAC_CONTEXT}\n{topic}\n{from}\n{gen}\n{ts}\n{nonce}\n");
    let mut input = Vec::with_capacity(head.len() + body.len());
    input.extend_from_slice(head.as_bytes());
    input.extend_from_slice(body);
    input
}

fn mac(key: &Key, topic: &str, from: &str, gen: u32, ts: i64, nonce: &str, body: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    m.update(&mac_input(topic, from, gen, ts, nonce, body));
    m.finalize().into_bytes().into()
}

/// Remembers the nonces of recently accepted messages, to refuse a replay:
/// a message is accepted once, and only within `window_ms` of now (either
/// way: clocks differ). Holds at most `capacity` nonces; when full, the
/// oldest are forgotten and messages signed before them are refused as
/// stale — the window shrinks, it never lets a replay through.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: i64,
    capacity: usize,
    seen: std::collections::HashSet<[u8; 16]>,
    order: std::collections::VecDeque<(i64, [u8; 16])>,
    /// Messages signed before this are refused (the forgotten ones' times).
    floor: i64,
}

impl ReplayGuard {
    pub fn new(window_ms: i64, capacity: usize) -> ReplayGuard {
        ReplayGuard {
            window_ms,
            capacity: capacity.max(1),
            seen: Default::default(),
            order: Default::default(),
            floor: i64::MIN,
        }
    }

    /// Whether a message signed at `ts` with `nonce` is fresh at `now`;
    /// records it if so. `ignore_age`: skip the window (an MQTT last will,
    /// signed when its connection was made), not the nonce check.
    pub fn check(&mut self, ts: i64, nonce: [u8; 16], now: i64, ignore_age: bool) -> Result<(), SealError> {
        while let Some(&(at, n)) = self.order.front() {
            if at >= now - self.window_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&n);
        }
        if !ignore_age && (ts < now - self.window_ms || ts > now + self.window_ms || ts < self.floor) {
            return Err(SealError::Stale { ts, now });
        }
        if !self.seen.insert(nonce) {
            return Err(SealError::Replayed);
        }
        // Kept at least as long as the window from now, so an old-signed
        // message accepted (a will) is remembered for a while too.
        self.order.push_back((ts.max(now), nonce));
        while self.order.len() > self.capacity {
            if let Some((at, n)) = self.order.pop_front() {
                self.seen.remove(&n);
                self.floor = self.floor.max(at);
            }
        }
        Ok(())
    }

    /// Nonces held now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(from: &str) -> Header<'_> {
        Header { from, gen: 1, ts: 1_000, nonce: [7; 16] }
    }

    #[test]
    fn a_sealed_message_opens_with_its_key_and_topic_only() {
        let key = receiver_key(&[1; 32], "receiver-1", 1);
        let body = br#"[{"a":1},{"b":"\u00e9"}]"#;
        let sealed = seal(&key, "p/reports", &header("receiver-1"), body);
        let opened = open(&sealed).unwrap();
        assert_eq!(opened.body, body, "the body is the exact bytes signed");
        assert_eq!((opened.from.as_str(), opened.gen, opened.ts), ("receiver-1", 1, 1_000));
        opened.verify(&key, "p/reports").unwrap();
        assert_eq!(opened.verify(&key, "p/presence/d"), Err(SealError::BadMac), "bound to its topic");
        let other = receiver_key(&[1; 32], "receiver-2", 1);
        assert_eq!(opened.verify(&other, "p/reports"), Err(SealError::BadMac));
        let next_gen = receiver_key(&[1; 32], "receiver-1", 2);
        assert_eq!(opened.verify(&next_gen, "p/reports"), Err(SealError::BadMac));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let key = receiver_key(&[1; 32], "r", 1);
        let sealed = seal(&key, "t", &header("r"), br#"{"kind":"delivered"}"#);
        let text = String::from_utf8(sealed).unwrap();
        for (from, to) in [
            ("delivered", "result"),
            (r#""ts":1000"#, r#""ts":1001"#),
            (r#""from":"r""#, r#""from":"gateway""#),
            (r#""gen":1"#, r#""gen":2"#),
        ] {
            let forged = text.replacen(from, to, 1);
            assert_ne!(forged, text);
            let opened = open(forged.as_bytes()).unwrap();
            assert_eq!(opened.verify(&key, "t"), Err(SealError::BadMac), "{from} → {to}");
        }
        assert!(matches!(open(br#"{"kind":"delivered"}"#), Err(SealError::NotSealed(_))));
        assert!(matches!(open(b"\xff\x00"), Err(SealError::NotSealed(_))));
    }

    #[test]
    fn the_mac_input_is_the_documented_one() {
        // The vector of PROTOCOL 4.7, for third-party receivers.
        // Computed independently (Python's hmac module) for PROTOCOL 4.7.
        let key = receiver_key(&[0x42; 32], "receiver-1", 1);
        assert_eq!(key.to_base64(), "vW/XPHYQ+KJ0kZ1RMCAO4cko256jNDNUZHUvA371/VU=");
        let sealed = seal(
            &key,
            "gateway/reports",
            &Header { from: "receiver-1", gen: 1, ts: 1_764_100_683_120, nonce: [0xAB; 16] },
            br#"{"command_id":"01936b2e-8f3a-7c1d-9e4f-0a1b2c3d4e5f","device_id":"dev-0001","receiver_id":"receiver-1","kind":"delivered"}"#,
        );
        let opened = open(&sealed).unwrap();
        let input = mac_input(
            "gateway/reports",
            "receiver-1",
            1,
            1_764_100_683_120,
            "q6urq6urq6urq6urq6urqw",
            opened.body,
        );
        assert!(input.starts_with(
            b"iot-command/seal/v1\ngateway/reports\nreceiver-1\n1\n1764100683120\nq6urq6urq6urq6urq6urqw\n{"
        ));
        opened.verify(&key, "gateway/reports").unwrap();
        let text = String::from_utf8(sealed).unwrap();
        assert!(text.contains(r#""mac":"tJMPDtCL/cReeLxcH05nsFIteuwxhIvaR76syukAiXs=""#), "{text}");
        assert!(text.starts_with(r#"{"sealed":1,"from":"receiver-1","gen":1,"ts":1764100683120,"nonce":"q6urq6urq6urq6urq6urqw","mac":"#), "{text}");
    }

    #[test]
    fn replays_and_stale_messages_are_refused() {
        let mut guard = ReplayGuard::new(1_000, 3);
        assert_eq!(guard.check(10_000, [1; 16], 10_000, false), Ok(()));
        assert_eq!(guard.check(10_000, [1; 16], 10_100, false), Err(SealError::Replayed));
        assert!(matches!(guard.check(8_000, [2; 16], 10_100, false), Err(SealError::Stale { .. })));
        assert!(matches!(guard.check(12_000, [2; 16], 10_100, false), Err(SealError::Stale { .. })));
        // A last will: old, accepted once.
        assert_eq!(guard.check(1, [3; 16], 10_100, true), Ok(()));
        assert_eq!(guard.check(1, [3; 16], 10_200, true), Err(SealError::Replayed));
        // Full: the oldest is forgotten and older messages become stale, not replayable.
        for n in 4..=6u8 {
            assert_eq!(guard.check(10_300, [n; 16], 10_300, false), Ok(()));
        }
        assert_eq!(guard.len(), 3);
        assert!(matches!(guard.check(10_050, [9; 16], 10_300, false), Err(SealError::Stale { .. })));
        // Past the window the nonces go: bounded however long it runs.
        assert_eq!(guard.check(20_000, [8; 16], 20_000, false), Ok(()));
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn keys_parse_from_base64_or_hex() {
        let k = Key::from_bytes([0xA5; 32]);
        assert_eq!(Key::parse(&k.to_base64()).unwrap(), k);
        assert_eq!(Key::parse(&"a5".repeat(32)).unwrap(), k);
        assert_eq!(Key::parse("short"), Err(SealError::BadKey));
        assert_eq!(format!("{k:?}"), "Key(…)");
    }
}
