//! The plugin host end to end, as real processes against a real nats-server: push, list and
//! invoke by version and by capability (with `cimctl plugin`), immutable versions, limits
//! (memory, fuel, deadline), bad plugins that never hurt the host, bounded parallelism with
//! back-pressure, restarts, references that block removal, and a native plugin serving the same
//! contract as WebAssembly.

use std::{process::Output, time::Duration};

use anyhow::{Context, Result};
use cim_events::{
    Component, plugin,
    proto::plugin::{InvokeReply, InvokeRequest, ListPlugins, ListReply, PluginReference, StatsReply, Status},
    resources,
};
use cim_testkit::eventually;
use prost::Message as _;
use tokio::process::Command;

use crate::common::{SLEEPY_WAT, bin};
use crate::fixture::{CimFixture, Svc};

const C: Component = Component::PluginHost;

/// The plugin host (with extra `args`) on a nats-server of its own, ready.
async fn start_host(args: &[&str]) -> Result<CimFixture> {
    CimFixture::builder().service(Svc::new(C).args(args)).start().await
}

async fn cimctl(cim: &CimFixture, args: &[&str]) -> Result<Output> {
    Ok(Command::new(bin("cimctl")).arg("plugin").args(args).args(["--nats-url", cim.url()]).output().await?)
}

/// `cimctl plugin push` of WAT text; returns the command's output (success or not).
async fn push(cim: &CimFixture, wat: &str, name: &str, version: &str, extra: &[&str]) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{name}.wat"));
    std::fs::write(&file, wat)?;
    let file = file.to_string_lossy().to_string();
    let mut args = vec!["push", file.as_str(), "--name", name, "--version", version];
    args.extend_from_slice(extra);
    cimctl(cim, &args).await
}

