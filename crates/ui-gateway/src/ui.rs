//! The web UI: the bundle built from `ui/` (TypeScript, Preact, Tailwind, D3; `npm --prefix ui
//! run build` writes `src/ui/dist` and `src/ui/bundle.stamp`, both committed, and `cargo xtask
//! tidy` fails when the stamp does not match the sources), embedded in the binary by `build.rs`
//! and served with its cache and security headers.

use axum::{
    body::Body,
    http::{HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};

include!(concat!(env!("OUT_DIR"), "/ui_bundle.rs"));

/// What the app may do: its own scripts, styles, images and API, nothing inline, never framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; font-src 'self'; manifest-src 'self'; worker-src 'self'; \
                       object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What any other response may do: nothing (JSON is not a document), never framed.
pub const CSP_API: &str = "default-src 'none'; frame-ancestors 'none'";

/// The embedded file for a URL path (`/` is the page).
pub fn file(path: &str) -> Option<&'static [u8]> {
    let path = if path == "/" { "/index.html" } else { path };
    FILES.binary_search_by(|(p, _)| p.cmp(&path)).ok().map(|i| FILES[i].1)
}

pub fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("webmanifest") => "application/manifest+json",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        Some("json") => "application/json",
        _ => "text/html; charset=utf-8",
    }
}

/// Hashed assets never change: immutable for a year. The page, the service worker and the
/// manifest are revalidated on every load, so a new build is seen at once.
pub fn cache_control(path: &str) -> &'static str {
    if path.starts_with("/assets/") { "public, max-age=31536000, immutable" } else { "no-cache" }
}

/// Serves `path` from the bundle, or `None` when the bundle has no such file.
pub fn serve(method: &Method, path: &str) -> Option<Response> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let bytes = file(path)?;
    let mut r = (StatusCode::OK, Body::from(bytes)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path)));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_control(path)));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    if path == "/sw.js" {
        // The worker controls the whole origin, not only its folder.
        h.insert("service-worker-allowed", HeaderValue::from_static("/"));
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page, its manifest, icon and service worker are in the bundle, and every asset the
    /// page references is too.
    #[test]
    fn the_bundle_is_whole() {
        let index = std::str::from_utf8(file("/").expect("index.html")).unwrap();
        for f in ["/sw.js", "/manifest.webmanifest", "/icon.svg"] {
            assert!(file(f).is_some(), "{f} is missing");
        }
        let assets: Vec<&str> = index.split('"').filter(|s| s.starts_with("/assets/")).collect::<Vec<_>>();
        assert!(assets.iter().any(|a| a.ends_with(".js")) && assets.iter().any(|a| a.ends_with(".css")), "{index}");
        for a in assets {
            assert!(file(a).is_some(), "{a} is referenced by index.html but not embedded");
        }
        assert!(!index.contains("<script>") && !index.contains("<style"), "inline code would break the CSP");
        assert!(FILES.windows(2).all(|w| w[0].0 < w[1].0), "FILES is sorted");
    }

    #[test]
    fn headers_by_path() {
        assert_eq!(cache_control("/assets/index-abc.js"), "public, max-age=31536000, immutable");
        assert_eq!(cache_control("/index.html"), "no-cache");
        assert_eq!(cache_control("/sw.js"), "no-cache");
        assert_eq!(content_type("/assets/a.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("/manifest.webmanifest"), "application/manifest+json");
        assert!(serve(&Method::POST, "/").is_none());
        assert!(serve(&Method::GET, "/nope").is_none());
        assert_eq!(serve(&Method::GET, "/").unwrap().status(), StatusCode::OK);
    }
}
