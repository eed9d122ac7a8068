//! The console: one HTML page, its script and its style sheet, embedded in
//! the binary (gateway/console/), served without a key. The page itself
//! calls the public JSON API with the key its user enters; nothing here
//! reads the store. Every answer carries a Content-Security-Policy that
//! allows only this origin's own script, style and API (no inline script,
//! no other host), so the page works offline and an id or label that
//! slipped into the markup could not run.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};

const PAGE: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// The policy of every console answer: this origin's own files and API
/// only, no inline script or style, no framing, no form posts, no plugins.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: to the console.
pub(super) async fn root() -> Redirect {
    Redirect::to("/console")
}

/// `GET /console`: the page.
pub(super) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /console/console.js`.
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/console.css`.
pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        // The files change with the binary: revalidate rather than keep an old script.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads its script and style from files (the policy forbids
    /// inline ones) and never from another host.
    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_other_host() {
        assert!(PAGE.contains(r#"<script src="/console/console.js"></script>"#));
        assert!(PAGE.contains(r#"<link rel="stylesheet" href="/console/console.css">"#));
        assert_eq!(PAGE.matches("<script").count(), 1);
        // The one URL in the script is SVG's namespace name, never fetched.
        let script = SCRIPT.replace(r#""http://www.w3.org/2000/svg""#, "");
        for text in [PAGE, &script, STYLE] {
            for banned in ["http://", "https://", "<style", " style=", " onclick=", " onload="] {
                assert!(!text.contains(banned), "{banned}");
            }
        }
        assert!(!SCRIPT.contains(".innerHTML"), "data goes in as text only");
    }
}
