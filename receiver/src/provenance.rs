//! Signed messages on the receiver's side (PROTOCOL 4.7). With a key
//! (`--receiver-key`, from `gateway receiver-key <id>`), everything this
//! receiver publishes is sealed under it (`protocol::seal`), and commands and
//! cancels are taken only if a gateway sealed them under it — fresh, never
//! twice; the rest is counted (`receiver_messages_refused_total`) and
//! dropped. Without a key (`--insecure` only) messages travel unsigned.

use anyhow::{bail, Context};
use plumbing::metrics::Metrics;
use plumbing::seal::{read_secret, seal_now, Freshness, Refusals};
use protocol::seal::{Key, SealError, FROM_GATEWAY};

use crate::Config;

/// This receiver's keys and replay memory.
#[derive(Debug)]
pub struct Provenance {
    receiver_id: String,
    /// `(generation, key)` it signs with; `None`: unsigned.
    current: Option<(u32, Key)>,
    /// The key of the generation before, still accepted from gateways (a
    /// rotation: gateways switch to the new key once they hear this receiver use it).
    previous: Option<(u32, Key)>,
    freshness: Freshness,
    refusals: Refusals,
}

impl Provenance {
    /// From the configuration; an error names what is missing or wrong.
    pub fn from_config(config: &Config, metrics: &Metrics) -> anyhow::Result<Provenance> {
        let key = read_secret(config.receiver_key.as_ref(), config.receiver_key_file.as_deref())?
            .map(|s| Key::parse(s.expose()))
            .transpose()
            .context("--receiver-key / RECEIVER_KEY / --receiver-key-file")?;
        if key.is_none() && !config.insecure {
            bail!(
                "no receiver key: set RECEIVER_KEY or --receiver-key-file to the key `gateway receiver-key {}` prints, or run with --insecure (unsigned messages, docs/SECURITY.md)",
                config.receiver_id
            );
        }
        let generation = config.receiver_key_generation;
        let previous = match (&config.receiver_previous_key, generation) {
            (Some(_), 0 | 1) => bail!("--receiver-previous-key needs --receiver-key-generation 2 or more"),
            (Some(k), g) => Some((g - 1, Key::parse(k.expose()).context("--receiver-previous-key")?)),
            (None, _) => None,
        };
        Ok(Provenance {
            receiver_id: config.receiver_id.clone(),
            current: key.map(|k| (generation, k)),
            previous,
            freshness: Freshness::new(config.message_window_ms),
            refusals: Refusals::register(
                metrics,
                "receiver_messages_refused",
                "Commands and cancels refused: unsigned, forged, another key, stale or replayed",
            ),
        })
    }

    /// `body` as this receiver publishes it on `topic`: sealed, or as it is unsigned.
    pub fn seal(&self, topic: &str, body: Vec<u8>) -> Vec<u8> {
        match &self.current {
            Some((generation, key)) => seal_now(key, *generation, &self.receiver_id, topic, &body),
            None => body,
        }
    }

    /// The message inside `payload` if a gateway sealed it for `topic` under
    /// this receiver's key (current or previous generation), fresh; else
    /// `None`, counted under `message`.
    pub fn open<'a>(&self, message: &str, topic: &str, payload: &'a [u8]) -> Option<&'a [u8]> {
        if self.current.is_none() {
            return Some(payload);
        }
        match self.verify(topic, payload) {
            Ok(body) => Some(body),
            Err(e) => {
                self.refusals.refuse(message, e.reason(), topic, &e);
                None
            }
        }
    }

    fn verify<'a>(&self, topic: &str, payload: &'a [u8]) -> Result<&'a [u8], SealError> {
        let opened = protocol::seal::open(payload)?;
        if opened.from != FROM_GATEWAY {
            return Err(SealError::WrongSender { from: opened.from, expected: FROM_GATEWAY.into() });
        }
        let key = [&self.current, &self.previous]
            .into_iter()
            .flatten()
            .find(|(generation, _)| *generation == opened.gen)
            .map(|(_, key)| key)
            .ok_or(SealError::UnknownGeneration(opened.gen))?;
        opened.verify(key, topic)?;
        self.freshness.check(opened.ts, opened.nonce(), false)?;
        Ok(opened.body)
    }

    /// Refusals so far of `message` for `reason` (tests; `/metrics` has them).
    pub fn refused(&self, message: &str, reason: &str) -> u64 {
        self.refusals.get(message, reason)
    }
}
