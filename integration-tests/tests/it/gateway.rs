//! The ui-gateway as a real process in front of real information-unit and registry services
//! and a real nats-server: the HTTP API (units, byte ranges, tags, links, components, status,
//! OpenAPI), the auth matrix with tokens from `cimctl token`, bad input that writes nothing,
//! CORS, rate limits, live events over SSE with resume by `Last-Event-ID`, and the gRPC API
//! through its generated client, with server reflection and the health service; pipelines and
//! runs in front of a real plugin-host and pipeline-engine; and the web UI end to end in
//! headless Chromium driven over WebDriver (chromedriver).

use std::time::Duration;

use anyhow::{Context, Result};
use cim_events::{Component, iu, resources, subject};
use cim_testkit::eventually;
use futures::StreamExt;
use serde_json::Value;

use crate::common::{ServiceProc, bin, is_event_of};
use crate::fixture::{CimFixture, Svc};

/// A leaf: nats-server, information-unit, registry and the gateway on a free port (and, for
/// pipelines, plugin-host and pipeline-engine).
struct Gateway {
    fx: CimFixture,
    base: String,
    grpc: String,
    http: reqwest::Client,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Gateway {
    async fn start(extra: &[&str]) -> Result<Gateway> {
        Self::start_with(extra, &[]).await
    }

    /// Also starts `others` before the gateway.
    async fn start_with(extra: &[&str], others: &[Component]) -> Result<Gateway> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let grpc = format!("127.0.0.1:{}", free_port()?);
        let fx = CimFixture::builder()
            .service(Component::InformationUnit)
            .service(Component::Registry)
            .services(others.iter().copied())
            .service(
                Svc::new(Component::UiGateway)
                    .args(&["--gateway-listen", listen.as_str(), "--gateway-grpc-listen", grpc.as_str()])
                    .args(extra),
            )
            .start()
            .await?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        Ok(Gateway { fx, base: format!("http://{listen}"), grpc: format!("http://{grpc}"), http })
    }

    fn gw(&self) -> &ServiceProc {
        self.fx.service(Component::UiGateway)
    }

    async fn token(&self, name: &str, role: &str) -> Result<(String, String)> {
        self.fx.token(name, role).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, token: &str, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(self.url(path)).bearer_auth(token).send().await?;
        let status = r.status().as_u16();
        Ok((status, serde_json::from_slice(&r.bytes().await?).unwrap_or(Value::Null)))
    }

