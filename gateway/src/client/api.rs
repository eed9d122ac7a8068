//! Requests to the gateway's HTTP API: where it is (`--url`), the API key
//! (sent as `Authorization: Bearer`, never printed), TLS trust (`--ca-file`),
//! and the sorting of what can go wrong into [`ClientError`]s that each
//! have an exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, Url};
use serde_json::Value;

use super::outcome::Exit;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may take beyond what the request asks the gateway to
/// hold it (a long-poll's or sync call's wait).
const ANSWER_GRACE: Duration = Duration::from_secs(30);

/// Where the gateway is and how to talk to it; every client subcommand takes
/// these, before or after its own arguments.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Base URL of the gateway's HTTP API (http:// or https://).
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// API key (`gk_…`, from `gateway token create`). Prefer the environment
    /// variable or --api-key-file to a flag other users can see in `ps`.
    #[arg(
        long,
        env = "GATEWAY_API_KEY",
        hide_env_values = true,
        global = true,
        value_parser = plumbing::cli::SecretParser::<ApiKey>::new()
    )]
    pub api_key: Option<ApiKey>,
    /// A file holding the API key (a trailing newline is ignored).
    #[arg(long, env = "GATEWAY_API_KEY_FILE", global = true)]
    pub api_key_file: Option<PathBuf>,
    /// Trust only the CA certificate(s) in this PEM file for an https:// URL
    /// (default: the system's trusted roots).
    #[arg(long, env = "GATEWAY_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON document as it came, instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// An API key: visible ASCII, what an `Authorization` header can carry.
/// Its `Debug` hides it.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::str::FromStr for ApiKey {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<ApiKey, Self::Err> {
        match s.trim_end_matches(['\n', '\r']) {
            "" => Err("the API key is empty"),
            key if key.bytes().all(|b| b.is_ascii_graphic()) => Ok(ApiKey(key.to_owned())),
            _ => Err("an API key has only visible ASCII characters"),
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// What went wrong, each kind with its exit code ([`ClientError::exit`]).
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientError {
    /// Bad input given to the client itself.
    #[error("{0}")]
    Usage(String),
    /// No answer: refused, unresolvable, TLS failure, or too slow.
    #[error("cannot reach the gateway at {url}: {why}")]
    Connect { url: String, why: String },
    /// The gateway answered with an HTTP error; its `error.kind` and `message`.
    #[error("{message} (HTTP {status}, {kind})")]
    Http { status: u16, kind: String, message: String },
    /// An answer that is not what the API documents.
    #[error("unexpected answer from the gateway: {0}")]
    BadAnswer(String),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    pub(super) fn bad_answer(what: &str) -> ClientError {
        ClientError::BadAnswer(what.to_owned())
    }

    pub(super) fn exit(&self) -> Exit {
        match self {
            ClientError::Usage(_) => Exit::Usage,
            ClientError::Connect { .. } => Exit::Unreachable,
            ClientError::Http { .. } | ClientError::BadAnswer(_) => Exit::HttpError,
            ClientError::Io(_) | ClientError::Other(_) => Exit::Error,
        }
    }
}

/// A successful answer: its body as sent, and that body parsed.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) json: Value,
}

/// A client of one gateway.
#[derive(Debug)]
pub(super) struct Api {
    http: reqwest::Client,
    base: Url,
}

