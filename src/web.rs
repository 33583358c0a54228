//! The web client's assets (`web/`), embedded in the binary with `include_str!` and served at
//! `/` (the page) and `/web/{file}` (its scripts and style sheet; vendored modules at
//! `/web/vendor/{file}`), each with its Content-Type and `Cache-Control: no-cache`. There is no
//! build step at runtime: the files are plain ES modules and CSS, so what is in `web/` is
//! exactly what the browser runs (web/vendor/yjs.mjs is bundled ahead of time from npm by
//! scripts/vendor-yjs and committed).

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every asset: its name under `/web/`, its Content-Type and its bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", HTML, include_str!("../web/index.html")),
    ("app.js", JS, include_str!("../web/app.js")),
    ("studyhall.js", JS, include_str!("../web/studyhall.js")),
    ("calls.js", JS, include_str!("../web/calls.js")),
    ("engagement.js", JS, include_str!("../web/engagement.js")),
    ("classroom.js", JS, include_str!("../web/classroom.js")),
    ("charts.js", JS, include_str!("../web/charts.js")),
    ("board.js", JS, include_str!("../web/board.js")),
    // Yjs and the y-protocols encoders as one module, built by scripts/vendor-yjs.
    ("vendor/yjs.mjs", JS, include_str!("../web/vendor/yjs.mjs")),
    ("style.css", CSS, include_str!("../web/style.css")),
];

/// The page loads only its own scripts, styles and connections (the WebSocket included),
/// shows media from the camera and peers, and may not be framed by another site.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self'; \
object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(name: &str) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, body)) => (
            [
                (header::CONTENT_TYPE, *ctype),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            *body,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"code":"not_found","message":"no such endpoint"}"#,
        )
            .into_response(),
    }
}

/// The web client's routes: `/` and `/index.html` serve the page, `/web/{file}` and
/// `/web/vendor/{file}` the assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route("/index.html", get(|| async { asset("index.html") }))
        .route(
            "/web/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
        .route(
            "/web/vendor/{file}",
            get(|Path(file): Path<String>| async move { asset(&format!("vendor/{file}")) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_found_and_typed() {
        for (name, ctype, body) in FILES {
            let r = asset(name);
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *ctype);
            assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
            let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap();
            assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"));
            assert!(!body.is_empty());
        }
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        assert_eq!(asset("nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(asset("yjs.mjs").status(), StatusCode::NOT_FOUND);
        assert_eq!(asset("vendor/../app.js").status(), StatusCode::NOT_FOUND);
    }
}
