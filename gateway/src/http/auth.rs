//! Who may call what: each routed operation's [`Access`] in [`ACCESS`], the
//! API key check (`Authorization: Bearer gk_…`, 401/403) and, for writes,
//! `Content-Type: application/json` (415) — both before any handler runs, so
//! a refused request stores nothing. Keys are verified against the store,
//! with a short cache ([`KEY_CACHE_TTL`]). Command submissions are then
//! rate-limited per key ([`SUBMIT`], `--submit-rate-per-key`): 429
//! `rate_limited` with `Retry-After`.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use lru::LruCache;

use crate::api_key::{Presented, Scope};
use crate::app::App;
use crate::config::Config;
use crate::error::{ApiError, ErrorKind};
use crate::store::ApiKey;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, no key (health, the API document, metrics, the console's files).
    Open,
    /// A key with any one of these scopes.
    AnyOf(&'static [Scope]),
}

use Scope::{CommandsRead, CommandsWrite, DevicesAdmin};

/// Every routed operation (method, path template as in `router()`) and what
/// it needs. A route missing here needs `devices:admin` ([`UNLISTED`]), so a
/// route added without a line is closed rather than open; the OpenAPI test
/// checks that this table and `router()` list the same operations.
///
/// `GET /v1/devices[/{id}]` is allowed to readers of commands (a dashboard
/// shows a command's device) and to device admins. `/metrics` is open: it
/// holds only process-wide counters, no ids or payloads, and Prometheus
/// scrapes without credentials by default. The console's files (`/`,
/// `/console…`) are open: they hold no data, the page asks for a key and
/// sends it with each API call it makes.
pub const ACCESS: &[(&str, &str, Access)] = &[
    ("GET", "/v1/devices", Access::AnyOf(&[CommandsRead, DevicesAdmin])),
    ("GET", "/v1/devices/{device_id}", Access::AnyOf(&[CommandsRead, DevicesAdmin])),
    ("PUT", "/v1/devices/{device_id}", Access::AnyOf(&[DevicesAdmin])),
    ("POST", "/v1/devices/{device_id}/key", Access::AnyOf(&[DevicesAdmin])),
    ("POST", "/v1/devices/{device_id}/commands", Access::AnyOf(&[CommandsWrite])),
    ("GET", "/v1/commands", Access::AnyOf(&[CommandsRead])),
    ("GET", "/v1/commands/summary", Access::AnyOf(&[CommandsRead])),
    ("GET", "/v1/commands/{id}", Access::AnyOf(&[CommandsRead])),
    ("GET", "/v1/commands/{id}/events", Access::AnyOf(&[CommandsRead])),
    ("POST", "/v1/commands/{id}/cancel", Access::AnyOf(&[CommandsWrite])),
    ("GET", "/openapi.json", Access::Open),
    ("GET", "/healthz", Access::Open),
    ("GET", "/readyz", Access::Open),
    ("GET", "/metrics", Access::Open),
    ("GET", "/", Access::Open),
    ("GET", "/console", Access::Open),
    ("GET", "/console/console.js", Access::Open),
    ("GET", "/console/console.css", Access::Open),
];

/// The operation whose calls count against a key's rate (`--submit-rate-per-key`).
pub const SUBMIT: (&str, &str) = ("POST", "/v1/devices/{device_id}/commands");

/// What an operation missing from [`ACCESS`] needs.
pub const UNLISTED: Access = Access::AnyOf(&[DevicesAdmin]);

/// The access rule of an operation, and whether it is listed. `HEAD` is
/// its route's `GET` (axum answers it with the `GET` handler).
pub fn access(method: &Method, template: &str) -> (Access, bool) {
    let method = if method == Method::HEAD { "GET" } else { method.as_str() };
    match ACCESS.iter().find(|(m, t, _)| *m == method && *t == template) {
        Some((_, _, access)) => (*access, true),
        None => (UNLISTED, false),
    }
}

/// How long a key read from the store is used before it is read again: a
/// revocation (or a new scope list) takes effect within this time on every
/// gateway instance.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Keys held in the cache at most (least recently used go first).
const KEY_CACHE_SIZE: usize = 1024;

/// The key check's state: whether keys are required, and the cache of keys
/// read from the store.
#[derive(Debug)]
pub(super) struct Auth {
    required: bool,
    /// Keys read from the store with when they were read. A std mutex: held
    /// only for a lookup or an insert, never across an `.await`.
    cache: Mutex<LruCache<String, (ApiKey, Instant)>>,
    /// Submissions per key id: a token bucket each (governor's GCRA). Only
    /// authenticated key ids get a bucket, so it holds at most one per key
    /// in the store. `None` without a rate (0) or without keys.
    submit_rate: Option<DefaultKeyedRateLimiter<String>>,
}

impl Auth {
    pub(super) fn new(config: &Config) -> Auth {
        let size = NonZeroUsize::new(KEY_CACHE_SIZE).unwrap_or(NonZeroUsize::MIN);
        let required = config.api_keys_required();
        let submit_rate = NonZeroU32::new(config.submit_rate_per_key).filter(|_| required).map(|rate| {
            let burst = NonZeroU32::new(config.submit_burst_per_key).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Auth { required, cache: Mutex::new(LruCache::new(size)), submit_rate }
    }

    /// A submission by key `id`: `Ok` within its rate, else 429 with the wait.
    fn check_rate(&self, app: &App, id: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.submit_rate else { return Ok(()) };
        let Err(not_until) = limiter.check_key(&id.to_owned()) else { return Ok(()) };
        app.metrics().submit_rate_limited.inc();
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let (rate, burst) = (app.config().submit_rate_per_key, app.config().submit_burst_per_key);
        let message = format!(
            "API key {id} is over its submission rate (--submit-rate-per-key {rate}/s, burst {burst}); \
             nothing was stored, try again after the wait"
        );
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        Err(ApiError::new(ErrorKind::RateLimited, message).retry_after(ms))
    }

    /// The id and scopes of the key in `headers`, or 401.
    async fn authenticate(&self, app: &App, headers: &HeaderMap) -> Result<(String, Vec<Scope>), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("an API key is required: send Authorization: Bearer <key>"));
        };
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .and_then(|(_, key)| Presented::parse(key.trim()))
            .ok_or_else(|| {
                unauthorized("malformed Authorization header: expected Bearer gk_<id>_<secret>")
            })?;
        let key = self.key(app, presented.id).await?;
        match key {
            Some(key) if presented.matches(&key.key_hash) => match key.revoked_at {
                None => Ok((key.id, key.scopes)),
                Some(_) => Err(unauthorized(format!("API key {} is revoked", key.id))),
            },
            _ => Err(unauthorized("unknown API key")),
        }
    }

    /// The key with this id: from the cache while fresh, else from the store.
    async fn key(&self, app: &App, id: &str) -> Result<Option<ApiKey>, ApiError> {
        if let Some((key, read)) = self.cache.lock().unwrap().get(id) {
            if read.elapsed() < KEY_CACHE_TTL {
                return Ok(Some(key.clone()));
            }
        }
        let key = app.store().get_api_key(id).await?;
        // Unknown ids are not cached: a flood of made-up ids cannot evict real keys.
        if let Some(key) = &key {
            self.cache.lock().unwrap().put(id.to_owned(), (key.clone(), Instant::now()));
        }
        Ok(key)
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Unauthorized, message)
}

