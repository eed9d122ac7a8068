//! `gateway token create|list|revoke`: HTTP API keys in the gateway's
//! database (migrated first, as `gateway serve` does). A key is printed once,
//! by `create`; only its hash is stored (`crate::api_key`).

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::api_key::{NewKey, Scope};
use crate::command::{now_ms, rfc3339};
use crate::http::auth::KEY_CACHE_TTL;
use crate::store::{ApiKey, Revoked, Store};

/// `gateway token …`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Database: `sqlite:PATH` or `mysql://USER:PASS@HOST:PORT/DB` (the gateway's).
    #[arg(long, env = "GATEWAY_DATABASE_URL", default_value = "sqlite:gateway.db", global = true)]
    pub database_url: String,

    #[command(subcommand)]
    pub command: TokenCmd,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an API key and print it on stdout — the only time it is shown.
    Create {
        /// Who or what uses the key (shown by `list`).
        #[arg(long)]
        name: String,
        /// A scope to grant: commands:write, commands:read, devices:admin
        /// (repeat the flag, or separate with commas).
        #[arg(long = "scope", required = true, value_delimiter = ',', value_parser = Scope::parse)]
        scopes: Vec<Scope>,
    },
    /// List the keys (never their secrets): id, name, scopes, created, revoked.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id: every gateway refuses it within 5 s.
    Revoke {
        /// The key's id (the 16 hex digits after `gk_`; `list` shows them).
        id: String,
    },
}

/// Runs one `token` command; what it prints goes to `out` (stdout), notes to stderr.
pub async fn run(args: TokenArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let store = Store::connect(&args.database_url).await?;
    let done = match args.command {
        TokenCmd::Create { name, scopes } => create(&store, name, scopes, out).await,
        TokenCmd::List { json } => list(&store, json, out).await,
        TokenCmd::Revoke { id } => revoke(&store, &id, out).await,
    };
    store.close().await;
    done
}

async fn create(store: &Store, name: String, scopes: Vec<Scope>, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(!name.trim().is_empty() && name.len() <= 255, "--name must be 1 to 255 bytes");
    loop {
        let new = NewKey::generate();
        let key = ApiKey {
            id: new.id.clone(),
            name: name.clone(),
            key_hash: new.hash.clone(),
            scopes: scopes.clone(),
            created_at: now_ms(),
            revoked_at: None,
        };
        // A 64-bit random id taken already: draw another.
        if store.insert_api_key(&key).await? {
            writeln!(out, "{}", new.text())?;
            let scopes = crate::api_key::scopes_text(&scopes);
            eprintln!(
                "created API key {} ({name}) with {scopes}; it is not shown again: store it now",
                key.id
            );
            return Ok(());
        }
    }
}

async fn list(store: &Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let keys = store.list_api_keys().await?;
    let scopes = |k: &ApiKey| k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>();
    if as_json {
        let items: Vec<Value> = keys
            .iter()
            .map(|k| {
                json!({"id": k.id, "name": k.name, "scopes": scopes(k),
                       "created_at": rfc3339(k.created_at), "revoked_at": k.revoked_at.map(rfc3339)})
            })
            .collect();
        writeln!(out, "{}", Value::Array(items))?;
        return Ok(());
    }
    let rows: Vec<[String; 5]> = keys
        .iter()
        .map(|k| {
            let revoked = k.revoked_at.map_or_else(|| "-".to_owned(), rfc3339);
            [k.id.clone(), k.name.clone(), scopes(k).join(","), rfc3339(k.created_at), revoked]
        })
        .collect();
    let header = ["ID", "NAME", "SCOPES", "CREATED", "REVOKED"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:w$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

async fn revoke(store: &Store, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    match store.revoke_api_key(id, now_ms()).await? {
        Revoked::Now => writeln!(
            out,
            "revoked API key {id}; gateways refuse it within {} s (their key cache)",
            KEY_CACHE_TTL.as_secs()
        )?,
        Revoked::Already(at) => writeln!(out, "API key {id} was revoked already, at {}", rfc3339(at))?,
        Revoked::Unknown => anyhow::bail!("no API key {id:?} (`gateway token list` shows them)"),
    }
    Ok(())
}