impl Api {
    /// Checks the connection settings (URL, key, CA file) and builds the client.
    pub(super) fn new(connection: &Connection) -> Result<Api, ClientError> {
        let base = Url::parse(&connection.url)
            .map_err(|e| ClientError::Usage(format!("--url {:?}: {e}", connection.url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Usage(format!(
                "--url {:?}: not an http:// or https:// URL",
                connection.url
            )));
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key(connection)? {
            let mut value = HeaderValue::try_from(format!("Bearer {}", key.0))
                .map_err(|_| ClientError::Usage("the API key cannot be sent in a header".into()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("gateway-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &connection.ca_file {
            builder = builder.tls_built_in_root_certs(false);
            for cert in ca_certificates(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http =
            builder.build().map_err(|e| ClientError::Other(format!("building the HTTP client: {e}")))?;
        Ok(Api { http, base })
    }

    /// `GET` the path made of `segments` (each percent-encoded) with `query`.
    pub(super) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Answer, ClientError> {
        self.call(Method::GET, segments, query, None, None).await
    }

    pub(super) async fn put(&self, segments: &[&str], body: &Value) -> Result<Answer, ClientError> {
        self.call(Method::PUT, segments, &[], Some(body), None).await
    }

    /// `POST` a JSON body; `hold` is how long the gateway may keep the call
    /// open on purpose (a sync wait), added to the answer timeout.
    pub(super) async fn post(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        body: &Value,
        hold: Option<Duration>,
    ) -> Result<Answer, ClientError> {
        self.call(Method::POST, segments, query, Some(body), hold).await
    }

    /// One request; an HTTP error status becomes [`ClientError::Http`] with
    /// the API's error message.
    pub(super) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        hold: Option<Duration>,
    ) -> Result<Answer, ClientError> {
        let url = self.url(segments, query);
        let mut request =
            self.http.request(method, url.clone()).timeout(hold.unwrap_or_default() + ANSWER_GRACE);
        if let Some(body) = body {
            request =
                request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
        }
        let response = request.send().await.map_err(|e| unreachable(&url, &e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| unreachable(&url, &e))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status >= 400 {
            return Err(http_error(status, json.as_ref(), &text));
        }
        let json =
            json.ok_or_else(|| ClientError::BadAnswer(format!("HTTP {status} without a JSON body")))?;
        Ok(Answer { text, json })
    }

    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in Api::new").pop_if_empty().extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }
}

/// The key from --api-key / GATEWAY_API_KEY or --api-key-file, not both.
fn api_key(connection: &Connection) -> Result<Option<ApiKey>, ClientError> {
    match (&connection.api_key, &connection.api_key_file) {
        (Some(_), Some(_)) => Err(ClientError::Usage(
            "both an API key (--api-key or GATEWAY_API_KEY) and --api-key-file (or GATEWAY_API_KEY_FILE): give one"
                .into(),
        )),
        (Some(key), None) => Ok(Some(key.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ClientError::Usage(format!("--api-key-file {}: {e}", path.display())))?;
            let key = text.parse().map_err(|e| ClientError::Usage(format!("--api-key-file {}: {e}", path.display())))?;
            Ok(Some(key))
        }
        (None, None) => Ok(None),
    }
}

/// The certificates of a PEM file (at least one).
fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ClientError> {
    let refuse = |why: String| ClientError::Usage(format!("--ca-file {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| refuse(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| refuse(e.to_string()))?;
    if certs.is_empty() {
        return Err(refuse("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// A request that got no HTTP answer, with the causes that say why
/// (reqwest's own message only names the URL).
fn unreachable(url: &Url, e: &reqwest::Error) -> ClientError {
    let mut why = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(cause) = source {
        why.push(cause.to_string());
        source = cause.source();
    }
    if e.is_timeout() {
        why.insert(0, "no answer in time".into());
    }
    if why.is_empty() {
        why.push(e.to_string());
    }
    why.dedup();
    let mut origin = url.clone();
    origin.set_path("");
    origin.set_query(None);
    ClientError::Connect { url: origin.as_str().trim_end_matches('/').to_owned(), why: why.join(": ") }
}

/// The API's `{"error": {"kind", "message", "retry_after_ms"?}}`, or the
/// body's text when it is not that.
fn http_error(status: u16, json: Option<&Value>, text: &str) -> ClientError {
    let error = json.map(|j| &j["error"]);
    let field = |name: &str| error.and_then(|e| e[name].as_str()).map(str::to_owned);
    let kind = field("kind").unwrap_or_else(|| "unknown".into());
    let mut message = field("message").unwrap_or_else(|| match text.trim() {
        "" => "no message".to_owned(),
        text => text.chars().take(500).collect(),
    });
    if let Some(ms) = error.and_then(|e| e["retry_after_ms"].as_u64()) {
        message.push_str(&format!("; retry after {ms} ms"));
    }
    ClientError::Http { status, kind, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_api_key_is_visible_ascii_and_never_shown() {
        let key: ApiKey = "gk_abc_DEF\n".parse().unwrap();
        assert_eq!(key.0, "gk_abc_DEF");
        assert_eq!(format!("{key:?}"), "ApiKey(…)");
        assert!("".parse::<ApiKey>().is_err());
        assert!("gk abc".parse::<ApiKey>().is_err());
        assert!("gk_ä".parse::<ApiKey>().is_err());
    }

    #[test]
    fn an_http_error_carries_the_api_message() {
        let body = json!({"error": {"kind": "rate_limited", "message": "slow down", "retry_after_ms": 250}});
        let e = http_error(429, Some(&body), "");
        assert_eq!(e.to_string(), "slow down; retry after 250 ms (HTTP 429, rate_limited)");
        assert_eq!(e.exit(), Exit::HttpError);
        let e = http_error(502, None, "Bad Gateway\n");
        assert_eq!(e.to_string(), "Bad Gateway (HTTP 502, unknown)");
    }

    #[test]
    fn path_segments_are_encoded_under_the_base_path() {
        let connection = |url: &str| Connection {
            url: url.into(),
            api_key: None,
            api_key_file: None,
            ca_file: None,
            json: false,
        };
        let api = Api::new(&connection("https://gw.example/prefix/")).unwrap();
        let url = api.url(&["v1", "devices", "a/b c"], &[("after", "x&y".into())]);
        assert_eq!(url.as_str(), "https://gw.example/prefix/v1/devices/a%2Fb%20c?after=x%26y");
        let api = Api::new(&connection("http://127.0.0.1:8080")).unwrap();
        assert_eq!(api.url(&["v1", "commands"], &[]).as_str(), "http://127.0.0.1:8080/v1/commands");
        for bad in ["ftp://x", "127.0.0.1:8080", "mailto:x@y"] {
            let e = Api::new(&connection(bad)).unwrap_err();
            assert_eq!(e.exit(), Exit::Usage, "{bad}: {e}");
        }
    }
}
