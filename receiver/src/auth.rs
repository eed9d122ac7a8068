//! Who may connect as a device over TCP (PROTOCOL.md §5.9): with a fleet
//! secret, every HELLO is answered with a CHALLENGE and the device must
//! prove its key in an AUTH frame before it is registered (and so before it
//! can take over an existing connection of the same id); without one,
//! only by explicit opt-in (`--allow-unauthenticated-devices` or
//! `--insecure`), any HELLO is believed, as before. Also the TLS acceptor
//! of the device listener. Serial lines and Modbus buses are wired to the
//! receiver and are not authenticated.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use protocol::device_auth::{FleetSecret, NONCE_LEN};
use protocol::DeviceId;
use rand::RngCore;

use crate::Config;

/// How device connections prove who they are.
#[derive(Debug, Clone)]
pub enum DeviceAuth {
    /// Challenge–response with keys derived from this fleet secret.
    Required(FleetSecret),
    /// Any HELLO is believed (explicit opt-in).
    Open,
}

impl DeviceAuth {
    /// From the settings: the secret (flag, environment or file) if given,
    /// unless `--allow-unauthenticated-devices`; no secret is an error
    /// naming the flags unless unauthenticated devices were opted into
    /// (that flag, or `--insecure`).
    pub fn from_config(config: &Config) -> anyhow::Result<DeviceAuth> {
        let secret = match (&config.device_key_secret, &config.device_key_secret_file) {
            (Some(secret), _) => Some(secret.clone()),
            (None, Some(path)) => Some(read_secret(path)?),
            (None, None) => None,
        };
        match secret {
            _ if config.allow_unauthenticated_devices => Ok(DeviceAuth::Open),
            Some(secret) => Ok(DeviceAuth::Required(secret)),
            None if config.insecure => Ok(DeviceAuth::Open),
            None => anyhow::bail!(
                "devices cannot authenticate: set --device-key-secret or --device-key-secret-file \
                 (RECEIVER_DEVICE_KEY_SECRET[_FILE], the fleet secret the gateway issues device keys from), \
                 or --allow-unauthenticated-devices to accept any device that says HELLO"
            ),
        }
    }

    /// A fresh random nonce for a CHALLENGE.
    pub fn nonce() -> [u8; NONCE_LEN] {
        let mut nonce = [0; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        nonce
    }
}

/// The fleet secret in a file (hex or base64, whitespace around it ignored).
fn read_secret(path: &Path) -> anyhow::Result<FleetSecret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --device-key-secret-file {}", path.display()))?;
    FleetSecret::parse(&text).map_err(|e| anyhow::anyhow!("--device-key-secret-file {}: {e}", path.display()))
}

/// The TLS acceptor for `--tls-cert`/`--tls-key` (PEM: the certificate
/// chain, leaf first; a PKCS#8, PKCS#1 or SEC1 private key).
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "--tls-cert {}: no certificate in it", cert.display());
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Warnings about refused or closed device connections: at most one line
/// per second each, saying how many were not logged since (`plumbing::throttle`).
pub type RateLimited = plumbing::throttle::Throttle;

/// The period of the receiver's [`RateLimited`] warnings.
pub const LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a device connection was refused (logged, never with a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no AUTH frame after the CHALLENGE")]
    NoAuth,
    #[error("the AUTH proof does not match key generation {0}")]
    BadProof(u32),
    #[error("key generation 0 does not exist")]
    GenerationZero,
    #[error("key generation {offered} is older than the one ({current}) of the device's current connection")]
    OlderGeneration { offered: u32, current: u32 },
}

/// Logs a refused device connection, rate-limited.
pub fn log_refusal(limit: &RateLimited, device_id: &DeviceId, peer: std::net::SocketAddr, why: &Refusal) {
    limit.log(|suppressed| {
        tracing::warn!(%device_id, %peer, reason = %why, suppressed, "device connection refused: authentication failed (the device's current connection, if any, is kept)")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_secret_the_receiver_starts_only_when_told_to_accept_anyone() {
        let mut config = Config::new("mqtt://127.0.0.1:1".into(), "127.0.0.1:0".parse().unwrap());
        assert!(matches!(DeviceAuth::from_config(&config), Ok(DeviceAuth::Open)), "insecure");
        config.insecure = false;
        let error = DeviceAuth::from_config(&config).unwrap_err().to_string();
        assert!(
            error.contains("--device-key-secret") && error.contains("--allow-unauthenticated-devices"),
            "{error}"
        );
        config.allow_unauthenticated_devices = true;
        assert!(matches!(DeviceAuth::from_config(&config), Ok(DeviceAuth::Open)));
        config.allow_unauthenticated_devices = false;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{}\n", "5a".repeat(32))).unwrap();
        config.device_key_secret_file = Some(file);
        assert!(matches!(DeviceAuth::from_config(&config), Ok(DeviceAuth::Required(_))));
        config.device_key_secret_file = Some(dir.path().join("missing"));
        assert!(DeviceAuth::from_config(&config)
            .unwrap_err()
            .to_string()
            .contains("--device-key-secret-file"));
    }
}