/// The route layer: the key check (unless `--insecure`), then the content
/// type of a write. Runs after routing (it needs the route's template) and
/// before the handler; a method the route lacks never gets here (axum's
/// 405 fallback is not layered), so an operation missing from [`ACCESS`]
/// is a routed one whose line was forgotten: it needs [`UNLISTED`].
pub(super) async fn guard(
    State((app, auth)): State<(App, Arc<Auth>)>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let template = matched.as_ref().map_or("", MatchedPath::as_str);
    let (rule, _) = access(req.method(), template);
    if auth.required {
        if let Access::AnyOf(needed) = rule {
            let (id, scopes) = match auth.authenticate(&app, req.headers()).await {
                Ok(found) => found,
                Err(e) => return e.into_response(),
            };
            if !needed.iter().any(|s| scopes.contains(s)) {
                return forbidden(needed, req.method(), template).into_response();
            }
            if (req.method().as_str(), template) == SUBMIT {
                if let Err(e) = auth.check_rate(&app, &id) {
                    return e.into_response();
                }
            }
        }
    }
    if is_write(req.method()) {
        if let Err(e) = require_json(req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

fn forbidden(needed: &[Scope], method: &Method, template: &str) -> ApiError {
    let names: Vec<&str> = needed.iter().map(|s| s.as_str()).collect();
    let what = match names.as_slice() {
        [one] => format!("scope {one}"),
        many => format!("one of the scopes {}", many.join(", ")),
    };
    ApiError::new(ErrorKind::Forbidden, format!("this API key lacks {what}, needed for {method} {template}"))
}

/// Methods that change something: they must say their body is JSON.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// `Content-Type: application/json` (or `application/*+json`, parameters
/// allowed), else 415. This is what keeps a web page from writing: a browser
/// sends a cross-origin POST without asking first (CORS "simple" request)
/// only with `text/plain`, form or multipart bodies — and this server grants
/// no CORS preflight.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok());
    let is_json = mime.is_some_and(|m| {
        m.type_() == mime::APPLICATION
            && (m.subtype() == mime::JSON || m.suffix().is_some_and(|s| s == mime::JSON))
    });
    if is_json {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::UnsupportedMediaType,
        "a write needs Content-Type: application/json (even with an empty body)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            require_json(&h).is_ok()
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(with("application/merge-patch+json"));
        for bad in
            ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "json"]
        {
            assert!(!with(bad), "{bad}");
        }
        assert!(require_json(&HeaderMap::new()).is_err());
    }

    #[test]
    fn unlisted_operations_need_the_admin_scope() {
        assert_eq!(access(&Method::GET, "/healthz"), (Access::Open, true));
        assert_eq!(access(&Method::HEAD, "/healthz"), (Access::Open, true));
        assert_eq!(access(&Method::HEAD, "/v1/commands"), access(&Method::GET, "/v1/commands"));
        assert_eq!(
            access(&Method::PUT, "/v1/devices/{device_id}/key"),
            (Access::AnyOf(&[DevicesAdmin]), false)
        );
        assert_eq!(access(&Method::DELETE, "/v1/devices/{device_id}").0, UNLISTED);
    }

    #[test]
    fn forbidden_names_the_scope() {
        let e = forbidden(&[CommandsWrite], &Method::POST, "/v1/commands/{id}/cancel");
        assert_eq!(e.kind, ErrorKind::Forbidden);
        assert!(e.message.contains("commands:write"), "{}", e.message);
    }
}