    async fn post(&self, token: &str, path: &str, body: impl Into<reqwest::Body>) -> Result<(u16, Value)> {
        let r = self.http.post(self.url(path)).bearer_auth(token).body(body).send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
        ))
    }

    async fn send(
        &self,
        method: &str,
        token: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(u16, Value)> {
        let r = self.http.request(method.parse()?, self.url(path)).bearer_auth(token).body(body).send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
        ))
    }

    /// Events in the pipeline engine's stream: what "nothing written" is for definitions.
    async fn pipeline_events(&self) -> Result<u64> {
        let js = self.fx.js();
        let mut events = js.get_stream(resources::events_stream(Component::PipelineEngine).name).await?;
        Ok(events.info().await?.state.messages)
    }

    /// Waits until run `id` is in `state`.
    async fn wait_run(&self, token: &str, id: &str, state: &str) -> Result<Value> {
        eventually(Duration::from_secs(60), &format!("run {id} {state}"), || async {
            let (s, run) = self.get(token, &format!("/api/v1/runs/{id}")).await?;
            anyhow::ensure!(s == 200 && run["state"] == state, "{s} {run}");
            Ok(run)
        })
        .await
    }

    /// Number of objects in the content bucket and events in the iu stream: what "nothing
    /// written" is checked against.
    async fn written(&self) -> Result<(u64, u64)> {
        let js = self.fx.js();
        let mut objects = js.get_stream(resources::object_buckets(Component::InformationUnit)[0].stream_name()).await?;
        let mut events = js.get_stream(resources::events_stream(Component::InformationUnit).name).await?;
        Ok((objects.info().await?.state.messages, events.info().await?.state.messages))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_units_api_round_trip_with_ranges_links_and_system_views() -> Result<()> {
    let g = Gateway::start(&[]).await?;
    let (_, writer) = g.token("ci-writer", "writer").await?;
    let (_, admin) = g.token("ci-admin", "admin").await?;

    // The OpenAPI document is public and names the routes.
    let r = g.http.get(g.url("/api/openapi.json")).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await?;
    assert!(doc["paths"]["/api/v1/units/{id}/content"].is_object(), "{doc}");

    let (s, me) = g.get(&writer, "/api/v1/whoami").await?;
    assert_eq!((s, me["role"].as_str()), (200, Some("writer")));

    // Upload (streamed body) creates a unit.
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (s, created) = g
        .post(&writer, "/api/v1/units?name=data.bin&tags=demo,ci&media_type=application/octet-stream", content.clone())
        .await?;
    assert_eq!(s, 201, "{created}");
    let id = created["unit_id"].as_str().context("unit_id")?.to_string();
    let (s, second) = g.post(&writer, "/api/v1/units?name=notes.txt", "see data.bin").await?;
    assert_eq!(s, 201, "{second}");
    let id2 = second["unit_id"].as_str().context("unit_id")?.to_string();

    // Get, list with filters.
    let (s, unit) = g.get(&writer, &format!("/api/v1/units/{id}")).await?;
    assert_eq!(s, 200);
    assert_eq!(unit["name"], "data.bin");
    assert_eq!(unit["size"], content.len() as u64);
    let (s, list) = eventually(Duration::from_secs(10), "both units listed", || async {
        let (s, list) = g.get(&writer, "/api/v1/units").await?;
        anyhow::ensure!(list["units"].as_array().map(Vec::len) == Some(2), "{list}");
        Ok((s, list))
    })
    .await?;
    assert_eq!(s, 200, "{list}");
    let (_, tagged) = g.get(&writer, "/api/v1/units?tag=demo").await?;
    assert_eq!(tagged["units"].as_array().unwrap().len(), 1, "{tagged}");
    let (_, prefixed) = g.get(&writer, "/api/v1/units?name_prefix=notes").await?;
    assert_eq!(prefixed["units"][0]["unit_id"], id2.as_str());

    // Download, whole and by byte ranges.
    let r = g.http.get(g.url(&format!("/api/v1/units/{id}/content"))).bearer_auth(&writer).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await?.as_ref(), content.as_slice());
    let r = g
        .http
        .get(g.url(&format!("/api/v1/units/{id}/content")))
        .bearer_auth(&writer)
        .header("Range", "bytes=1000-1999")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 1000-1999/{}", content.len()).as_str());
    assert_eq!(r.bytes().await?.as_ref(), &content[1000..2000]);
    let r = g
        .http
        .get(g.url(&format!("/api/v1/units/{id}/content")))
        .bearer_auth(&writer)
        .header("Range", "bytes=-10")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes().await?.as_ref(), &content[content.len() - 10..]);
    let r = g
        .http
        .get(g.url(&format!("/api/v1/units/{id}/content")))
        .bearer_auth(&writer)
        .header("Range", "bytes=999999999-")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 416);

    // Tag, link, history, links, a new version.
    let (s, t) = g.post(&writer, &format!("/api/v1/units/{id}/tags"), r#"{"tags":["reviewed"]}"#).await?;
    assert_eq!(s, 200, "{t}");
    let (s, l) = g
        .post(&writer, &format!("/api/v1/units/{id2}/links"), format!(r#"{{"kind":"cites","target":"{id}"}}"#))
        .await?;
    assert_eq!(s, 200, "{l}");
    let (_, links) = g.get(&writer, &format!("/api/v1/units/{id}/links")).await?;
    assert_eq!(links["incoming"][0]["source"], id2.as_str(), "{links}");
    assert_eq!(links["incoming"][0]["kind"], "cites");
    let (s, v) = g.post(&writer, &format!("/api/v1/units/{id2}/versions"), "see data.bin, v2").await?;
    assert_eq!(s, 201, "{v}");
    let (_, unit2) = g.get(&writer, &format!("/api/v1/units/{id2}")).await?;
    assert_eq!(unit2["versions"].as_array().unwrap().len(), 2, "{unit2}");
    let r = g.http.get(g.url(&format!("/api/v1/units/{id2}/content"))).bearer_auth(&writer).send().await?;
    assert_eq!(r.text().await?, "see data.bin, v2");
    let (_, history) = g.get(&writer, &format!("/api/v1/units/{id}/history")).await?;
    let entries = history["entries"].as_array().context("entries")?;
    assert!(entries.len() >= 2, "{history}");
    assert!(entries[0]["provenance"]["correlation_id"].as_str().is_some_and(|c| !c.is_empty()), "{history}");
    let (_, unit) = g.get(&writer, &format!("/api/v1/units/{id}")).await?;
    assert!(unit["tags"].as_array().unwrap().iter().any(|t| t == "reviewed"), "{unit}");
    let (s, missing) = g.get(&writer, "/api/v1/units/does-not-exist").await?;
    assert_eq!(s, 404, "{missing}");

    // Components (reader and up), nodes and status (admin), plugins (no plugin host: 503).
    eventually(Duration::from_secs(20), "components listed", || async {
        let (s, c) = g.get(&writer, "/api/v1/components").await?;
        anyhow::ensure!(s == 200, "{s} {c}");
        let services: Vec<&str> =
            c["instances"].as_array().unwrap().iter().filter_map(|i| i["service"].as_str()).collect();
        anyhow::ensure!(services.contains(&"information-unit") && services.contains(&"ui-gateway"), "{c}");
        Ok(())
    })
    .await?;
    let (s, st) = g.get(&admin, "/api/v1/status").await?;
    assert_eq!(s, 200, "{st}");
    assert!(st["instances"].as_array().is_some_and(|i| !i.is_empty()), "{st}");
    let (s, nodes) = g.get(&admin, "/api/v1/nodes").await?;
    assert_eq!(s, 200, "{nodes}");
    let (s, p) = g.get(&writer, "/api/v1/plugins").await?;
    assert_eq!(s, 503, "{p}");
    assert!(p["error"].as_str().unwrap().contains("plugin host"), "{p}");
    // No pipeline engine either: 503 naming it.
    let (s, p) = g.get(&writer, "/api/v1/pipelines").await?;
    assert_eq!(s, 503, "{p}");
    assert!(p["error"].as_str().unwrap().contains("pipeline engine"), "{p}");
    let (s, p) = g.get(&writer, "/api/v1/runs").await?;
    assert_eq!(s, 503, "{p}");

    // The web UI is served from the binary: the page revalidated on every load, hashed assets
    // immutable, the CSP the app passes, no sniffing, no framing.
    let r = g.http.get(g.url("/")).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let h = r.headers().clone();
    let header =
        |h: &reqwest::header::HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(header(&h, "cache-control"), "no-cache");
    assert!(header(&h, "content-type").starts_with("text/html"));
    assert_eq!(header(&h, "x-content-type-options"), "nosniff");
    assert_eq!(header(&h, "x-frame-options"), "DENY");
    let csp = header(&h, "content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    let page = r.text().await?;
    assert!(page.contains("<title>CIM</title>") && page.contains("/manifest.webmanifest"), "{page}");
    let script = page.split('"').find(|s| s.starts_with("/assets/") && s.ends_with(".js")).context("script")?;
    let r = g.http.get(g.url(script)).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(r.headers(), "cache-control"), "public, max-age=31536000, immutable");
    assert!(header(r.headers(), "content-type").starts_with("text/javascript"));
    for (path, kind) in [("/sw.js", "text/javascript"), ("/manifest.webmanifest", "application/manifest+json")] {
        let r = g.http.get(g.url(path)).send().await?;
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(header(r.headers(), "content-type").starts_with(kind), "{path}");
        assert_eq!(header(r.headers(), "cache-control"), "no-cache", "{path}");
    }
    // Every error is JSON, also those axum's extractors answer (here: a path that is not UTF-8)
    // and unknown files; API responses carry the hardening headers too.
    for (path, status) in [("/api/v1/units/%FF", 400), ("/nope.js", 404), ("/api/v1/nope", 404)] {
        let (s, e) = g.get(&writer, path).await?;
        assert_eq!(s, status, "{path}: {e}");
        assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()) && e["status"] == status, "{path}: {e}");
    }
    let r = g.http.get(g.url("/api/v1/whoami")).bearer_auth(&writer).send().await?;
    assert_eq!(header(r.headers(), "x-content-type-options"), "nosniff");
    assert_eq!(header(r.headers(), "content-security-policy"), "default-src 'none'; frame-ancestors 'none'");

    // HTTP requests on the runtime's /metrics: count and latency by route, errors by route and status.
    let i = g.fx.services().iter().position(|p| p.component == Component::UiGateway).context("gateway")?;
    let http_addr = g.fx.wait_ready(i).await?.service.context("service")?.http_addr;
    let metrics = cim_testkit::http_get(&http_addr, "/metrics").await?.text();
    for (metric, endpoint) in [
        ("cim_requests_total{", "http GET /api/v1/units/{id}"),
        ("cim_request_duration_seconds_count{", "http POST /api/v1/units"),
        ("cim_request_errors_total{", "http GET /api/v1/units/{id} 400"),
        ("cim_request_errors_total{", "http GET (other) 404"),
    ] {
        let label = format!("endpoint=\"{endpoint}\"");
        assert!(
            metrics.lines().any(|l| l.starts_with(metric) && l.contains(&label)),
            "no {metric}{label} in\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_auth_matrix_bad_input_cors_and_rate_limits() -> Result<()> {
    let g = Gateway::start(&[
        "--gateway-max-upload",
        "100000",
        "--gateway-max-json",
        "1024",
        "--gateway-rate-limit",
        "5",
        "--gateway-cors-origins",
        "http://ui.example",
    ])
    .await?;
    let (_, reader) = g.token("r", "reader").await?;
    let (writer_id, writer) = g.token("w", "writer").await?;
    let (_, admin) = g.token("a", "admin").await?;
    let (s, created) = g.post(&writer, "/api/v1/units?name=keep.txt", "kept").await?;
    assert_eq!(s, 201, "{created}");
    let id = created["unit_id"].as_str().unwrap().to_string();

    // Authentication.
    let r = g.http.get(g.url("/api/v1/units")).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert!(r.text().await?.contains("missing api token"));
    for bad in ["nonsense", "cimt_0000000000000000_ffff", &format!("{writer}x")] {
        let (s, e) = g.get(bad, "/api/v1/units").await?;
        assert_eq!(s, 401, "{bad}: {e}");
        assert_eq!(e["error"], "invalid or revoked api token");
    }

    // Roles: every (role, route) pair.
    let matrix: [(&str, &str, &str, [u16; 3]); 6] = [
        ("GET", "/api/v1/units", "", [200, 200, 200]),
        ("GET", "/api/v1/components", "", [200, 200, 200]),
        ("POST", "/api/v1/units?name=x.txt", "x", [403, 201, 201]),
        ("POST", &format!("/api/v1/units/{id}/tags"), r#"{"tags":["t"]}"#, [403, 200, 200]),
        ("GET", "/api/v1/status", "", [403, 403, 200]),
        ("GET", "/api/v1/nodes", "", [403, 403, 200]),
    ];
    for (method, path, body, expected) in matrix {
        for (token, want) in [&reader, &writer, &admin].into_iter().zip(expected) {
            let req = g.http.request(method.parse()?, g.url(path)).bearer_auth(token).body(body.to_string());
            let r = req.send().await?;
            let status = r.status().as_u16();
            let text = r.text().await?;
            assert_eq!(status, want, "{method} {path}: {text}");
            if status == 403 {
                assert!(text.contains("needs"), "{text}");
            }
        }
    }
    let before = g.written().await?;

    // Bad input: each one a clear 4xx, nothing written.
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        ("POST", format!("/api/v1/units/{id}/tags"), b"{not json".to_vec(), 400, "malformed json"),
        ("POST", format!("/api/v1/units/{id}/tags"), br#"{"tags":"t"}"#.to_vec(), 400, "array of strings"),
        (
            "POST",
            format!("/api/v1/units/{id}/tags"),
            format!(r#"{{"tags":["{}"]}}"#, "x".repeat(2000)).into_bytes(),
            413,
            "larger than 1024",
        ),
        (
            "POST",
            format!("/api/v1/units/{id}/links"),
            br#"{"kind":"cites","target":"../../etc"}"#.to_vec(),
            400,
            "unit id",
        ),
        ("POST", "/api/v1/units?name=big.bin".to_string(), vec![0u8; 200_000], 413, "larger than the limit"),
        ("POST", "/api/v1/units?name=..%2Fetc%2Fpasswd".to_string(), b"x".to_vec(), 400, "path separator"),
        ("POST", "/api/v1/units?name=..".to_string(), b"x".to_vec(), 400, "path traversal"),
        ("POST", "/api/v1/units?name=bad%0Aname".to_string(), b"x".to_vec(), 400, "control character"),
        ("POST", "/api/v1/units".to_string(), b"x".to_vec(), 400, "name is required"),
        ("GET", "/api/v1/units/a.b".to_string(), vec![], 400, "unit id"),
        ("GET", "/api/v1/nope".to_string(), vec![], 404, "no route GET /api/v1/nope"),
        ("DELETE", "/api/v1/units".to_string(), vec![], 405, "not allowed"),
        (
            "GET",
            format!("/api/v1/events?component=iu&filter={}", subject::events_of(Component::Registry)),
            vec![],
            400,
            "must be a subject under",
        ),
    ];
    for (method, path, body, want, message) in cases {
        // Each request with its own writer token, so the rate limit does not interfere.
        let (_, token) = g.token("bad-input", "writer").await?;
        let r = g.http.request(method.parse()?, g.url(&path)).bearer_auth(&token).body(body).send().await?;
        let status = r.status().as_u16();
        let v: Value =
            serde_json::from_slice(&r.bytes().await?).with_context(|| format!("{method} {path}: json error body"))?;
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains(message)), "{method} {path}: {v}");
    }
    // An oversized upload streamed without Content-Length is cut off too.
    let (_, token) = g.token("chunked", "writer").await?;
    let chunks = futures::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![1u8; 8192])));
    let r = g
        .http
        .post(g.url("/api/v1/units?name=chunked.bin"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 413);
    // Nothing was written: no new event, and the partial uploads were deleted (their chunks
    // are purged; the object store's stream may keep delete markers, so compare events and
    // check no object but the kept one is listed).
    eventually(Duration::from_secs(10), "nothing written by bad input", || async {
        let now = g.written().await?;
        anyhow::ensure!(now.1 == before.1, "events before {before:?}, now {now:?}");
        let js = g.fx.js();
        let store = js.get_object_store(iu::CONTENT_BUCKET).await?;
        let mut list = store.list().await?;
        let mut live = Vec::new();
        while let Some(o) = list.next().await {
            let o = o?;
            if !o.deleted {
                live.push(o.name);
            }
        }
        anyhow::ensure!(live.iter().all(|n| !n.starts_with(iu::UPLOAD_PREFIX)), "leftover uploads {live:?}");
        Ok(())
    })
    .await?;

    // Revocation takes effect within a second, although the gateway reads tokens from memory.
    let (s, e) = g.get(&writer, "/api/v1/units").await?;
    assert_eq!(s, 200, "{e}");
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["token", "--nats-url", g.fx.url(), "revoke", &writer_id])
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually!(Duration::from_secs(1), "the revoked token refused", {
        let (s, e) = g.get(&writer, "/api/v1/units").await?;
        anyhow::ensure!(s == 401, "{s} {e}");
        Ok(())
    })?;
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["token", "--nats-url", g.fx.url(), "--json", "ls"])
        .output()
        .await?;
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    assert!(listed.as_array().unwrap().iter().all(|t| t["id"] != writer_id.as_str()), "{listed}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("cimt_"), "ls never shows tokens");
    let out = tokio::process::Command::new(bin("cimctl"))
        .args(["token", "--nats-url", g.fx.url(), "create", "--name", "x", "--role", "root"])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role"));

    // CORS: an allowed origin gets a preflight answer and the headers; another does not.
    let r = g
        .http
        .request(reqwest::Method::OPTIONS, g.url("/api/v1/units"))
        .header("Origin", "http://ui.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "http://ui.example");
    let r = g
        .http
        .request(reqwest::Method::OPTIONS, g.url("/api/v1/units"))
        .header("Origin", "http://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    let r =
        g.http.get(g.url("/api/v1/units")).bearer_auth(&reader).header("Origin", "http://evil.example").send().await?;
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    // Rate limit: 5/s with bursts of 10 per token; another token is unaffected.
    let (_, hasty) = g.token("hasty", "reader").await?;
    let mut limited = None;
    for _ in 0..30 {
        let r = g.http.get(g.url("/api/v1/whoami")).bearer_auth(&hasty).send().await?;
        if r.status().as_u16() == 429 {
            limited = Some((r.headers().get("retry-after").cloned(), r.text().await?));
            break;
        }
    }
    let (retry, text) = limited.context("no 429 within 30 requests at 5/s")?;
    assert!(retry.is_some());
    assert!(text.contains("rate limit"), "{text}");
    let (s, _) = g.get(&admin, "/api/v1/whoami").await?;
    assert_eq!(s, 200);
    assert!(g.gw().log().contains("gateway api listening"));
    Ok(())
}

/// Reads SSE frames from `resp` until `n` events arrived; returns (id, data) pairs.
async fn sse_events(resp: &mut reqwest::Response, n: usize) -> Result<Vec<(u64, Value)>> {
    let mut buf = String::new();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while out.len() < n {
            let chunk = resp.chunk().await?.context("event stream ended")?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, None);
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str::<Value>(v.trim()).ok();
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    out.push((id, data));
                }
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("waiting for events")??;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_live_events_resume_after_reconnect() -> Result<()> {
    let g = Gateway::start(&[]).await?;
    let (_, reader) = g.token("tail", "reader").await?;
    let (_, writer) = g.token("w", "writer").await?;

    let mut live = g.http.get(g.url("/api/v1/events?component=iu")).bearer_auth(&reader).send().await?;
    assert_eq!(live.status().as_u16(), 200);
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let (s, a) = g.post(&writer, "/api/v1/units?name=one.txt", "1").await?;
    assert_eq!(s, 201, "{a}");
    // Its content is stored, then the unit created: two events.
    let got = sse_events(&mut live, 2).await?;
    let (last_id, created) = got[1].clone();
    assert!(is_event_of(got[0].1["subject"].as_str().unwrap(), Component::InformationUnit, iu::CONTENT), "{got:?}");
    assert!(created["subject"].as_str().unwrap().ends_with(".created"), "{created}");
    assert!(!created["type"].as_str().unwrap().is_empty(), "{created}");
    assert_eq!(got[0].0 + 1, last_id);
    drop(live);

    // Missed while disconnected: two more units.
    g.post(&writer, "/api/v1/units?name=two.txt", "2").await?;
    g.post(&writer, "/api/v1/units?name=three.txt", "3").await?;

    let mut resumed = g
        .http
        .get(g.url("/api/v1/events?component=iu"))
        .bearer_auth(&reader)
        .header("Last-Event-ID", last_id.to_string())
        .send()
        .await?;
    let got = sse_events(&mut resumed, 4).await?;
    assert_eq!(got[0].0, last_id + 1, "resumes right after the last event seen");
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1), "no gaps: {got:?}");
    let created = got.iter().filter(|(_, d)| d["subject"].as_str().unwrap().ends_with(".created")).count();
    assert_eq!(created, 2, "{got:?}");

    // A filter narrows the stream; `?after=0` replays from the start.
    let mut filtered = g
        .http
        .get(g.url(&format!(
            "/api/v1/events?component=iu&after=0&filter={}",
            subject::action_filter(Component::InformationUnit, iu::UNIT, iu::action::CREATED)?
        )))
        .bearer_auth(&reader)
        .send()
        .await?;
    let got = sse_events(&mut filtered, 3).await?;
    assert!(got.iter().all(|(_, d)| d["subject"].as_str().unwrap().ends_with(".created")));
    Ok(())
}

