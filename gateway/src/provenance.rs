//! Who sent a message (PROTOCOL 4.7). With a message secret configured,
//! every message between the gateway and a receiver is sealed
//! (`protocol::seal`) under that receiver's key, derived from the secret:
//! the gateway seals what it sends a receiver (commands, cancels) and opens
//! what receivers send (reports, presence, receiver status), refusing —
//! counting and logging, changing nothing — anything unsigned, forged,
//! signed with a revoked key generation, stale or replayed. Without a secret
//! (`--insecure` only) messages travel unsigned and are taken as they come.
//!
//! What a verified message may then do is the callers' business: a report
//! moves only a command sent to its receiver (`command::machine`), a
//! presence or status names its own receiver (`presence`).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context};
use plumbing::seal::{seal_now, Freshness, Refusals};
use protocol::seal::{receiver_key, SealError, FROM_GATEWAY, MIN_SECRET_LEN};

use crate::config::Config;

/// A message that passed: its sender (a receiver id; `None` unsigned) and the
/// message inside.
#[derive(Debug)]
pub struct Verified<'a> {
    pub from: Option<String>,
    pub body: &'a [u8],
}

/// The gateway's keys and replay memory.
#[derive(Debug)]
pub struct Provenance {
    /// `None`: unsigned (`--insecure` without a secret).
    secret: Option<Vec<u8>>,
    /// Lowest key generation accepted per receiver (1 when not named).
    min_generation: HashMap<String, u32>,
    /// The generation each receiver signed its latest message with: what
    /// the gateway signs with towards it (a rotated receiver is answered in
    /// its new key as soon as it speaks).
    current: Mutex<HashMap<String, u32>>,
    freshness: Freshness,
    refusals: Refusals,
}

impl Provenance {
    /// From the configuration: the secret (`--message-secret[-file]`), or
    /// unsigned with `--insecure`; an error names what is missing or wrong.
    pub fn from_config(config: &Config, metrics: &plumbing::metrics::Metrics) -> anyhow::Result<Provenance> {
        let secret = config.message_secret()?;
        if secret.is_none() && !config.insecure {
            bail!(
                "no message secret: set GATEWAY_MESSAGE_SECRET or --message-secret-file (at least {MIN_SECRET_LEN} bytes; e.g. `openssl rand -base64 48`), or run with --insecure (unsigned messages, docs/SECURITY.md)"
            );
        }
        let mut min_generation = HashMap::new();
        for spec in &config.receiver_key_min_generation {
            let (receiver, generation) =
                spec.split_once('=').context("--receiver-key-min-generation takes RECEIVER=GENERATION")?;
            let generation: u32 = generation.parse().with_context(|| {
                format!("--receiver-key-min-generation {spec:?}: not a generation number")
            })?;
            min_generation.insert(receiver.to_owned(), generation);
        }
        let refusals = Refusals::register(
            metrics,
            "gateway_messages_refused",
            "Messages from receivers refused: unsigned, forged, revoked key, stale, replayed, or not from the receiver they concern",
        );
        Ok(Provenance {
            secret,
            min_generation,
            current: Mutex::default(),
            freshness: Freshness::new(config.message_window_ms),
            refusals,
        })
    }

    pub fn is_signed(&self) -> bool {
        self.secret.is_some()
    }

    /// `body` as it goes to `receiver` on `topic`: sealed in the receiver's
    /// current key, or as it is when unsigned.
    pub fn seal_for(&self, receiver: &str, topic: &str, body: Vec<u8>) -> Vec<u8> {
        let Some(secret) = &self.secret else { return body };
        let generation = self.generation_of(receiver);
        seal_now(&receiver_key(secret, receiver, generation), generation, FROM_GATEWAY, topic, &body)
    }

    fn generation_of(&self, receiver: &str) -> u32 {
        let known = self.current.lock().expect("generations lock").get(receiver).copied();
        known.unwrap_or_else(|| self.min_generation(receiver))
    }

    fn min_generation(&self, receiver: &str) -> u32 {
        self.min_generation.get(receiver).copied().unwrap_or(1)
    }

    /// Checks a message from a receiver received on `topic`: signature,
    /// key generation, freshness (`ignore_age`: a last will, signed when its
    /// connection was made, is checked for replay but not for age).
    /// `message` names the kind for the refusal count. A refusal is counted
    /// and logged here.
    pub fn open<'a>(
        &self,
        message: &str,
        topic: &str,
        payload: &'a [u8],
        ignore_age: impl FnOnce(&[u8]) -> bool,
    ) -> Option<Verified<'a>> {
        let Some(secret) = &self.secret else { return Some(Verified { from: None, body: payload }) };
        match self.verify(secret, topic, payload, ignore_age) {
            Ok(v) => Some(v),
            Err(e) => {
                self.refuse(message, e.reason(), topic, &e);
                None
            }
        }
    }

    fn verify<'a>(
        &self,
        secret: &[u8],
        topic: &str,
        payload: &'a [u8],
        ignore_age: impl FnOnce(&[u8]) -> bool,
    ) -> Result<Verified<'a>, SealError> {
        let opened = protocol::seal::open(payload)?;
        if opened.from == FROM_GATEWAY {
            return Err(SealError::WrongSender { from: opened.from, expected: "a receiver".into() });
        }
        let min = self.min_generation(&opened.from);
        if opened.gen < min {
            return Err(SealError::RevokedKey { from: opened.from, gen: opened.gen, min });
        }
        opened.verify(&receiver_key(secret, &opened.from, opened.gen), topic)?;
        self.freshness.check(opened.ts, opened.nonce(), ignore_age(opened.body))?;
        self.current.lock().expect("generations lock").insert(opened.from.clone(), opened.gen);
        Ok(Verified { from: Some(opened.from), body: opened.body })
    }

    /// Counts and logs (rate-limited) a refused message.
    pub fn refuse(&self, message: &str, reason: &str, topic: &str, why: &dyn std::fmt::Display) {
        self.refusals.refuse(message, reason, topic, why);
    }

    /// Counts and logs a message naming a receiver id that is not one (bad
    /// characters, too long): the id is logged escaped and cut to 80 characters.
    pub fn refuse_invalid_receiver(&self, message: &str, topic: &str, receiver: &str) {
        let shown: String = receiver.chars().take(80).collect();
        let why = format!(
            "receiver id {shown:?} ({} bytes) is not a valid id (the device id rules)",
            receiver.len()
        );
        self.refuse(message, "invalid", topic, &why);
    }

    /// Refusals so far (tests, `/metrics` has them too).
    pub fn refused(&self, message: &str, reason: &str) -> u64 {
        self.refusals.get(message, reason)
    }
}

/// Whether a message that claims to come from `claimed` may: signed by that
/// receiver, or unsigned (then nobody vouches, `--insecure`).
pub fn sent_by(verified: &Verified<'_>, claimed: &str) -> bool {
    verified.from.as_deref().is_none_or(|from| from == claimed)
}
