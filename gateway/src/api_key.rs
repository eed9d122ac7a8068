//! HTTP API keys, pure: the [`Scope`]s a key grants, the key text
//! `gk_<id>_<secret>` handed out once, and the SHA-256 of the secret that is
//! all the store keeps. Checking a request against them is `http::auth`;
//! storing them is `store::api_keys`.
//!
//! The secret is 32 random bytes (256 bits, base64url): a plain SHA-256 is
//! enough to store it (the OWASP advice for high-entropy API keys). A slow
//! password hash would only slow down every request — nobody can guess 2^256
//! secrets, however fast each guess is.

use std::fmt;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do. Which routes need which is `http::auth::ACCESS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Submit and cancel commands.
    CommandsWrite,
    /// Read commands and their events (and the device registry).
    CommandsRead,
    /// Register, change and read devices (and their credentials).
    DevicesAdmin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::CommandsWrite, Scope::CommandsRead, Scope::DevicesAdmin];

    /// The scope's name: `commands:write`, `commands:read`, `devices:admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CommandsWrite => "commands:write",
            Scope::CommandsRead => "commands:read",
            Scope::DevicesAdmin => "devices:admin",
        }
    }

    /// A scope by its name; the error names the valid ones.
    pub fn parse(name: &str) -> Result<Scope, UnknownScope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| UnknownScope(name.to_owned()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}: use commands:write, commands:read or devices:admin")]
pub struct UnknownScope(pub String);

/// Scopes as stored: names separated by spaces (or commas), in a fixed order.
pub fn scopes_text(scopes: &[Scope]) -> String {
    let mut sorted = scopes.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
}

/// The scopes of a stored list. A name this version does not know is
/// skipped: a key never gets more than it was given.
pub fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split([' ', ',']).filter_map(|s| Scope::parse(s.trim()).ok()).collect()
}

/// Every key starts with this.
pub const PREFIX: &str = "gk_";
/// Length of a key id: 16 hex digits (64 random bits; the id is not secret).
pub const ID_LEN: usize = 16;
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;

/// A new key: the whole text, shown to its owner once, and the parts stored.
pub struct NewKey {
    pub id: String,
    /// SHA-256 of the secret, lower-case hex.
    pub hash: String,
    text: String,
}

impl NewKey {
    /// A fresh id and secret from the operating system's random generator.
    pub fn generate() -> NewKey {
        let mut rng = rand::rngs::OsRng;
        let id = format!("{:016x}", rng.next_u64());
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut secret);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        NewKey { hash: hash_secret(&secret), text: format!("{PREFIX}{id}_{secret}"), id }
    }

    /// `gk_<id>_<secret>`: what a caller sends as `Authorization: Bearer …`.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for NewKey {
    /// Never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// A key as a caller presented it, split into id and secret.
pub struct Presented<'a> {
    pub id: &'a str,
    secret: &'a str,
}

impl<'a> Presented<'a> {
    /// Splits `gk_<id>_<secret>`; `None` when the text has not that shape.
    pub fn parse(text: &'a str) -> Option<Presented<'a>> {
        let (id, secret) = text.strip_prefix(PREFIX)?.split_once('_')?;
        let well_formed = id.len() == ID_LEN
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && !secret.is_empty()
            && secret.len() <= 128;
        well_formed.then_some(Presented { id, secret })
    }

    /// Whether the secret's SHA-256 is `stored_hash` (hex), compared in
    /// constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        hash_secret(self.secret).as_bytes().ct_eq(stored_hash.as_bytes()).into()
    }
}

impl fmt::Debug for Presented<'_> {
    /// Never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presented").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// SHA-256 of a secret, lower-case hex (64 characters).
fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_and_matches_only_its_hash() {
        let key = NewKey::generate();
        assert!(key.text().starts_with("gk_") && key.text().len() == 3 + ID_LEN + 1 + 43, "{}", key.text());
        let presented = Presented::parse(key.text()).unwrap();
        assert_eq!(presented.id, key.id);
        assert!(presented.matches(&key.hash));
        let other = NewKey::generate();
        assert!(!presented.matches(&other.hash));
        assert!(!Presented::parse(other.text()).unwrap().matches(&key.hash));
        // The hash is not the secret, and nothing prints it.
        assert!(!key.text().contains(&key.hash));
        let shown = format!("{key:?} {presented:?}");
        assert!(!shown.contains(&key.text()[3 + ID_LEN + 1..]), "{shown}");
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "gk_",
            "gk_abc_def",
            "xx_0123456789abcdef_s",
            "gk_0123456789abcdef_",
            "gk_0123456789abcdeg_s",
        ] {
            assert!(Presented::parse(bad).is_none(), "{bad:?}");
        }
        // base64url secrets may contain '_': the id ends at the first one.
        let p = Presented::parse("gk_0123456789abcdef_a_b-c").unwrap();
        assert_eq!(p.id, "0123456789abcdef");
        assert!(p.matches(&hash_secret("a_b-c")));
    }

    #[test]
    fn scopes_round_trip_and_unknown_names_grant_nothing() {
        let all = Scope::ALL;
        assert_eq!(scopes_text(&all), "commands:write commands:read devices:admin");
        assert_eq!(parse_scopes(&scopes_text(&all)), all.to_vec());
        assert_eq!(parse_scopes("commands:read,root"), vec![Scope::CommandsRead]);
        assert!(Scope::parse("admin").unwrap_err().to_string().contains("devices:admin"));
    }
}