/// Pipelines and runs through the gateway, in front of a real plugin-host and pipeline-engine:
/// the shipped example applied over HTTP (admin only), triggered by an upload, its run and
/// steps, live run events over SSE, refused definitions that write nothing, manual runs, and
/// cancel/retry refused (409) where the run's state does not allow them.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_pipelines_and_runs_over_the_engine() -> Result<()> {
    use cim_events::pipeline as pl;
    let g = Gateway::start_with(&[], &[Component::PluginHost, Component::PipelineEngine]).await?;
    let (_, reader) = g.token("pl-reader", "reader").await?;
    let (_, writer) = g.token("pl-writer", "writer").await?;
    let (_, admin) = g.token("pl-admin", "admin").await?;
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/text-ingest.json"),
    )?;

    // Applying a definition is configuration: readers and writers are refused, nothing written.
    for token in [&reader, &writer] {
        let (s, e) = g.post(token, "/api/v1/pipelines", example.clone()).await?;
        assert_eq!(s, 403, "{e}");
        assert!(e["error"].as_str().unwrap().contains("needs admin"), "{e}");
    }
    assert_eq!(g.pipeline_events().await?, 0);
    let (s, applied) = g.post(&admin, "/api/v1/pipelines", example.clone()).await?;
    assert_eq!(s, 201, "{applied}");
    assert_eq!(
        (applied["name"].as_str(), applied["version"].as_u64(), applied["unchanged"].as_bool()),
        (Some("text-ingest"), Some(1), Some(false))
    );
    let (s, again) = g.post(&admin, "/api/v1/pipelines", example.clone()).await?;
    assert_eq!((s, again["unchanged"].as_bool()), (200, Some(true)), "{again}");
    let (s, list) = g.get(&reader, "/api/v1/pipelines").await?;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["pipelines"][0]["name"], "text-ingest", "{list}");
    let (s, one) = g.get(&reader, "/api/v1/pipelines/text-ingest").await?;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["definition"]["trigger"]["on"], "unit.created", "{one}");
    assert_eq!(one["active"], true);

    // Refused definitions: the engine's message, 400, and nothing written.
    let written = g.pipeline_events().await?;
    let bad: [(&str, &str); 5] = [
        (r#"{"name":"bad","trigger":{"on":"unit.exploded"},"steps":[{"id":"t","tag":["x"]}]}"#, "unit.exploded"),
        (
            r#"{"name":"bad","trigger":{"on":"manual"},"steps":[{"id":"p","plugin":"no-such-plugin@9.9.9"}]}"#,
            "unknown plugin",
        ),
        (r#"{"name":"bad","trigger":{"on":"manual"},"steps":[{"id":"t","tag":["x"]}],"surprise":1}"#, "surprise"),
        ("{not json", "malformed json"),
        ("[1,2]", "json object"),
    ];
    for (body, message) in bad {
        let (s, e) = g.post(&admin, "/api/v1/pipelines", body).await?;
        assert_eq!(s, 400, "{body}: {e}");
        assert!(e["error"].as_str().is_some_and(|m| m.contains(message)), "{body}: {e}");
    }
    let (s, e) = g.get(&reader, "/api/v1/pipelines/bad").await?;
    assert_eq!(s, 404, "{e}");
    assert_eq!(g.pipeline_events().await?, written, "refused definitions wrote nothing");

    // An uploaded text unit triggers a run that completes with its five steps.
    let (s, created) = g.post(&writer, "/api/v1/units?name=notes.txt", "First line\r\nsecond line  \n").await?;
    assert_eq!(s, 201, "{created}");
    let unit = created["unit_id"].as_str().context("unit_id")?.to_string();
    let (_, u) = g.get(&reader, &format!("/api/v1/units/{unit}")).await?;
    assert!(u["media_type"].as_str().unwrap().starts_with("text/plain"), "{u}");
    let run = eventually(Duration::from_secs(60), "a completed text-ingest run", || async {
        let (s, runs) = g.get(&reader, "/api/v1/runs?pipeline=text-ingest").await?;
        anyhow::ensure!(s == 200, "{s} {runs}");
        let run = runs["runs"].as_array().unwrap().iter().find(|r| r["state"] == "completed").cloned();
        run.with_context(|| format!("{runs}"))
    })
    .await?;
    let id = run["run_id"].as_str().context("run_id")?.to_string();
    assert_eq!(run["unit_id"], unit.as_str(), "{run}");
    let (s, detail) = g.get(&reader, &format!("/api/v1/runs/{id}")).await?;
    assert_eq!(s, 200, "{detail}");
    let steps: Vec<(&str, &str)> = detail["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("normalize", "completed"),
            ("classify", "completed"),
            ("tag", "completed"),
            ("label", "completed"),
            ("summary", "completed")
        ],
        "{detail}"
    );
    let (_, filtered) = g.get(&reader, &format!("/api/v1/runs?state=completed&unit_id={unit}&limit=5")).await?;
    assert!(filtered["runs"].as_array().unwrap().iter().any(|r| r["run_id"] == id.as_str()), "{filtered}");
    let (_, counts) = g.get(&reader, "/api/v1/pipelines/text-ingest").await?;
    assert_eq!(counts["runs"]["completed"], 1, "{counts}");

    // The run's events are live events of component=pipeline.
    let mut live = g
        .http
        .get(g.url("/api/v1/events"))
        .query(&[("component", "pipeline"), ("after", "0"), ("filter", &pl::run_action(pl::action::COMPLETED)?)])
        .bearer_auth(&reader)
        .send()
        .await?;
    assert_eq!(live.status().as_u16(), 200);
    let got = sse_events(&mut live, 1).await?;
    assert_eq!(got[0].1["subject"], pl::run_event(&id, pl::action::COMPLETED)?.as_str(), "{got:?}");
    drop(live);

    // Bad queries and unknown runs.
    for (path, want) in [
        ("/api/v1/runs/0190a0a0-0000-7000-8000-000000000000".to_string(), 404),
        ("/api/v1/runs/a.b".to_string(), 400),
        ("/api/v1/runs?state=exploded".to_string(), 400),
        ("/api/v1/runs?limit=many".to_string(), 400),
        ("/api/v1/runs?pipeline=Not_A_Name".to_string(), 400),
        ("/api/v1/pipelines/Not_A_Name".to_string(), 400),
    ] {
        let (s, e) = g.get(&reader, &path).await?;
        assert_eq!(s, want, "{path}: {e}");
        assert!(e["error"].is_string(), "{path}: {e}");
    }

    // A manual run about the unit: writers may start one, readers may not.
    let body = format!(r#"{{"unit_id":"{unit}","params":{{"why":"test"}}}}"#);
    let (s, e) = g.post(&reader, "/api/v1/pipelines/text-ingest/runs", body.clone()).await?;
    assert_eq!(s, 403, "{e}");
    let (s, started) = g.post(&writer, "/api/v1/pipelines/text-ingest/runs", body).await?;
    assert_eq!(s, 201, "{started}");
    let manual = started["run_id"].as_str().context("run_id")?.to_string();
    let done = g.wait_run(&reader, &manual, "completed").await?;
    assert_eq!((done["trigger"].as_str(), done["params"]["why"].as_str()), (Some("manual"), Some("test")), "{done}");
    // An ended run cannot be cancelled, a completed one not retried.
    let (s, e) = g.post(&writer, &format!("/api/v1/runs/{manual}/cancel"), "").await?;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("completed"), "{e}");
    let (s, e) = g.post(&writer, &format!("/api/v1/runs/{manual}/retry"), "").await?;
    assert_eq!(s, 409, "{e}");
    let (s, e) = g.post(&reader, &format!("/api/v1/runs/{manual}/retry"), "").await?;
    assert_eq!(s, 403, "{e}");
    let (s, e) = g.post(&writer, "/api/v1/runs/0190a0a0-0000-7000-8000-000000000000/cancel", "").await?;
    assert_eq!(s, 404, "{e}");

    // A manual run without a unit fails (the first step reads unit.content); it can be retried,
    // not cancelled.
    let (s, started) = g.post(&writer, "/api/v1/pipelines/text-ingest/runs", "").await?;
    assert_eq!(s, 201, "{started}");
    let unitless = started["run_id"].as_str().context("run_id")?.to_string();
    let failed = g.wait_run(&reader, &unitless, "failed").await?;
    assert!(failed["error"].as_str().unwrap().contains("unit.content"), "{failed}");
    // Its work item is a dead letter, with the reason, for readers too.
    let letter = eventually(Duration::from_secs(30), "the run's dead letter", || async {
        let (s, d) = g.get(&reader, "/api/v1/dead-letters?component=pipeline").await?;
        anyhow::ensure!(s == 200, "{d}");
        d["dead_letters"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["reason"].as_str().is_some_and(|r| r.contains(&unitless))).cloned())
            .with_context(|| format!("no dead letter of {unitless}: {d}"))
    })
    .await?;
    assert!(letter["reason"].as_str().unwrap().contains("unit.content"), "{letter}");
    assert!(letter["original_subject"].as_str().is_some_and(|o| !o.is_empty()) && letter["seq"].as_u64() > Some(0));
    for (query, status) in [("component=nope", 400), ("component=pipeline&limit=x", 400)] {
        let (s, e) = g.get(&reader, &format!("/api/v1/dead-letters?{query}")).await?;
        assert_eq!(s, status, "{query}: {e}");
    }
    let (s, e) = g.post(&writer, &format!("/api/v1/runs/{unitless}/cancel"), r#"{"reason":"too late"}"#).await?;
    assert_eq!(s, 409, "{e}");
    let (s, retried) = g.post(&writer, &format!("/api/v1/runs/{unitless}/retry"), r#"{"reason":"once more"}"#).await?;
    assert_eq!(s, 200, "{retried}");
    assert_eq!(retried["run_id"], unitless.as_str());
    let (s, e) = g.post(&writer, &format!("/api/v1/runs/{unitless}/retry"), r#"{"bogus":1}"#).await?;
    assert_eq!(s, 400, "{e}");
    let (s, e) = g.post(&writer, "/api/v1/pipelines/nope/runs", "").await?;
    assert_eq!(s, 404, "{e}");
    let (s, e) = g.post(&writer, "/api/v1/pipelines/text-ingest/runs", r#"{"unit_id":"../x"}"#).await?;
    assert_eq!(s, 400, "{e}");

    // Removing is admin only; a removed pipeline is inactive, and removing it again is 404.
    let (s, e) = g.send("DELETE", &writer, "/api/v1/pipelines/text-ingest", "").await?;
    assert_eq!(s, 403, "{e}");
    let (s, removed) = g.send("DELETE", &admin, "/api/v1/pipelines/text-ingest?reason=done", "").await?;
    assert_eq!(s, 200, "{removed}");
    let (s, e) = g.send("DELETE", &admin, "/api/v1/pipelines/text-ingest", "").await?;
    assert_eq!(s, 404, "{e}");
    let (_, gone) = g.get(&reader, "/api/v1/pipelines/text-ingest").await?;
    assert_eq!(gone["active"], false, "{gone}");
    let (s, e) = g.post(&writer, "/api/v1/pipelines/text-ingest/runs", "").await?;
    assert_eq!(s, 404, "{e}");
    Ok(())
}

fn grpc_req<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_grpc_with_generated_client_reflection_and_health() -> Result<()> {
    use cim_events::proto::iu::{CreateUnit, GetUnit, ListUnits, TagUnit};
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    use ui_gateway::grpc::proto::{
        DownloadRequest, EventsRequest, UploadRequest, WhoAmIRequest, gateway_client::GatewayClient,
        upload_request::Part,
    };

    let g = Gateway::start(&[]).await?;
    let (_, reader) = g.token("grpc-r", "reader").await?;
    let (_, writer) = g.token("grpc-w", "writer").await?;
    let channel = eventually(Duration::from_secs(10), "grpc port open", || async {
        Ok(tonic::transport::Channel::from_shared(g.grpc.clone())?.connect().await?)
    })
    .await?;
    let mut client = GatewayClient::new(channel.clone());

    // Health and reflection.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "cim.gateway.v1.Gateway"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(futures::stream::iter([req])).await?.into_inner();
    let reply = replies.message().await?.context("a reflection reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected reply {reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"cim.gateway.v1.Gateway".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    // The same in reflection v1alpha, all that older clients (Python's grpc_reflection) speak.
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("cim.gateway.v1.Gateway".into())),
        };
        let mut replies = reflection.server_reflection_info(futures::stream::iter([req])).await?.into_inner();
        let reply = replies.message().await?.context("a v1alpha reflection reply")?;
        let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
            anyhow::bail!("unexpected v1alpha reply {reply:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }

    // Auth.
    let e = client.who_am_i(WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let e = client.who_am_i(grpc_req(WhoAmIRequest {}, "cimt_0_0")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let me = client.who_am_i(grpc_req(WhoAmIRequest {}, &reader)).await?.into_inner();
    assert_eq!(me.role, "reader");
    let e = client.tag(grpc_req(TagUnit::default(), &reader)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // Upload streamed in chunks, then get, list, download (whole and a range), tag.
    let content: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
    let mut parts = vec![UploadRequest {
        part: Some(Part::Unit(CreateUnit { name: "grpc.bin".into(), tags: vec!["grpc".into()], ..Default::default() })),
    }];
    parts.extend(content.chunks(64 * 1024).map(|c| UploadRequest { part: Some(Part::Data(c.to_vec())) }));
    let created = client.upload(grpc_req(futures::stream::iter(parts), &writer)).await?.into_inner();
    assert!(!created.unit_id.is_empty());
    let unit = client
        .get_unit(grpc_req(GetUnit { unit_id: created.unit_id.clone(), ..Default::default() }, &reader))
        .await?
        .into_inner();
    assert_eq!((unit.name.as_str(), unit.size), ("grpc.bin", content.len() as u64));
    let list = client
        .list_units(grpc_req(ListUnits { tag: "grpc".into(), ..Default::default() }, &reader))
        .await?
        .into_inner();
    assert_eq!(list.units.len(), 1);
    let mut whole = Vec::new();
    let mut chunks = client
        .download(grpc_req(DownloadRequest { unit_id: created.unit_id.clone(), ..Default::default() }, &reader))
        .await?
        .into_inner();
    while let Some(c) = chunks.message().await? {
        whole.extend_from_slice(&c.data);
    }
    assert_eq!(whole, content);
    let mut part = Vec::new();
    let mut chunks = client
        .download(grpc_req(
            DownloadRequest { unit_id: created.unit_id.clone(), offset: 1000, length: 5000, ..Default::default() },
            &reader,
        ))
        .await?
        .into_inner();
    while let Some(c) = chunks.message().await? {
        part.extend_from_slice(&c.data);
    }
    assert_eq!(part, &content[1000..6000]);
    client
        .tag(grpc_req(
            TagUnit { unit_id: created.unit_id.clone(), tags: vec!["seen".into()], ..Default::default() },
            &writer,
        ))
        .await?;

    // Bad input: a name with a path separator, an upload without its unit.
    let bad = vec![UploadRequest { part: Some(Part::Unit(CreateUnit { name: "../x".into(), ..Default::default() })) }];
    let e = client.upload(grpc_req(futures::stream::iter(bad), &writer)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let bad = vec![UploadRequest { part: Some(Part::Data(b"x".to_vec())) }];
    let e = client.upload(grpc_req(futures::stream::iter(bad), &writer)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // Events from the start: content stored, unit created, unit tagged.
    let mut events = client
        .events(grpc_req(EventsRequest { component: "iu".into(), after: Some(0), ..Default::default() }, &reader))
        .await?
        .into_inner();
    let mut subjects = Vec::new();
    while subjects.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message()).await??.context("events ended")?;
        subjects.push(e.subject);
    }
    assert!(subjects[1].ends_with(".created") && subjects[2].ends_with(".tagged"), "{subjects:?}");
    Ok(())
}

/// `assert_eq!` as an error, so that the browser test can save the screenshot of its failure.
macro_rules! ensure_eq {
    ($a:expr, $b:expr) => {{
        let (a, b) = (&$a, &$b);
        anyhow::ensure!(*a == *b, "{a:?} is not {b:?}");
    }};
    ($a:expr, $b:expr, $($m:tt)+) => {{
        let (a, b) = (&$a, &$b);
        anyhow::ensure!(*a == *b, "{a:?} is not {b:?}: {}", format!($($m)+));
    }};
}

/// How long the browser tests wait for a page to show something: generous, the machine may be
/// loaded (a pipeline run, the graph's walk over the links, a cold Chromium).
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// A WebDriver session on headless Chromium (Debian's chromium + chromedriver), over plain HTTP.
/// It saves a screenshot per page into `target/ui-screenshots` (`shot`), and one named after
/// the last page when the test fails (`failed`).
struct Browser {
    http: reqwest::Client,
    base: String,
    shots: std::path::PathBuf,
    page: std::sync::Mutex<String>,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Result<Browser> {
        let which = |b: &str| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join(b))
                .find(|p| p.is_file())
        };
        let driver = which("chromedriver")
            .context("chromedriver is missing: apt-get install -y chromium chromium-driver (.ci/run does)")?;
        let chromium = which("chromium")
            .context("chromium is missing: apt-get install -y chromium chromium-driver (.ci/run does)")?;
        let port = free_port()?;
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        let driver_url = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver ready", || async {
            let v: Value = http.get(format!("{driver_url}/status")).send().await?.json().await?;
            anyhow::ensure!(v["value"]["ready"] == true, "{v}");
            Ok(())
        })
        .await?;
        let profile = tempfile::tempdir()?;
        let caps = serde_json::json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
        }}}});
        let v: Value = http.post(format!("{driver_url}/session")).json(&caps).send().await?.json().await?;
        let session = v["value"]["sessionId"].as_str().with_context(|| format!("no session: {v}"))?;
        let shots = bin("cimctl").parent().and_then(|d| d.parent()).context("target dir")?.join("ui-screenshots");
        std::fs::create_dir_all(&shots)?;
        Ok(Browser {
            http,
            base: format!("{driver_url}/session/{session}"),
            shots,
            page: std::sync::Mutex::new("start".into()),
            _driver: child,
            _profile: profile,
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            req = req.json(&body);
        }
        let v: Value = req.send().await?.json().await?;
        if v["value"]["error"].is_string() {
            anyhow::bail!("webdriver {path}: {}", v["value"]["message"]);
        }
        Ok(v["value"].clone())
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.cmd(reqwest::Method::POST, "/url", serde_json::json!({ "url": url })).await?;
        Ok(())
    }

    async fn element(&self, css: &str) -> Result<String> {
        let v = self
            .cmd(reqwest::Method::POST, "/element", serde_json::json!({ "using": "css selector", "value": css }))
            .await?;
        Ok(v.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).context("element id")?.to_string())
    }

    async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/clear"), serde_json::json!({})).await.ok();
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/value"), serde_json::json!({ "text": text })).await?;
        Ok(())
    }

    /// Files for an `<input type=file multiple>` (WebDriver: one path a line).
    async fn choose_files(&self, css: &str, files: &[&std::path::Path]) -> Result<()> {
        let id = self.element(css).await?;
        let text = files.iter().map(|f| f.to_string_lossy()).collect::<Vec<_>>().join("\n");
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/value"), serde_json::json!({ "text": text })).await?;
        Ok(())
    }

    async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/click"), serde_json::json!({})).await?;
        Ok(())
    }

    async fn js(&self, script: &str) -> Result<Value> {
        self.cmd(reqwest::Method::POST, "/execute/sync", serde_json::json!({ "script": script, "args": [] })).await
    }

    /// Runs `script`, which ends by calling `done(value)` (the last argument), and returns value.
    async fn js_async(&self, script: &str) -> Result<Value> {
        let script = format!("const done = arguments[arguments.length - 1]; {script}");
        self.cmd(reqwest::Method::POST, "/execute/async", serde_json::json!({ "script": script, "args": [] })).await
    }

    /// Polls `script` until it returns something truthy (within `PAGE_WAIT`); returns that.
    async fn wait_js(&self, what: &str, script: &str) -> Result<Value> {
        eventually(PAGE_WAIT, what, || async {
            let v = self.js(script).await?;
            anyhow::ensure!(!v.is_null() && v != false && v != "" && v != 0, "{what}: {v}");
            Ok(v)
        })
        .await
    }

    /// Waits for an element matching `css` whose text contains `text`.
    async fn wait_text(&self, css: &str, text: &str) -> Result<Value> {
        let script = format!(
            "return [...document.querySelectorAll({css})].map(e => e.textContent).find(t => t.includes({text})) || ''",
            css = serde_json::to_string(css)?,
            text = serde_json::to_string(text)?
        );
        self.wait_js(&format!("{css} containing {text:?}"), &script).await
    }

    /// The page is `name` from now on (for the screenshot of a failure).
    fn at(&self, name: &str) {
        *self.page.lock().unwrap() = name.to_string();
    }

    async fn screenshot(&self, file: &str) -> Result<std::path::PathBuf> {
        use base64::Engine as _;
        let png = self.cmd(reqwest::Method::GET, "/screenshot", Value::Null).await?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().context("screenshot")?)?;
        anyhow::ensure!(bytes.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = self.shots.join(format!("{file}.png"));
        std::fs::write(&path, &bytes)?;
        Ok(path)
    }

    /// A screenshot of the page as it is now: `target/ui-screenshots/<name>.png`.
    async fn shot(&self, name: &str) -> Result<()> {
        self.at(name);
        self.screenshot(name).await?;
        Ok(())
    }

    /// After a failure: the page as it was, `failed-<last page>.png`.
    async fn failed(&self) {
        let page = self.page.lock().unwrap().clone();
        match self.screenshot(&format!("failed-{page}")).await {
            Ok(p) => eprintln!("screenshot of the failure: {}", p.display()),
            Err(e) => eprintln!("no screenshot of the failure: {e:#}"),
        }
    }

    /// axe-core (from `ui/node_modules`, a dev dependency of the UI) on the current page: no
    /// serious or critical WCAG 2 A/AA violation. Skipped, saying so, when `npm --prefix ui ci`
    /// has not been run.
    async fn accessible(&self, page: &str) -> Result<()> {
        let axe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui/node_modules/axe-core/axe.min.js");
        let Ok(source) = std::fs::read_to_string(&axe) else {
            eprintln!("accessibility check of {page} skipped: {} is missing (npm --prefix ui ci)", axe.display());
            return Ok(());
        };
        if self.js("return typeof window.axe").await? != "object" {
            self.js(&format!("{source}\n;return typeof window.axe")).await?;
        }
        let found = self
            .js_async(
                "axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa'] } })
                   .then(r => done(r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
                     .map(v => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', ')}`)))
                   .catch(e => done([`axe failed: ${e}`]))",
            )
            .await?;
        let found = found.as_array().context("axe result")?;
        anyhow::ensure!(
            found.is_empty(),
            "accessibility violations on {page}:\n{}",
            serde_json::to_string_pretty(found)?
        );
        Ok(())
    }
}

/// Signs in with `token` on the sign-in page and waits until the app shows who is signed in.
async fn sign_in(browser: &Browser, token: &str, who: &str) -> Result<()> {
    browser.wait_js("sign-in page", "return !!document.querySelector('[data-testid=token]')").await?;
    browser.type_into("[data-testid=token]", token).await?;
    browser.click("[data-testid=sign-in]").await?;
    browser.wait_text("[data-testid=who]", who).await?;
    Ok(())
}

async fn sign_out(browser: &Browser) -> Result<()> {
    browser.click("[data-testid=sign-out]").await?;
    browser
        .wait_js(
            "signed out",
            "return !!document.querySelector('[data-testid=token]') && !sessionStorage.getItem('cim-token')",
        )
        .await?;
    Ok(())
}

/// The web UI end to end in headless Chromium against real services: sign-in (a bad token is
/// refused with the reason), upload of several files with per-file progress, the units table
/// kept live by the event stream, one upload opening its unit, formatted metadata and
/// provenance, the D3 link graph of the summary the example pipeline writes (clickable), a tag
/// edit that meets a concurrent change (409, a clear message, then success), the run's steps
/// as a timeline, live events, reader restrictions, the admin operations page, no CSP
/// violation, the service worker holding the shell, and axe-core on every page. One screenshot
/// per page lands in target/ui-screenshots.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_web_ui_end_to_end_in_headless_chromium() -> Result<()> {
    let mut g = Gateway::start_with(&[], &[Component::PluginHost, Component::PipelineEngine]).await?;
    let (_, writer) = g.token("browser", "writer").await?;
    let (_, reader) = g.token("browser-reader", "reader").await?;
    let (_, admin) = g.token("browser-admin", "admin").await?;
    // The shipped example pipeline: a text upload triggers it, and its summary is linked to the upload.
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines/text-ingest.json"),
    )?;
    let (s, applied) = g.post(&admin, "/api/v1/pipelines", example).await?;
    assert_eq!(s, 201, "{applied}");
    let browser = Browser::start().await?;
    let mut result = web_ui_flow(&g, &browser, [&writer, &reader, &admin]).await;
    if result.is_ok() {
        result = offline(&mut g, &browser).await;
    }
    if result.is_err() {
        browser.failed().await;
    }
    let _ = browser.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    result
}

/// With the gateway stopped, the service worker still opens the app, which says why it cannot
/// go on.
async fn offline(g: &mut Gateway, browser: &Browser) -> Result<()> {
    browser.at("offline");
    g.fx.service_mut(Component::UiGateway).terminate(Duration::from_secs(20)).await?;
    browser.goto(&g.url("/")).await?;
    browser.wait_text("main", "cimctl token create").await?;
    browser.wait_text("[data-testid=login-error]", "the gateway cannot be reached").await?;
    browser.shot("offline").await?;
    Ok(())
}

async fn web_ui_flow(g: &Gateway, browser: &Browser, [writer, reader, admin]: [&str; 3]) -> Result<()> {
    // Sign in: the page explains tokens; a bad one is refused with the gateway's reason.
    browser.at("sign-in");
    browser.goto(&g.url("/")).await?;
    browser
        .js("window.cspViolations = []; document.addEventListener('securitypolicyviolation', e => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI))")
        .await?;
    browser.wait_text("main", "cimctl token create").await?;
    browser.accessible("sign-in").await?;
    browser.shot("sign-in").await?;
    browser.type_into("[data-testid=token]", "cimt_nope_nope").await?;
    browser.click("[data-testid=sign-in]").await?;
    browser.wait_text("[data-testid=login-error]", "invalid or revoked api token").await?;
    sign_in(browser, writer, "browser").await?;
    browser.at("units");
    browser
        .wait_js("units live", "return document.querySelector('[data-testid=live-state]')?.dataset.state === 'live'")
        .await?;
    // The stylesheet applies under the CSP (the header is dark).
    let header = browser.js("return getComputedStyle(document.querySelector('header')).backgroundColor").await?;
    anyhow::ensure!(header != "rgba(0, 0, 0, 0)", "the stylesheet did not apply");

    // Upload two files at once: each has its own progress, both end done.
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("alpha notes.txt"), dir.path().join("beta.txt"));
    std::fs::write(&a, "alpha line\n".repeat(5000))?;
    std::fs::write(&b, "beta line\n".repeat(300))?;
    browser.choose_files("[data-testid=file-input]", &[&a, &b]).await?;
    let done = browser
        .wait_js(
            "both uploads done with full progress",
            "const i = [...document.querySelectorAll('[data-testid=upload-item]')]; \
             return i.length === 2 && i.every(x => x.dataset.state === 'done' && \
               x.querySelector('progress').value === x.querySelector('progress').max) && i.map(x => x.dataset.name).sort().join('|')",
        )
        .await?;
    ensure_eq!(done, "alpha notes.txt|beta.txt");
    // The table follows the event stream: both rows, with human sizes.
    browser.wait_text("[data-testid=unit-link]", "alpha notes.txt").await?;
    let row = browser
        .wait_js("beta.txt listed", "return [...document.querySelectorAll('[data-testid=unit-row]')].find(r => r.querySelector('[data-testid=unit-link]').textContent === 'beta.txt')?.textContent")
        .await?;
    anyhow::ensure!(row.as_str().unwrap().contains("2.9 KiB"), "{row}");
    // A unit created elsewhere (the API) appears without a reload.
    let (s, created) = g.post(writer, "/api/v1/units?name=from-elsewhere.txt", "made through the api").await?;
    ensure_eq!(s, 201, "{created}");
    browser.wait_text("[data-testid=unit-row]", "from-elsewhere.txt").await?;
    // Sorting by name, ascending.
    browser.click("[data-testid=sort-name]").await?;
    browser
        .wait_js("sorted by name", "const n = [...document.querySelectorAll('[data-testid=unit-link]')].map(a => a.textContent); return n.length >= 3 && n.every((x, i) => i === 0 || n[i - 1].localeCompare(x) <= 0)")
        .await?;
    // Search by name prefix.
    browser.type_into("[data-testid=search-name_prefix]", "beta").await?;
    browser.click("[data-testid=search]").await?;
    browser
        .wait_js("searched", "const n = [...document.querySelectorAll('[data-testid=unit-link]')].map(a => a.textContent); return n.length >= 1 && n.every(x => x.startsWith('beta'))")
        .await?;
    browser.accessible("units").await?;
    browser.shot("units").await?;

    // One file: its unit opens when it is in.
    let file = dir.path().join("browser-upload.txt");
    std::fs::write(&file, "uploaded from headless chromium\n".repeat(1000))?;
    browser.choose_files("[data-testid=file-input]", &[&file]).await?;
    browser.at("unit");
    browser.wait_text("[data-testid=unit-name]", "browser-upload.txt").await?;
    let id =
        browser.wait_js("unit id", "return document.querySelector('[data-testid=meta-unit-id]')?.textContent").await?;
    let id = id.as_str().context("unit id")?.to_string();
    anyhow::ensure!(browser.js("return location.hash").await?.as_str().unwrap().ends_with(&id));
    let size = browser.js("return document.querySelector('[data-testid=meta-size]').textContent").await?;
    anyhow::ensure!(size.as_str().is_some_and(|s| s.starts_with("31 KiB (")), "{size}");
    browser.wait_text("[data-testid=provenance-entry]", "created").await?;

    // The example pipeline runs on it; its summary links back: the graph shows both, typed.
    let run = eventually(PAGE_WAIT, "a run of the upload", || async {
        let (s, runs) = g.get(writer, &format!("/api/v1/runs?unit_id={id}")).await?;
        anyhow::ensure!(s == 200, "{runs}");
        Ok(runs["runs"][0]["run_id"].as_str().context("no run yet")?.to_string())
    })
    .await?;
    g.wait_run(writer, &run, "completed").await?;
    browser
        .wait_js("graph with the summary", "const g = document.querySelector('[data-testid=link-graph]'); return g && g.querySelectorAll('.graph-node').length >= 2 && [...g.querySelectorAll('.edge-label')].some(e => e.textContent === 'summary-of')")
        .await?;
    browser.wait_text("[data-testid=unit-runs]", "text-ingest").await?;
    browser.wait_text("[data-testid=tags]", "normalized").await?;
    browser.accessible("unit").await?;
    browser.shot("unit").await?;
    browser.js("document.querySelector('[data-testid=link-graph]').scrollIntoView({ block: 'center' })").await?;
    browser.shot("unit-graph").await?;
    // Nodes are links: the summary opens.
    browser.js("document.querySelector('[data-testid=link-graph] .graph-node[data-hop=\"1\"]').dispatchEvent(new MouseEvent('click', { bubbles: true }))").await?;
    browser.wait_text("[data-testid=unit-name]", "browser-upload.txt.summary.txt").await?;
    browser.js("history.back()").await?;
    browser.wait_text("[data-testid=meta-unit-id]", &id).await?;

    // A tag edit that meets a concurrent change: a clear 409 message, then it goes through.
    browser.at("unit-tag-conflict");
    let seen =
        browser.wait_js("version", "return document.querySelector('[data-testid=meta-version]')?.textContent").await?;
    browser.type_into("[data-testid=tag-input]", "reviewed").await?;
    let (s, r) = g.post(writer, &format!("/api/v1/units/{id}/tags"), r#"{"tags":["from-the-test"]}"#).await?;
    ensure_eq!(s, 200, "{r}");
    browser.wait_text("[data-testid=tags]", "from-the-test").await?;
    let now = browser.js("return document.querySelector('[data-testid=meta-version]').textContent").await?;
    anyhow::ensure!(now != seen, "the page still shows {seen} after the concurrent tag");
    browser.click("[data-testid=tag-add]").await?;
    browser.wait_text("[data-testid=tag-error]", "Someone changed this unit since you opened it").await?;
    browser.shot("unit-tag-conflict").await?;
    browser.click("[data-testid=tag-reload]").await?;
    browser.click("[data-testid=tag-add]").await?;
    browser.wait_text("[data-testid=tags]", "reviewed").await?;
    let (_, unit) = g.get(writer, &format!("/api/v1/units/{id}")).await?;
    anyhow::ensure!(unit["tags"].as_array().unwrap().iter().any(|t| t == "reviewed"), "{unit}");

    // A new version arrives live; the timeline shows both, the diff names what changed.
    let (s, v) = g.post(writer, &format!("/api/v1/units/{id}/versions"), "the second version\n").await?;
    ensure_eq!(s, 201, "{v}");
    browser.wait_js("two versions", "return document.querySelectorAll('[data-testid=version]').length === 2").await?;
    browser.click("[data-testid=compare]").await?;
    let diff = browser.wait_text("[data-testid=diff]", "content id").await?;
    anyhow::ensure!(diff.as_str().is_some_and(|d| d.contains("size") && d.contains("19 B")), "{diff}");
    browser.js("document.querySelector('[data-testid=diff]').scrollIntoView({ block: 'center' })").await?;
    browser.shot("unit-versions").await?;

    // Pipelines and the run as a timeline of its steps. A run without a unit fails (its first
    // step reads the unit's content): its reason shows, and so does its dead letter.
    let (s, started) = g.post(writer, "/api/v1/pipelines/text-ingest/runs", "").await?;
    ensure_eq!(s, 201, "{started}");
    let unitless = started["run_id"].as_str().context("run_id")?.to_string();
    g.wait_run(writer, &unitless, "failed").await?;
    browser.at("pipelines");
    browser.click("[data-testid=nav-pipelines]").await?;
    browser.wait_js("pipeline listed", "return [...document.querySelectorAll('[data-testid=pipeline-row]')].some(r => r.dataset.name === 'text-ingest')").await?;
    browser
        .wait_js("runs listed", &format!("return !!document.querySelector('[data-testid=run-row][data-id=\"{run}\"]')"))
        .await?;
    browser.wait_text("[data-testid=dead-letter]", &format!("run {unitless} failed")).await?;
    browser
        .wait_js("the failed run's reason", &format!("return document.querySelector('[data-testid=run-row][data-id=\"{unitless}\"]')?.textContent.includes('unit.content')"))
        .await?;
    browser.accessible("pipelines").await?;
    browser.shot("pipelines").await?;
    browser
        .js(&format!(
            "document.querySelector('[data-testid=run-row][data-id=\"{run}\"] [data-testid=run-link]').click()"
        ))
        .await?;
    browser.at("run");
    let steps = browser
        .wait_js("steps as a timeline", "const s = [...document.querySelectorAll('[data-testid=step]')].map(e => e.dataset.state); return s.length === 5 && s.join(',')")
        .await?;
    ensure_eq!(steps, "completed,completed,completed,completed,completed");
    ensure_eq!(
        browser.js("return document.querySelector('[data-testid=run-detail-state]').dataset.state").await?,
        "completed"
    );
    browser.accessible("run").await?;
    browser.shot("run").await?;

    // Live events, the component picked from a list.
    browser.at("events");
    browser.click("[data-testid=nav-events]").await?;
    browser
        .wait_js("events live", "return document.querySelector('[data-testid=live-state]')?.dataset.state === 'live'")
        .await?;
    let options = browser.wait_js("component list", "const o = [...document.querySelectorAll('[data-testid=event-component] option')].map(o => o.value); return o.length > 1 && o").await?;
    anyhow::ensure!(options.as_array().unwrap().iter().any(|o| o == "iu"), "{options}");
    let (s, _) = g.post(writer, &format!("/api/v1/units/{id}/tags"), r#"{"tags":["live"]}"#).await?;
    ensure_eq!(s, 200);
    browser.wait_text("[data-testid=event-row]", &format!("{id}.tagged")).await?;
    browser.accessible("events").await?;
    browser.shot("events").await?;

    // A reader: no upload (with the reason), no tag edit, no run actions, no operations.
    sign_out(browser).await?;
    browser.at("reader");
    sign_in(browser, reader, "browser-reader").await?;
    browser.wait_text("[data-testid=upload-disabled]", "needs a writer token").await?;
    ensure_eq!(
        browser
            .js("return document.querySelectorAll('[data-testid=dropzone], [data-testid=file-input]').length")
            .await?,
        0
    );
    ensure_eq!(browser.js("return document.querySelectorAll('[data-testid=nav-operations]').length").await?, 0);
    browser.shot("reader-units").await?;
    browser.goto(&g.url(&format!("/#/units/{id}"))).await?;
    browser.wait_text("[data-testid=unit-name]", "browser-upload.txt").await?;
    browser.wait_text("main", "Adding tags needs a writer token").await?;
    ensure_eq!(browser.js("return document.querySelectorAll('[data-testid=tag-input]').length").await?, 0);
    browser.goto(&g.url(&format!("/#/runs/{run}"))).await?;
    browser.wait_text("main", "Cancelling and retrying runs needs a writer token").await?;
    browser.goto(&g.url("/#/operations")).await?;
    browser.wait_text("[data-testid=error]", "needs an admin token").await?;

    // An admin: the operations page, desired against running.
    sign_out(browser).await?;
    browser.at("operations");
    sign_in(browser, admin, "browser-admin").await?;
    browser.click("[data-testid=nav-operations]").await?;
    browser.wait_js("information-unit running", "const r = document.querySelector('[data-testid=service-row][data-service=information-unit]'); return r && r.cells[2].textContent === '1'").await?;
    browser
        .wait_js("convergence shown", "return document.querySelector('[data-testid=converged]')?.dataset.converged")
        .await?;
    browser.accessible("operations").await?;
    browser.shot("operations").await?;
    // Readable at 360 px wide.
    browser.cmd(reqwest::Method::POST, "/window/rect", serde_json::json!({ "width": 360, "height": 800 })).await?;
    browser.click("[data-testid=nav-units]").await?;
    browser.wait_text("[data-testid=unit-row]", "browser-upload.txt").await?;
    browser.shot("units-360px").await?;

    // The shell is cached by the service worker, and the CSP blocked nothing.
    let cached = browser
        .js_async("navigator.serviceWorker.ready.then(() => caches.open('cim-shell-v1')).then(c => c.keys()).then(k => done(k.map(r => new URL(r.url).pathname))).catch(e => done(String(e)))")
        .await?;
    let cached: Vec<&str> = cached.as_array().context("cached paths")?.iter().filter_map(Value::as_str).collect();
    anyhow::ensure!(
        cached.contains(&"/") && cached.iter().any(|p| p.starts_with("/assets/") && p.ends_with(".js")),
        "the service worker did not cache the shell: {cached:?}"
    );
    let violations = browser.js("return window.cspViolations || []").await?;
    ensure_eq!(violations, serde_json::json!([]), "content security policy violations");
    eprintln!("screenshots in {}", browser.shots.display());
    Ok(())
}

/// The gateway with its own NATS identity, whose permissions are the generated ones in
/// `nixos-modules/nats-permissions.json`: upload, download, queries and live events all work
/// and nothing hits a permissions violation.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_runs_with_its_generated_nats_permissions() -> Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut fx = CimFixture::builder()
        .generated_permissions()
        .service(Component::InformationUnit)
        .service(Component::PipelineEngine)
        .service(
            Svc::new(Component::UiGateway)
                .args(&["--gateway-listen", &listen, "--gateway-grpc-listen", "off"])
                .own_identity(),
        )
        .start()
        .await?;
    let gw = fx.service(Component::UiGateway);
    let (_, token) = fx.token("perm", "writer").await?;

    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://{listen}");
    let r = http.get(format!("{base}/api/v1/dead-letters?component=iu")).bearer_auth(&token).send().await?;
    assert_eq!(r.status().as_u16(), 200, "dead letters: {}\n{}", r.text().await?, gw.log());
    let mut live = http.get(format!("{base}/api/v1/events?component=iu")).bearer_auth(&token).send().await?;
    assert_eq!(live.status().as_u16(), 200);
    let r = http.post(format!("{base}/api/v1/units?name=p.txt")).bearer_auth(&token).body("permitted").send().await?;
    let status = r.status().as_u16();
    let created: Value = r.json().await?;
    assert_eq!(status, 201, "{created}\n{}", gw.log());
    let id = created["unit_id"].as_str().unwrap();
    let body = http.get(format!("{base}/api/v1/units/{id}/content")).bearer_auth(&token).send().await?.text().await?;
    assert_eq!(body, "permitted", "{}", gw.log());
    let list: Value = http.get(format!("{base}/api/v1/units")).bearer_auth(&token).send().await?.json().await?;
    assert_eq!(list["units"].as_array().map(Vec::len), Some(1), "{list}");
    // The pipeline engine's queries go through too.
    let r = http.get(format!("{base}/api/v1/pipelines")).bearer_auth(&token).send().await?;
    assert_eq!(r.status().as_u16(), 200, "{}", gw.log());
    let r = http.get(format!("{base}/api/v1/runs")).bearer_auth(&token).send().await?;
    assert_eq!(r.status().as_u16(), 200, "{}", gw.log());
    let events = sse_events(&mut live, 2).await?;
    assert!(events[1].1["subject"].as_str().unwrap().ends_with(".created"), "{events:?}");
    drop(live);
    let gw = fx.service_mut(Component::UiGateway);
    let status = gw.terminate(Duration::from_secs(30)).await?;
    let log = gw.log();
    assert!(status.success(), "ui-gateway exited {status}:\n{log}");
    assert!(!log.to_lowercase().contains("permissions violation"), "ui-gateway hit its permissions:\n{log}");
    Ok(())
}

/// Least privilege at the edge, for every operation there is: each HTTP operation the OpenAPI
/// document lists is tried with every token below the role it names (`x-cim-role`), and each
/// gRPC write method with a reader token. Every attempt is refused (403, `PermissionDenied`)
/// and nothing is written: no event, no object, no pipeline change. The document itself must
/// not let a reader write: every operation other than GET needs at least a writer.
#[tokio::test(flavor = "multi_thread")]
async fn every_write_and_admin_operation_is_refused_below_its_role() -> Result<()> {
    use anyhow::ensure;
    use cim_events::proto::iu::{CreateUnit, Link, LinkUnit, TagUnit};
    use ui_gateway::grpc::proto::{UploadRequest, gateway_client::GatewayClient, upload_request::Part};

    let g = Gateway::start_with(&[], &[Component::PipelineEngine]).await?;
    let (_, reader) = g.token("m-reader", "reader").await?;
    let (_, writer) = g.token("m-writer", "writer").await?;
    let (s, created) = g.post(&writer, "/api/v1/units?name=kept.txt", "kept").await?;
    ensure!(s == 201, "{s} {created}");
    let id = created["unit_id"].as_str().context("unit_id")?.to_string();
    let doc: Value = g.http.get(g.url("/api/openapi.json")).send().await?.json().await?;
    let paths = doc["paths"].as_object().context("paths")?;
    let before = (g.written().await?, g.pipeline_events().await?);

    let ranks = ["reader", "writer", "admin"];
    let mut tried = 0;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().context("operations")? {
            if method == "parameters" {
                continue;
            }
            let role = op["x-cim-role"].as_str().with_context(|| format!("{method} {path} names no role"))?;
            let rank = ranks.iter().position(|r| *r == role).with_context(|| format!("{method} {path}: {role}"))?;
            ensure!(method == "get" || rank >= 1, "{method} {path} lets a reader write");
            let concrete = path.replace("{id}", &id).replace("{name}", "text-ingest");
            for (token, below) in [(&reader, 0), (&writer, 1)] {
                if below >= rank {
                    continue;
                }
                let (status, body) =
                    g.send(&method.to_uppercase(), token, &concrete, r#"{"name":"x","steps":[]}"#).await?;
                ensure!(status == 403, "{} {concrete} as {}: {status} {body}", method.to_uppercase(), ranks[below]);
                tried += 1;
            }
        }
    }
    ensure!(tried >= 15, "only {tried} refusals tried: is the document complete?");

    let channel = eventually(Duration::from_secs(10), "grpc port open", || async {
        Ok(tonic::transport::Channel::from_shared(g.grpc.clone())?.connect().await?)
    })
    .await?;
    let mut client = GatewayClient::new(channel);
    let parts = vec![
        UploadRequest { part: Some(Part::Unit(CreateUnit { name: "no.txt".into(), ..Default::default() })) },
        UploadRequest { part: Some(Part::Data(b"no".to_vec())) },
    ];
    let refusals = [
        client.upload(grpc_req(futures::stream::iter(parts), &reader)).await.map(|_| ()),
        client
            .tag(grpc_req(TagUnit { unit_id: id.clone(), tags: vec!["no".into()], ..Default::default() }, &reader))
            .await
            .map(|_| ()),
        client
            .link(grpc_req(
                LinkUnit {
                    unit_id: id.clone(),
                    link: Some(Link { target: id.clone(), kind: "no".into() }),
                    ..Default::default()
                },
                &reader,
            ))
            .await
            .map(|_| ()),
    ];
    for (method, r) in ["Upload", "Tag", "Link"].iter().zip(refusals) {
        let e = r.err().with_context(|| format!("{method} with a reader token was carried out"))?;
        ensure!(e.code() == tonic::Code::PermissionDenied, "{method}: {e}");
    }
    let after = (g.written().await?, g.pipeline_events().await?);
    ensure!(before == after, "something was written by refused calls: {before:?} -> {after:?}");
    Ok(())
}
