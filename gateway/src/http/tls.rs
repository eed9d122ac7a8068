//! TLS for the HTTP listener (rustls, ring provider): the certificate and key
//! from `--http-tls-cert`/`--http-tls-key`, and the rule that keeps API keys
//! off the network in clear text.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// The TLS settings of the HTTP listener: `None` without the flags; an error
/// naming the file when one flag is given without the other, or a file is
/// missing, holds no PEM certificate (key), or the key does not fit the
/// certificate.
pub fn server_config(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (cert, key) = match (&config.http_tls_cert, &config.http_tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => anyhow::bail!("--http-tls-cert and --http-tls-key go together: give both, or neither"),
    };
    let chain = load_chain(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--http-tls-key {}: no PEM private key read: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("--http-tls-cert {} with --http-tls-key", cert.display()))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

fn load_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let what = || format!("--http-tls-cert {}", path.display());
    let chain = CertificateDer::pem_file_iter(path)
        .with_context(what)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(what)?;
    anyhow::ensure!(!chain.is_empty(), "{}: no PEM certificate in it", what());
    Ok(chain)
}

/// Refuses clear-text HTTP on a non-loopback address unless `--insecure`:
/// API keys sent so would cross the network readable by anyone on the path.
pub fn check_exposure(config: &Config, tls: bool) -> anyhow::Result<()> {
    let addr = config.http_listen;
    if tls || config.insecure || addr.ip().is_loopback() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve HTTP without TLS on {addr}: API keys would cross the network in clear text. \
         Give --http-tls-cert and --http-tls-key, or listen on a loopback address \
         (--http-listen 127.0.0.1:{}, e.g. behind a TLS-terminating proxy), or pass --insecure (demo only)",
        addr.port()
    )
}