async fn push_ok(cim: &CimFixture, wat: &str, name: &str, version: &str, extra: &[&str]) -> Result<String> {
    let out = push(cim, wat, name, version, extra).await?;
    anyhow::ensure!(out.status.success(), "push {name}@{version} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

async fn call(client: &async_nats::Client, subject: String, req: &InvokeRequest) -> Result<InvokeReply> {
    let m =
        tokio::time::timeout(Duration::from_secs(30), client.request(subject, req.encode_to_vec().into())).await??;
    Ok(InvokeReply::decode(m.payload)?)
}

/// Through the host's router (`cim.cmd.plugin.invoke`).
async fn route(client: &async_nats::Client, req: InvokeRequest) -> Result<InvokeReply> {
    call(client, plugin::command(plugin::cmd::INVOKE)?, &req).await
}

async fn direct(client: &async_nats::Client, name: &str, version: &str, input: &[u8]) -> Result<InvokeReply> {
    call(client, plugin::invoke_subject(name, version)?, &InvokeRequest { input: input.to_vec(), ..Default::default() })
        .await
}

fn by_name(name: &str, version: &str, input: &[u8]) -> InvokeRequest {
    InvokeRequest { plugin: name.into(), version: version.into(), input: input.to_vec(), ..Default::default() }
}

fn status(r: &InvokeReply) -> Status {
    Status::try_from(r.status).unwrap_or(Status::Unspecified)
}

fn message(r: &InvokeReply) -> String {
    r.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

async fn list(client: &async_nats::Client) -> Result<ListReply> {
    let m = client.request(plugin::query(plugin::qry::LIST)?, ListPlugins::default().encode_to_vec().into()).await?;
    Ok(ListReply::decode(m.payload)?)
}

async fn stats(client: &async_nats::Client) -> Result<StatsReply> {
    let m = client.request(plugin::query(plugin::qry::STATS)?, "".into()).await?;
    Ok(StatsReply::decode(m.payload)?)
}

/// A plugin that answers with a fixed text (tells versions apart).
fn constant(text: &str) -> String {
    format!(
        r#"(module (import "cim" "output" (func $out (param i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "{text}")
          (func (export "cim_invoke") (result i32) (call $out (i32.const 0) (i32.const {})) (i32.const 0)))"#,
        text.len()
    )
}

fn body(code: &str) -> String {
    format!(r#"(module (memory (export "memory") 1) (func (export "cim_invoke") (result i32) {code}))"#)
}

fn sleep_request(name: &str, ms: u32) -> InvokeRequest {
    let mut r = by_name(name, "", b"");
    r.metadata.insert("ms".into(), ms.to_string());
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn push_list_and_invoke_by_version_and_by_capability() -> Result<()> {
    let cim = start_host(&[]).await?;
    let client = cim.client().clone();
    let out = push_ok(&cim, &constant("one"), "greeter", "1.0.0", &["--capability", "test.greet"]).await?;
    assert!(out.contains("pushed greeter@1.0.0 sha256:"), "{out}");
    push_ok(&cim, &constant("two"), "greeter", "1.10.0", &["--capability", "test.greet"]).await?;

    // By version, newest by default (1.10 > 1.0 as versions, not as text), by capability, and on
    // the version's own subject.
    assert_eq!(route(&client, by_name("greeter", "1.0.0", b"")).await?.output, b"one");
    let newest = route(&client, by_name("greeter", "", b"")).await?;
    assert_eq!((newest.output.as_slice(), newest.version.as_str()), (&b"two"[..], "1.10.0"));
    let cap = route(&client, InvokeRequest { capability: "test.greet".into(), ..Default::default() }).await?;
    assert_eq!((cap.output.as_slice(), cap.runtime.as_str()), (&b"two"[..], "wasm"));
    assert_eq!(direct(&client, "greeter", "1.0.0", b"").await?.output, b"one");

    // Misses are clear.
    let missing = route(&client, by_name("greeter", "9.9.9", b"")).await?;
    assert_eq!(status(&missing), Status::NotFound, "{}", message(&missing));
    let nocap = route(&client, InvokeRequest { capability: "no.such".into(), ..Default::default() }).await?;
    assert!(message(&nocap).contains("no.such"), "{}", message(&nocap));

    // Versions are immutable: the same bytes again are a no-op, other bytes are refused.
    let again = push_ok(&cim, &constant("one"), "greeter", "1.0.0", &["--capability", "test.greet"]).await?;
    assert!(again.contains("already present"), "{again}");
    let other = push(&cim, &constant("uno"), "greeter", "1.0.0", &[]).await?;
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("immutable"), "{}", String::from_utf8_lossy(&other.stderr));

    // cimctl ls lists them with digests, next to the built-ins.
    let ls = cimctl(&cim, &["ls", "--json"]).await?;
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout)?;
    let rows = v.as_array().context("ls --json prints an array")?;
    let names: Vec<String> = rows
        .iter()
        .map(|r| format!("{}@{}", r["name"].as_str().unwrap_or(""), r["version"].as_str().unwrap_or("")))
        .collect();
    for want in [
        "greeter@1.0.0",
        "greeter@1.10.0",
        "text-normalize@1.0.0",
        "content-sniff@1.0.0",
        "crc32@1.0.0",
        "identity@1.0.0",
    ] {
        assert!(names.contains(&want.to_string()), "{want} missing from {names:?}");
    }
    assert!(
        rows.iter().all(|r| r["digest"].as_str().is_some_and(|d| d.starts_with("sha256:")) && r["state"] == "ready"),
        "{v}"
    );

    // The built-ins work through cimctl invoke (stdin in, stdout out).
    let mut child = Command::new(bin("cimctl"))
        .args(["plugin", "invoke", "--capability", "text.normalize", "--meta", "case=lower", "--nats-url", cim.url()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"  Hello   WORLD \r\n\r\n\r\nBye\t").await?;
    }
    let out = child.wait_with_output().await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello world\n\nbye\n");
    let sniff = route(
        &client,
        InvokeRequest { capability: "content.sniff".into(), input: b"%PDF-1.7 ...".to_vec(), ..Default::default() },
    )
    .await?;
    assert_eq!(sniff.output, b"application/pdf");
    let crc = route(&client, by_name("crc32", "1.0.0", b"123456789")).await?;
    assert_eq!((crc.output.as_slice(), crc.metadata["size"].as_str()), (&b"cbf43926"[..], "9"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_plugins_fail_with_their_reason_and_the_host_keeps_serving() -> Result<()> {
    let cim = start_host(&["--plugin-max-memory", "8MiB", "--plugin-max-fuel", "100000000000"]).await?;
    let client = cim.client().clone();
    let alive = || async {
        let r = direct(&client, "identity", "1.0.0", b"still here").await?;
        anyhow::ensure!(status(&r) == Status::Ok && r.output == b"still here", "identity failed: {}", message(&r));
        Ok(())
    };

    push_ok(&cim, &body("unreachable"), "trap", "1.0.0", &[]).await?;
    let r = direct(&client, "trap", "1.0.0", b"").await?;
    assert_eq!(status(&r), Status::Trapped);
    assert!(message(&r).contains("unreachable"), "{}", message(&r));
    alive().await?;

    // CPU: fuel runs out long before the deadline.
    push_ok(&cim, &body("(loop (br 0)) (i32.const 0)"), "spin", "1.0.0", &["--fuel", "50000000"]).await?;
    let r = direct(&client, "spin", "1.0.0", b"").await?;
    assert_eq!(status(&r), Status::OutOfFuel, "{}", message(&r));
    alive().await?;

    // Wall clock: plenty of fuel, a 300 ms deadline.
    push_ok(&cim, &body("(loop (br 0)) (i32.const 0)"), "forever", "1.0.0", &["--timeout-ms", "300"]).await?;
    let r = direct(&client, "forever", "1.0.0", b"").await?;
    assert_eq!(status(&r), Status::DeadlineExceeded, "{}", message(&r));
    // The caller's deadline can only shorten it.
    let mut req = by_name("forever", "1.0.0", b"");
    req.timeout_ms = 100;
    let t = std::time::Instant::now();
    assert_eq!(status(&route(&client, req).await?), Status::DeadlineExceeded);
    assert!(t.elapsed() < Duration::from_millis(290), "{:?}", t.elapsed());
    alive().await?;

    // Memory: grows until refused, then crashes the way allocators abort.
    let hog = body("(block (loop (br_if 1 (i32.eq (memory.grow (i32.const 16)) (i32.const -1))) (br 0))) unreachable");
    push_ok(&cim, &hog, "hog", "1.0.0", &["--memory", "2097152"]).await?;
    let r = direct(&client, "hog", "1.0.0", b"").await?;
    assert_eq!(status(&r), Status::OutOfMemory, "{}", message(&r));
    assert!(message(&r).contains("2097152"), "{}", message(&r));
    // A manifest cannot ask for more than the operator allows.
    let greedy = push(&cim, &body("(i32.const 0)"), "greedy", "1.0.0", &["--memory", "1073741824"]).await?;
    assert!(
        String::from_utf8_lossy(&greedy.stderr).contains("allows at most"),
        "{}",
        String::from_utf8_lossy(&greedy.stderr)
    );
    alive().await?;

    // Malformed output: a range outside its memory.
    let badout = r#"(module (import "cim" "output" (func $out (param i32 i32))) (memory (export "memory") 1)
      (func (export "cim_invoke") (result i32) (call $out (i32.const 65000) (i32.const 4096)) (i32.const 0)))"#;
    push_ok(&cim, badout, "badout", "1.0.0", &[]).await?;
    let r = direct(&client, "badout", "1.0.0", b"").await?;
    assert_eq!(status(&r), Status::MalformedOutput);
    assert!(message(&r).contains("outside the plugin's 65536-byte memory"), "{}", message(&r));
    alive().await?;

    // Not WebAssembly at all, a module without the ABI, and no network for WebAssembly.
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm but not really")?;
    let out = cimctl(&cim, &["push", &junk.to_string_lossy(), "--name", "junk", "--version", "1"]).await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a valid webassembly module"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let noabi = push(&cim, r#"(module (memory (export "memory") 1))"#, "noabi", "1", &[]).await?;
    assert!(
        String::from_utf8_lossy(&noabi.stderr).contains("cim_invoke"),
        "{}",
        String::from_utf8_lossy(&noabi.stderr)
    );
    let net = push(&cim, &body("(i32.const 0)"), "net", "1", &["--network"]).await?;
    assert!(String::from_utf8_lossy(&net.stderr).contains("network"), "{}", String::from_utf8_lossy(&net.stderr));
    let fs = push(&cim, &body("(i32.const 0)"), "fs", "1", &["--dir", "data"]).await?;
    assert!(
        String::from_utf8_lossy(&fs.stderr).contains("--plugin-dir data=PATH"),
        "{}",
        String::from_utf8_lossy(&fs.stderr)
    );
    alive().await?;

    // Everything failed cleanly in one process that is still the same one.
    let host = cim.service(C);
    assert!(host.log().contains("serving"), "{}", host.log());
    let s = stats(&client).await?;
    assert!(s.failed >= 6, "{s:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invocations_run_in_parallel_up_to_the_limit_and_saturation_is_refused() -> Result<()> {
    let cim = start_host(&["--plugin-parallelism", "2", "--plugin-queue", "2"]).await?;
    let client = cim.client().clone();
    push_ok(&cim, SLEEPY_WAT, "sleepy", "1.0.0", &[]).await?;

    // Four at once: two run, two wait their turn, all succeed.
    let calls: Vec<_> = (0..4).map(|_| route(&client, sleep_request("sleepy", 300))).collect();
    for r in futures::future::join_all(calls).await {
        let r = r?;
        assert_eq!(status(&r), Status::Ok, "{}", message(&r));
    }
    let s = stats(&client).await?;
    assert_eq!(s.peak_running, 2, "{s:?}");

    // Ten at once: at most two run and two queue; the rest are refused at once as saturated.
    let calls: Vec<_> = (0..10).map(|_| route(&client, sleep_request("sleepy", 500))).collect();
    let replies: Vec<InvokeReply> = futures::future::join_all(calls).await.into_iter().collect::<Result<_>>()?;
    let ok = replies.iter().filter(|r| status(r) == Status::Ok).count();
    let busy: Vec<&InvokeReply> = replies.iter().filter(|r| status(r) == Status::Unavailable).collect();
    assert_eq!(ok + busy.len(), 10, "{replies:?}");
    assert!(ok >= 4 && !busy.is_empty(), "{ok} ok, {} refused", busy.len());
    assert!(message(busy[0]).contains("saturated"), "{}", message(busy[0]));
    let s = stats(&client).await?;
    assert_eq!(s.peak_running, 2, "{s:?}");
    assert!(s.rejected >= 1, "{s:?}");
    // Saturation passes: the host serves again.
    assert_eq!(status(&route(&client, sleep_request("sleepy", 1)).await?), Status::Ok);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_host_serves_the_same_plugins() -> Result<()> {
    let mut cim = start_host(&[]).await?;
    let client = cim.client().clone();
    push_ok(&cim, &constant("persisted"), "keeper", "2.0.0", &["--capability", "test.keep"]).await?;
    let before = list(&client).await?;
    assert_eq!(direct(&client, "keeper", "2.0.0", b"").await?.output, b"persisted");
    let host = cim.service_mut(C);
    assert!(host.terminate(Duration::from_secs(20)).await?.success(), "{}", host.log());

    host.restart().await?;
    cim.wait_ready(0).await?;
    let r = direct(&client, "keeper", "2.0.0", b"").await?;
    assert_eq!((status(&r), r.output.as_slice()), (Status::Ok, &b"persisted"[..]), "{}", message(&r));
    let cap = route(&client, InvokeRequest { capability: "test.keep".into(), ..Default::default() }).await?;
    assert_eq!(cap.output, b"persisted");
    let after = list(&client).await?;
    let digests = |l: &ListReply| {
        l.plugins.iter().map(|p| (p.name.clone(), p.version.clone(), p.digest.clone())).collect::<Vec<_>>()
    };
    assert_eq!(digests(&before), digests(&after));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_referenced_version_cannot_be_removed() -> Result<()> {
    let cim = start_host(&[]).await?;
    let client = cim.client().clone();
    push_ok(&cim, &constant("in use"), "stepper", "1.0.0", &[]).await?;

    // What the pipeline engine writes when a pipeline step uses stepper@1.0.0.
    let js = async_nats::jetstream::new(client.clone());
    let refs = js.get_key_value(resources::kv_bucket(C, plugin::KV_REFERENCES)?).await?;
    let key = plugin::reference_key("stepper", "1.0.0", "pipeline-ingest")?;
    let reference = PluginReference {
        plugin: "stepper".into(),
        version: "1.0.0".into(),
        referrer: "pipeline-ingest".into(),
        detail: "step normalize of ingest v3".into(),
    };
    refs.put(key.as_str(), reference.encode_to_vec().into()).await?;

    let out = cimctl(&cim, &["rm", "stepper@1.0.0"]).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("referenced by pipeline-ingest (step normalize of ingest v3)") && err.contains("409"),
        "{err}"
    );
    assert_eq!(direct(&client, "stepper", "1.0.0", b"").await?.output, b"in use");

    refs.delete(key.as_str()).await?;
    let out = cimctl(&cim, &["rm", "stepper@1.0.0"]).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gone = route(&client, by_name("stepper", "1.0.0", b"")).await?;
    assert_eq!(status(&gone), Status::NotFound, "{}", message(&gone));
    // The retention guard: with no verified archive of the artifacts bucket, the removed
    // module's bytes stay in JetStream (storage.rs proves they go once the archive is verified).
    let artifacts = js.get_object_store(plugin::ARTIFACTS_BUCKET).await?;
    let object = plugin::artifact_object("stepper", "1.0.0")?;
    assert!(!artifacts.info(&object).await?.deleted, "the module was deleted before its archive was verified");
    let host = cim.service(C);
    assert!(host.log().contains("module of a removed version kept until its archive is verified"), "{}", host.log());
    // The version number stays bound to its digest after removal.
    let other = push(&cim, &constant("new bytes"), "stepper", "1.0.0", &[]).await?;
    assert!(String::from_utf8_lossy(&other.stderr).contains("immutable"), "{}", String::from_utf8_lossy(&other.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn native_and_webassembly_plugins_serve_the_same_request_shape() -> Result<()> {
    let cim = start_host(&[]).await?;
    let client = cim.client().clone();
    let _native = Command::new(bin("plugin-native-example"))
        .args(["--nats-url", cim.url(), "--announce-ms", "200"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;

    // One request, two runtimes, one reply shape.
    let mut req = InvokeRequest { input: b"123456789".to_vec(), ..Default::default() };
    req.metadata.insert("encoding".into(), "hex".into());
    let native = eventually(Duration::from_secs(30), "native plugin answers", || async {
        let r = call(&client, plugin::invoke_subject("sha256", "1.0.0")?, &req).await?;
        anyhow::ensure!(status(&r) == Status::Ok, "{}", message(&r));
        Ok(r)
    })
    .await?;
    let wasm = call(&client, plugin::invoke_subject("crc32", "1.0.0")?, &req).await?;
    assert_eq!(
        String::from_utf8(native.output.clone())?,
        "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
    );
    assert_eq!(native.metadata["size"], "9");
    assert_eq!((wasm.output.as_slice(), wasm.metadata["size"].as_str()), (&b"cbf43926"[..], "9"));

    // Garbage gets the same kind of answer from both.
    for subject in [plugin::invoke_subject("sha256", "1.0.0")?, plugin::invoke_subject("crc32", "1.0.0")?] {
        let m = client.request(subject.clone(), vec![0xff, 0xff, 0xff].into()).await?;
        let r = InvokeReply::decode(m.payload)?;
        assert_eq!(status(&r), Status::BadRequest, "{subject}");
        assert!(m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).is_some(), "{subject}");
    }

    // The host sees the native plugin announce itself and routes to it by capability.
    let routed = eventually(Duration::from_secs(30), "host routes to the native plugin", || async {
        let r = route(
            &client,
            InvokeRequest { capability: "checksum.sha256".into(), input: b"abc".to_vec(), ..Default::default() },
        )
        .await?;
        anyhow::ensure!(status(&r) == Status::Ok, "{}", message(&r));
        Ok(r)
    })
    .await?;
    assert_eq!(routed.runtime, "native");
    assert_eq!(String::from_utf8(routed.output)?, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let l = list(&client).await?;
    assert!(
        l.plugins.iter().any(|p| p.name == "sha256" && p.runtime == "native" && p.digest.starts_with("sha256:")),
        "{l:?}"
    );
    Ok(())
}

/// Only identities the operator lists serve a plugin name: a native plugin's identity (the
/// `native_plugins` template of `nixos-modules/nats-permissions.json`, for `sha256`) serves
/// `sha256`, reached directly and routed by the plugin host under its own identity, but the same
/// credentials cannot announce or serve another plugin's name (here `forged`).
#[tokio::test(flavor = "multi_thread")]
async fn a_native_plugin_identity_serves_only_its_own_plugin_name() -> Result<()> {
    let cim = CimFixture::builder().generated_permissions().service(Svc::new(C).own_identity()).start().await?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixos-modules/nats-permissions.json");
    let generated: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let t = &generated["native_plugins"];
    let placeholder = t["placeholder"].as_str().context("placeholder")?;
    let mut perms = cim_testkit::Permissions::all().allow_responses();
    for s in t["publish"]["allow"].as_array().context("publish")? {
        perms = perms.allow_publish(s.as_str().context("entry")?.replace(placeholder, "sha256"));
    }
    for s in t["subscribe"]["allow"].as_array().context("subscribe")? {
        perms = perms.allow_subscribe(s.as_str().context("entry")?.replace(placeholder, "sha256"));
    }
    let (creds, key) = cim.user("plugin-sha256", perms)?;
    let serve = |name: &str| {
        Command::new(bin("plugin-native-example"))
            .args(["--nats-url", cim.url(), "--announce-ms", "200", "--name", name])
            .arg("--nats-creds")
            .arg(&creds)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    let _own = serve("sha256")?;
    let _foreign = serve("forged")?;
    let client = cim.client().clone();
    let input = InvokeRequest { input: b"abc".to_vec(), ..Default::default() };
    eventually(Duration::from_secs(30), "the native sha256 answers", || async {
        let r = call(&client, plugin::invoke_subject("sha256", "1.0.0")?, &input).await?;
        anyhow::ensure!(status(&r) == Status::Ok, "{}", message(&r));
        Ok(())
    })
    .await?;
    let routed = eventually(Duration::from_secs(30), "the host routes to it by capability", || async {
        let r = route(&client, InvokeRequest { capability: "checksum.sha256".into(), ..input.clone() }).await?;
        anyhow::ensure!(status(&r) == Status::Ok, "{}", message(&r));
        Ok(r)
    })
    .await?;
    assert_eq!(routed.runtime, "native");
    // The same credentials serving `forged`: the server refuses its announcements and its
    // subscription, so nobody reaches it and the host never lists it.
    let log_path = cim.server().log_path().to_path_buf();
    eventually(Duration::from_secs(30), "the foreign announce and subscription refused", || async {
        let log = std::fs::read_to_string(&log_path)?;
        let refused = |what: &str, subject: &str| {
            log.lines().any(|l| l.contains(&key) && l.contains(what) && l.contains(subject))
        };
        anyhow::ensure!(
            refused("Publish Violation", &plugin::announce_subject("forged", "1.0.0")?)
                && refused("Subscription Violation", &plugin::invoke_subject("forged", "1.0.0")?),
            "not yet"
        );
        Ok(())
    })
    .await?;
    let foreign = client.request(plugin::invoke_subject("forged", "1.0.0")?, input.encode_to_vec().into()).await;
    assert!(foreign.is_err(), "someone answered as forged");
    let l = list(&client).await?;
    assert!(!l.plugins.iter().any(|p| p.name == "forged" && p.runtime == "native"), "{l:?}");
    Ok(())
}
