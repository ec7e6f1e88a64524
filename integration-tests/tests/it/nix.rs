//! The Nix deployment (`flake.nix`, `nixos-modules/`, `containers/`), checked on a machine
//! without nixpkgs: Debian's `nix-instantiate` evaluates the files against our own stand-in
//! lib and NixOS options (`nixos-modules/tests/stub/`), and real tools check what comes out:
//! `systemd-analyze verify` the units, `nats-server -t` the NATS configs, real nats-servers
//! (a 3-node hub and a leaf) the topology and each service's NATS identity, a real service
//! binary that it runs with its generated permissions. See docs/deploy.md for what remains
//! unverified (building with nixpkgs, NixOS VM tests, containers).
//!
//! Golden files: `nixos-modules/tests/golden/`; `CIM_BLESS=1` rewrites them (and the
//! generated `nixos-modules/nats-permissions.json`) after a reviewed change.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use cim_events::{Component, Tier, resources, subject};
use futures::StreamExt;
use serde_json::Value;

use crate::common;
use crate::fixture::{CimFixture, Svc};

/// The committed generated permissions of one service (nixos-modules/nats-permissions.json).
fn generated_permissions(service: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("nixos-modules/nats-permissions.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["services"][service].clone()
}

/// What every package's store path is replaced by in the golden units.
const FAKE_PKG: &str = "/nix/store/00000000000000000000000000000000-cim-under-test";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn tests_dir() -> PathBuf {
    repo().join("nixos-modules/tests")
}

fn bless() -> bool {
    std::env::var_os("CIM_BLESS").is_some_and(|v| v == "1")
}

/// A tool CI installs (`.ci/run`); missing, the test fails with the hint.
fn tool(name: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH; install it: {install}"))
}

/// `nix-instantiate` on the `dummy://` store: evaluation only, so it needs no writable
/// /nix (and copies nothing anywhere).
fn nix_instantiate() -> Command {
    let mut cmd = Command::new(tool("nix-instantiate", "apt-get install -y nix-bin"));
    cmd.args(["--store", "dummy://"]);
    cmd
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// `nix-instantiate --eval --strict --json FILE --argstr k v ...`; the error carries stderr.
fn nix_eval(file: &str, args: &[(&str, &str)]) -> Result<Value> {
    let mut cmd = nix_instantiate();
    cmd.args(["--eval", "--strict", "--json"]).arg(tests_dir().join(file));
    for (k, v) in args {
        cmd.args(["--argstr", k, v]);
    }
    let out = run(&mut cmd)?;
    ensure!(out.status.success(), "nix-instantiate {file} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn eval_default(extra: &[(&str, &str)]) -> Result<Value> {
    let mut args = vec![("pkgDir", FAKE_PKG)];
    args.extend_from_slice(extra);
    nix_eval("eval.nix", &args)
}

fn service_names() -> Vec<&'static str> {
    Component::ALL.iter().map(|c| c.service_name()).collect()
}

/// A directory `bin/<service>` → the real binaries in target/<profile>, standing in for the
/// packages in ExecStart=.
fn package_dir(dir: &Path) -> Result<PathBuf> {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("bin"))?;
    for name in service_names() {
        std::os::unix::fs::symlink(common::bin(name), pkg.join("bin").join(name))?;
    }
    Ok(pkg)
}

#[test]
fn nix_every_file_parses() {
    let root = repo();
    let mut files = vec![root.join("flake.nix")];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "nix") {
                out.push(p);
            }
        }
    }
    walk(&root.join("nixos-modules"), &mut files);
    walk(&root.join("containers"), &mut files);
    files.sort();
    assert!(files.len() >= 30, "only {} .nix files found", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let out = run(nix_instantiate().arg("--parse").arg(f)).unwrap();
        if !out.status.success() {
            failed.push(format!("{}: {}", f.display(), String::from_utf8_lossy(&out.stderr)));
        }
    }
    assert!(failed.is_empty(), "{} of {} .nix files do not parse:\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn nix_flake_outputs_evaluate_with_stand_in_inputs() {
    let v = eval_default(&[]).unwrap();
    let flake = &v["flake"];
    let mut binaries = service_names();
    binaries.push("cimctl");
    for system in ["x86_64-linux", "aarch64-linux"] {
        let packages = flake["packages"][system].as_object().unwrap();
        let mut want: Vec<&str> = binaries.clone();
        want.push("default");
        want.sort();
        assert_eq!(packages.keys().map(String::as_str).collect::<Vec<_>>(), want, "{system}");
        for name in &binaries {
            let p = &packages[*name];
            assert_eq!(p["cargoBuildFlags"], serde_json::json!(["-p", name]), "{system} {name}");
            assert_eq!(p["mainProgram"], *name);
            assert_eq!(p["cargoLock"], true, "{name}: cargoLock.lockFile is ./Cargo.lock");
            assert_eq!(p["doCheck"], false);
        }
        let all: Vec<String> = binaries.iter().flat_map(|b| ["-p".to_string(), b.to_string()]).collect();
        assert_eq!(packages["default"]["cargoBuildFlags"], serde_json::json!(all));
        // Every package is a check; on x86_64-linux the NixOS VM tests are too.
        let mut checks: Vec<&str> =
            flake["checks"][system].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        checks.sort();
        let mut want_checks = want.clone();
        if system == "x86_64-linux" {
            want_checks.extend(["vm-cluster", "vm-leaf"]);
            want_checks.sort();
        }
        assert_eq!(checks, want_checks, "{system}");
    }
    let modules: Vec<&str> = flake["nixosModules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    for m in service_names().into_iter().chain(["nats-leaf", "nats-cluster-node", "nats-auth", "default", "containers"])
    {
        assert!(modules.contains(&m), "nixosModules.{m} missing: {modules:?}");
    }
    let hosts = flake["nixosConfigurations"].as_object().unwrap();
    assert_eq!(hosts.keys().collect::<Vec<_>>(), ["cluster-node-1", "cluster-node-2", "cluster-node-3", "leaf"]);
    for (name, host) in hosts {
        let units = host["units"].as_array().unwrap();
        assert_eq!(units.len(), 8, "{name}: seven services and nats: {units:?}");
        assert!(
            host["registryExecStart"].as_str().unwrap().ends_with("-registry-0.1.0/bin/registry"),
            "{name}: {host}"
        );
        assert_eq!(host["systemPackages"], serde_json::json!(["cimctl-0.1.0"]));
    }
    assert!(flake["containerRegistryExecStart"].as_str().unwrap().ends_with("-registry-0.1.0/bin/registry"));
    assert!(flake["devShell"].as_array().unwrap().contains(&Value::from("nats-server")));
}

/// Everything eval.nix renders, as files: `<system>/<unit>.service`, `<system>/nats.json`,
/// `flake.json`, `hosts.json`.
fn rendered_files(v: &Value) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for (system, s) in v["systems"].as_object().unwrap() {
        for (unit, text) in s["units"].as_object().unwrap() {
            files.insert(format!("{system}/{unit}.service"), text.as_str().unwrap().to_string());
        }
        if let Some(nats) = s["nats"].as_str() {
            let pretty: Value = serde_json::from_str(nats).unwrap();
            files.insert(format!("{system}/nats.json"), serde_json::to_string_pretty(&pretty).unwrap() + "\n");
        }
    }
    files.insert("flake.json".into(), serde_json::to_string_pretty(&v["flake"]).unwrap() + "\n");
    files.insert("hosts.json".into(), serde_json::to_string_pretty(&v["hosts"]).unwrap() + "\n");
    files
}

fn read_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    walk(root, root, &mut out);
    out
}

#[test]
fn nix_modules_render_the_golden_units_and_nats_configs() {
    let v = eval_default(&[]).unwrap();
    // nixpkgs versions differ in whether services.nats has a `host` option: same result.
    let out = run(nix_instantiate().args(["--eval", "--strict", "--json"]).arg(tests_dir().join("eval.nix")).args([
        "--argstr",
        "pkgDir",
        FAKE_PKG,
        "--arg",
        "natsHasHostOption",
        "true",
    ]))
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let with_host: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["systems"], with_host["systems"], "output differs when services.nats has a `host` option");

    let files = rendered_files(&v);
    let golden = tests_dir().join("golden");
    if bless() {
        let _ = std::fs::remove_dir_all(&golden);
        for (rel, text) in &files {
            let p = golden.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        return;
    }
    let committed = read_tree(&golden);
    let missing: Vec<&String> = files.keys().filter(|k| !committed.contains_key(*k)).collect();
    let extra: Vec<&String> = committed.keys().filter(|k| !files.contains_key(*k)).collect();
    let mut differ = Vec::new();
    for (rel, text) in &files {
        if let Some(old) = committed.get(rel)
            && old != text
        {
            let (a, b) = old.lines().zip(text.lines()).find(|(a, b)| a != b).unwrap_or(("(length)", "(length)"));
            differ.push(format!("{rel}: golden `{a}`, now `{b}`"));
        }
    }
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "rendered output differs from nixos-modules/tests/golden (review, then CIM_BLESS=1 to accept):\nnew: {missing:?}\ngone: {extra:?}\nchanged:\n{}",
        differ.join("\n")
    );
    // What the golden files must show in any case.
    let unit = &files["leaf-auth/cim-registry.service"];
    for line in [
        "EnvironmentFile=/run/keys/cim-registry.env",
        "MemoryMax=256M",
        "CPUWeight=100",
        "DynamicUser=true",
        "NoNewPrivileges=true",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.lines().any(|l| l == line), "cim-registry.service lacks {line}:\n{unit}");
    }
    assert!(files["leaf/cim-registry.service"].contains("LoadCredential=nats.creds:/run/keys/cim-registry.creds"));
    // Archive targets: each credentials file is a credential of its own, and the spec names it
    // in the credentials directory (%d), never at its host path.
    let unit = &files["leaf/cim-storage-manager.service"];
    for line in [
        "LoadCredential=nats.creds:/run/keys/cim-storage-manager.creds",
        "LoadCredential=archive-nas:/run/keys/cim-archive-nas",
        "LoadCredential=archive-wasabi:/run/keys/cim-archive-wasabi",
        "Environment=\"CIM_ARCHIVE_TARGETS=name=nas,endpoint=http://nas.local:9000,region=us-east-1,bucket=cim,prefix=leaf1,path-style=true,credentials-file=%d/archive-nas;name=wasabi,endpoint=https://s3.eu-central-1.wasabisys.com,region=eu-central-1,bucket=cim-archive,path-style=false,credentials-file=%d/archive-wasabi\"",
        "Environment=\"CIM_ARCHIVE_REQUIRED=nas\"",
        "Environment=\"CIM_ARCHIVE_PART_BYTES=16777216\"",
    ] {
        assert!(unit.lines().any(|l| l == line), "cim-storage-manager.service lacks {line}:\n{unit}");
    }
    assert!(!unit.contains("credentials-file=/run/keys"), "a host path in the spec:\n{unit}");
    assert!(
        files["cluster-node-1/cim-storage-manager.service"]
            .lines()
            .any(|l| l == "Environment=\"CIM_SOURCE_LEAVES=leaf\"")
    );
    let unit = &files["leaf/cim-integration-hub.service"];
    for line in [
        "LoadCredential=hub-config:/etc/cim/hub.json",
        "LoadCredential=secret-shop:/run/keys/cim-hub-shop",
        "Environment=\"CIM_HUB_CONFIG=%d/hub-config\"",
        "Environment=\"CIM_HUB_WEBHOOK_LISTEN=0.0.0.0:8470\"",
    ] {
        assert!(unit.lines().any(|l| l == line), "cim-integration-hub.service lacks {line}:\n{unit}");
    }

    // Containers: the service's own options reach the unit inside, and every host file that
    // unit loads with LoadCredential= is bind-mounted read-only at the same path.
    let mounts = &v["hosts"]["containers"];
    let unit = &files["container-cim-storage-manager/cim-storage-manager.service"];
    for line in [
        "LoadCredential=nats.creds:/run/cim/nats.creds",
        "LoadCredential=archive-nas:/run/keys/cim-archive-nas",
        "LoadCredential=archive-wasabi:/run/keys/cim-archive-wasabi",
        "Environment=\"CIM_ARCHIVE_REQUIRED=nas\"",
    ] {
        assert!(unit.lines().any(|l| l == line), "the container's cim-storage-manager.service lacks {line}:\n{unit}");
    }
    assert!(
        unit.contains("credentials-file=%d/archive-nas;") && !unit.contains("credentials-file=/run/keys"),
        "{unit}"
    );
    let unit = &files["container-cim-integration-hub/cim-integration-hub.service"];
    for line in [
        "LoadCredential=hub-config:/etc/cim/hub.json",
        "LoadCredential=secret-shop:/run/keys/cim-hub-shop",
        "Environment=\"CIM_HUB_CONFIG=%d/hub-config\"",
    ] {
        assert!(unit.lines().any(|l| l == line), "the container's cim-integration-hub.service lacks {line}:\n{unit}");
    }
    let read_only = |container: &str, inside: &str, host: &str| {
        let m = &mounts[container]["bindMounts"][inside];
        assert_eq!(m["hostPath"], host, "{container}: bind mount {inside}: {m}");
        assert_eq!(m["isReadOnly"], true, "{container}: bind mount {inside}: {m}");
    };
    read_only("cim-storage-manager", "/run/cim/nats.creds", "/run/keys/cim-storage-manager.creds");
    read_only("cim-storage-manager", "/run/keys/cim-archive-nas", "/run/keys/cim-archive-nas");
    read_only("cim-storage-manager", "/run/keys/cim-archive-wasabi", "/run/keys/cim-archive-wasabi");
    read_only("cim-integration-hub", "/etc/cim/hub.json", "/etc/cim/hub.json");
    read_only("cim-integration-hub", "/run/keys/cim-hub-shop", "/run/keys/cim-hub-shop");
    read_only("cim-plugin-host", "/var/lib/models", "/var/lib/models");
    read_only("cim-registry", "/run/cim/service.env", "/run/keys/cim-registry.env");
    // Every LoadCredential= path inside any container is one of its bind mounts.
    for (rel, unit) in files.iter().filter(|(k, _)| k.starts_with("container-cim-")) {
        let container = rel.split('/').next().unwrap().strip_prefix("container-").unwrap();
        for path in unit.lines().filter_map(|l| l.strip_prefix("LoadCredential=")).map(|c| c.split_once(':').unwrap().1)
        {
            assert!(
                mounts[container]["bindMounts"][path].is_object(),
                "{rel} loads {path}, which {container} does not mount"
            );
        }
    }
    // The registry's own options and caps inside; its container's unit on the host follows
    // them (plus room for the container's own processes).
    let unit = &files["container-cim-registry/cim-registry.service"];
    for line in [
        "MemoryMax=1G",
        "CPUWeight=200",
        "Environment=\"CIM_REGISTRY_MISSED_BEATS=5\"",
        "Environment=\"CIM_REGISTRY_MIN_TTL=2s\"",
    ] {
        assert!(unit.lines().any(|l| l == line), "the container's cim-registry.service lacks {line}:\n{unit}");
    }
    let unit = &files["containers-host/container@cim-registry.service"];
    assert!(unit.lines().any(|l| l == "MemoryMax=1152M") && unit.lines().any(|l| l == "CPUWeight=200"), "{unit}");
    let unit = &files["containers-host/container@cim-storage-manager.service"];
    assert!(unit.lines().any(|l| l == "MemoryMax=384M") && unit.lines().any(|l| l == "CPUWeight=100"), "{unit}");
}

#[test]
fn nix_options_refuse_bad_definitions() {
    let refused = [
        ("unknownOption", "The option `services.cim.registry.maxInflight' does not exist"),
        ("leafUnknownOption", "The option `services.cim.nats-leaf.jetstreamDomain' does not exist"),
        ("authUnknownService", "The option `services.cim.nats-auth.services.nope' does not exist"),
        ("maxInFlightZero", "`services.cim.registry.maxInFlight' is not of type `integer between 1 and 65536"),
        ("cpuWeightTooHigh", "`services.cim.registry.cpuWeight' is not of type `integer between 1 and 10000"),
        ("shutdownGraceNegative", "`services.cim.registry.shutdownGrace' is not of type `positive integer"),
        ("leafPortOutOfRange", "`services.cim.nats-leaf.port' is not of type `16 bit unsigned integer"),
        (
            "credentialsAsNixPath",
            "`services.cim.registry.natsCredentialsFile' is not of type `null or absolute non-store path",
        ),
        (
            "credentialsInStore",
            "`services.cim.registry.natsCredentialsFile' is not of type `null or absolute non-store path",
        ),
        (
            "credentialsRelative",
            "`services.cim.registry.natsCredentialsFile' is not of type `null or absolute non-store path",
        ),
        (
            "environmentFileInStore",
            "`services.cim.registry.environmentFile' is not of type `null or absolute non-store path",
        ),
        ("nodeWithDot", "`services.cim.registry.node' is not of type `null or string matching"),
        ("domainWithWildcard", "`services.cim.registry.jetstreamDomain' is not of type `null or string matching"),
        ("heartbeatWithSpace", "`services.cim.registry.heartbeatInterval' is not of type `string matching"),
        ("tierUnknown", "`services.cim.registry.tier' is not of type `one of \"leaf\", \"cluster\"'"),
        ("authPlaintextPassword", "`services.cim.nats-auth.services.registry.passwordHash' is not of type"),
        ("pluginMemoryWords", "`services.cim.plugin-host.maxMemory' is not of type `string matching"),
        (
            "pluginParallelismZero",
            "`services.cim.plugin-host.parallelism' is not of type `null or integer between 1 and 1024",
        ),
        ("registryMissedBeatsZero", "`services.cim.registry.missedBeats' is not of type `integer between 1 and 1000"),
        ("registryMinTtlWords", "`services.cim.registry.minTtl' is not of type `string matching"),
        (
            "archiveTargetNameWithDot",
            "`services.cim.storage-manager.archiveTargets.[1].name' is not of type `string matching",
        ),
        (
            "archiveEndpointWithoutScheme",
            "`services.cim.storage-manager.archiveTargets.[1].endpoint' is not of type `string matching",
        ),
        (
            "archiveBucketWithComma",
            "`services.cim.storage-manager.archiveTargets.[1].bucket' is not of type `string matching",
        ),
        (
            "archiveRegionWithPercent",
            "`services.cim.storage-manager.archiveTargets.[1].region' is not of type `string matching",
        ),
        (
            "archiveTargetUnknownKey",
            "The option `services.cim.storage-manager.archiveTargets.[1].colour' does not exist",
        ),
        (
            "archiveCredentialsInStore",
            "`services.cim.storage-manager.archiveTargets.[1].credentialsFile' is not of type `null or absolute non-store path",
        ),
        (
            "archiveCredentialsAsNixPath",
            "`services.cim.storage-manager.archiveTargets.[1].credentialsFile' is not of type `null or absolute non-store path",
        ),
        ("archiveCredentialsFileAndEnv", "target `nas' sets both credentialsFile and credentialsEnv"),
        ("archiveTargetTwice", "archiveTargets: the name `nas' is used twice"),
        ("archiveRequiredUnknown", "archiveRequired: `wasabi' is not the name of one of archiveTargets"),
        (
            "archivePartBytesBelow5MiB",
            "`services.cim.storage-manager.archivePartBytes' is not of type `integer between 5242880 and 5368709120",
        ),
        (
            "archiveSegmentBytesTiny",
            "`services.cim.storage-manager.archiveSegmentBytes' is not of type `integer between 1024",
        ),
        ("archiveLingerWords", "`services.cim.storage-manager.archiveLinger' is not of type `string matching"),
        ("sourceLeafWithDot", "`services.cim.storage-manager.sourceLeaves.[1]' is not of type `string matching"),
        (
            "hubConfigInStore",
            "`services.cim.integration-hub.configFile' is not of type `null or absolute non-store path",
        ),
        ("hubConfigAndSettings", "services.cim.integration-hub: set settings or configFile, not both"),
        ("hubSettingsUnknownKey", "The option `services.cim.integration-hub.settings.webhook' does not exist"),
        (
            "hubSettingsNixPath",
            "`services.cim.integration-hub.settings.webhooks.[1]' is not of type `attribute set of JSON values without Nix or store paths",
        ),
        (
            "hubSettingsStorePath",
            "`services.cim.integration-hub.settings.subscriptions.[1]' is not of type `attribute set of JSON values without Nix or store paths",
        ),
        (
            "hubSecretFileInStore",
            "`services.cim.integration-hub.secretFiles.shop' is not of type `absolute non-store path",
        ),
        ("hubSecretIdWithSlash", "secretFiles: `a/b' is not a credential ID"),
        ("containerServiceBadValue", "`services.cim.registry.maxInFlight' is not of type `integer between 1 and 65536"),
        ("containerServiceUnknownOption", "The option `services.cim.registry.maxInflight' does not exist"),
        (
            "containerArchiveCredentialsInStore",
            "`services.cim.storage-manager.archiveTargets.[1].credentialsFile' is not of type `null or absolute non-store path",
        ),
        (
            "containerHubConfigAsNixPath",
            "`services.cim.integration-hub.configFile' is not of type `null or absolute non-store path",
        ),
        (
            "containerHubSecretFileInStore",
            "`services.cim.integration-hub.secretFiles.shop' is not of type `absolute non-store path",
        ),
        ("containerServiceNatsUrl", "cim.containers.registry.service.natsUrl (in"),
        ("containerServiceCredentials", "set `cim.containers.registry.natsCredentialsFile`"),
        (
            "containerCredentialsInStore",
            "`cim.containers.registry.natsCredentialsFile' is not of type `null or absolute non-store path",
        ),
        ("containerMemoryMaxWords", "`cim.containers.registry.memoryMax' is not of type `null or string matching"),
        (
            "containerCpuWeightTooHigh",
            "`cim.containers.registry.cpuWeight' is not of type `integer between 1 and 10000",
        ),
    ];
    let mut wrong = Vec::new();
    for (case, message) in refused {
        match nix_eval("refuse.nix", &[("case", case)]) {
            Ok(v) => wrong.push(format!("{case}: accepted, evaluated to {v}")),
            Err(e) if !format!("{e:#}").contains(message) => {
                wrong.push(format!("{case}: refused, but not with {message:?}: {e:#}"))
            }
            Err(_) => {}
        }
    }
    for case in [
        "acceptsCredentialsPath",
        "acceptsNode",
        "acceptsHeartbeatMs",
        "acceptsLimits",
        "acceptsAuth",
        "acceptsPluginLimits",
        "acceptsArchiveTargets",
        "acceptsHubSettings",
        "acceptsContainerService",
    ] {
        if let Err(e) = nix_eval("refuse.nix", &[("case", case)]) {
            wrong.push(format!("{case}: refused: {e:#}"));
        }
    }
    // The plugin host's own options reach its environment, and it may JIT.
    let unit = &nix_eval("refuse.nix", &[("case", "acceptsPluginLimits")]).unwrap()["units"]["cim-plugin-host"];
    assert_eq!(unit["environment"]["CIM_PLUGIN_PARALLELISM"], "2");
    assert_eq!(unit["environment"]["CIM_PLUGIN_MAX_MEMORY"], "16MiB");
    assert_eq!(unit["environment"]["CIM_PLUGIN_DIRS"], "models=/var/lib/models");
    assert_eq!(unit["serviceConfig"]["MemoryDenyWriteExecute"], false);
    // Archive targets: a file credential and an environment one, the lists comma-separated.
    let unit = &nix_eval("refuse.nix", &[("case", "acceptsArchiveTargets")]).unwrap()["units"]["cim-storage-manager"];
    assert_eq!(
        unit["environment"]["CIM_ARCHIVE_TARGETS"],
        "name=nas,endpoint=http://nas.local:9000,region=us-east-1,bucket=cim,path-style=true,credentials-file=%d/archive-nas;\
         name=wasabi_2,endpoint=https://s3.eu-central-1.wasabisys.com/,region=eu-central-1,bucket=cim-archive,prefix=site/leaf1/,path-style=false,credentials-env=WASABI"
    );
    assert_eq!(unit["environment"]["CIM_ARCHIVE_REQUIRED"], "nas,wasabi_2");
    assert_eq!(unit["environment"]["CIM_ARCHIVE_PART_BYTES"], "5242880");
    assert_eq!(unit["environment"]["CIM_ARCHIVE_LINGER"], "500ms");
    assert_eq!(unit["environment"]["CIM_SOURCE_LEAVES"], "leaf,leaf-2");
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!(["nats.creds:/run/keys/storage.creds", "archive-nas:/run/keys/nas"])
    );
    // Hub settings become a file in the store that names its secrets; the secret file itself
    // is a credential.
    let v = nix_eval("refuse.nix", &[("case", "acceptsHubSettings")]).unwrap();
    let unit = &v["units"]["cim-integration-hub"];
    let config = unit["environment"]["CIM_HUB_CONFIG"].as_str().unwrap();
    assert!(config.starts_with("/nix/store/") && config.ends_with("-cim-integration-hub.json"), "{config}");
    assert_eq!(unit["serviceConfig"]["LoadCredential"], serde_json::json!(["secret-shop:/run/keys/hub-shop"]));
    assert_eq!(
        v["hubSettings"]["webhooks"][0]["secret_file"],
        "/run/credentials/cim-integration-hub.service/secret-shop"
    );
    assert_eq!(v["hubSettings"]["outbound_allow"], serde_json::json!(["10.0.0.0/8", "::1"]));
    assert_eq!(v["hubSettings"]["subscriptions"][0]["secret_env"], "CRM_SECRET");
    assert_eq!(v["hubSettings"]["mqtt"], serde_json::json!([]));
    // A container's service options: its archive targets' files are mounted and loaded, its
    // node name is its own, and with no memory cap inside the container has none either.
    let v = nix_eval("refuse.nix", &[("case", "acceptsContainerService")]).unwrap();
    let c = &v["containers"]["cim-storage-manager"];
    let unit = &c["units"]["cim-storage-manager"];
    assert_eq!(
        unit["serviceConfig"]["LoadCredential"],
        serde_json::json!(["nats.creds:/run/cim/nats.creds", "archive-nas:/run/keys/nas", "archive-usb:/run/keys/usb"])
    );
    for path in ["/run/keys/nas", "/run/keys/usb"] {
        assert_eq!(
            c["bindMounts"][path],
            serde_json::json!({"hostPath": path, "isReadOnly": true, "mountPoint": path})
        );
    }
    assert_eq!(c["bindMounts"]["/run/cim/nats.creds"]["hostPath"], "/run/keys/storage.creds");
    assert_eq!(unit["environment"]["CIM_NODE"], "leaf-1");
    assert_eq!(unit["serviceConfig"]["MemoryMax"], "infinity");
    assert_eq!(v["units"]["container@cim-storage-manager"]["serviceConfig"], serde_json::json!({"CPUWeight": 50}));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Runs `service` with exactly `env` (plus nothing else) and NATS unreachable: Ok once it
/// logs that it is starting (its configuration was accepted), Err with its output when it
/// exits first (a refused configuration exits 64).
fn starts_with_environment(service: &str, env: &BTreeMap<String, String>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path)?;
    let mut child =
        Command::new(common::bin(service)).env_clear().envs(env).stdout(log.try_clone()?).stderr(log).spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("starting service") {
            break Ok(());
        }
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!("{service} exited with {status}: {text}"));
        }
        if std::time::Instant::now() > deadline {
            break Err(anyhow::anyhow!("{service} neither started nor exited: {text}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// The environment a rendered unit gives its service, with %d (the credentials directory)
/// replaced by `creds`, NATS unreachable and any free health port.
fn unit_environment(unit: &Value, creds: &Path) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = unit["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().replace("%d", creds.to_str().unwrap())))
        .collect();
    env.insert("CIM_NATS_URL".into(), "nats://127.0.0.1:1".into());
    env.insert("CIM_HTTP_LISTEN".into(), "127.0.0.1:0".into());
    env.remove("CIM_NATS_CREDS");
    env
}

#[test]
fn nix_rendered_service_options_are_accepted_by_the_binaries() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("archive-nas"), "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
        .unwrap();

    // Archive targets, one with its credentials file in the credentials directory, one from
    // the environment (as the environmentFile would give it).
    let v = nix_eval("refuse.nix", &[("case", "acceptsArchiveTargets")]).unwrap();
    let mut env = unit_environment(&v["units"]["cim-storage-manager"], creds.path());
    env.insert("WASABI_ACCESS_KEY_ID".into(), "AK".into());
    env.insert("WASABI_SECRET_ACCESS_KEY".into(), "SK".into());
    starts_with_environment("storage-manager", &env).unwrap();
    // The check can fail: a required target that is not one, as the binary sees it.
    env.insert("CIM_ARCHIVE_REQUIRED".into(), "elsewhere".into());
    let e = starts_with_environment("storage-manager", &env).unwrap_err();
    assert!(format!("{e}").contains("exit status: 64"), "{e}");

    // The hub's settings as the file Nix writes, its secret file in the credentials directory.
    let v = nix_eval("refuse.nix", &[("case", "acceptsHubSettings")]).unwrap();
    std::fs::write(creds.path().join("secret-shop"), "whsec_c2VjcmV0LWtleS1vZi10aGUtc2hvcA==\n").unwrap();
    let settings = serde_json::to_string(&v["hubSettings"])
        .unwrap()
        .replace("/run/credentials/cim-integration-hub.service", creds.path().to_str().unwrap());
    let config = creds.path().join("hub.json");
    std::fs::write(&config, settings).unwrap();
    let mut env = unit_environment(&v["units"]["cim-integration-hub"], creds.path());
    env.insert("CIM_HUB_CONFIG".into(), config.to_str().unwrap().into());
    env.insert("CIM_HUB_WEBHOOK_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("CRM_SECRET".into(), "crm-secret".into());
    starts_with_environment("integration-hub", &env).unwrap();

    // The registry's own options, from the rendered leaf.
    let v = eval_default(&[]).unwrap();
    let unit = v["systems"]["leaf"]["units"]["cim-registry"].as_str().unwrap();
    let mut env = BTreeMap::new();
    for line in unit.lines() {
        if let Some(kv) = line.strip_prefix("Environment=\"").and_then(|l| l.strip_suffix('"'))
            && let Some((k, v)) = kv.split_once('=')
            && k.starts_with("CIM_REGISTRY_")
        {
            env.insert(k.to_string(), v.to_string());
        }
    }
    assert_eq!(env.len(), 2, "{unit}");
    env.insert("CIM_NATS_URL".into(), "nats://127.0.0.1:1".into());
    env.insert("CIM_HTTP_LISTEN".into(), "127.0.0.1:0".into());
    starts_with_environment("registry", &env).unwrap();
}

#[test]
fn nix_rendered_units_pass_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", "apt-get install -y systemd");
    let dir = tempfile::tempdir().unwrap();
    let pkg = package_dir(dir.path()).unwrap();
    let v = eval_default(&[("pkgDir", pkg.to_str().unwrap())]).unwrap();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (system, s) in v["systems"].as_object().unwrap() {
        let sys_dir = dir.path().join(system);
        std::fs::create_dir_all(&sys_dir).unwrap();
        let mut units = Vec::new();
        for (unit, text) in s["units"].as_object().unwrap() {
            if !unit.starts_with("cim-") {
                continue; // nats.service is nixpkgs' unit, stood in here
            }
            let path = sys_dir.join(format!("{unit}.service"));
            std::fs::write(&path, text.as_str().unwrap()).unwrap();
            units.push(path);
        }
        if units.is_empty() {
            continue;
        }
        checked += units.len();
        let out = run(Command::new(&analyze).args(["verify", "--man=no"]).args(&units)).unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || !said.trim().is_empty() {
            problems.push(format!("{system}: {said}"));
        }
    }
    assert!(checked >= 35, "only {checked} units rendered");
    assert!(problems.is_empty(), "systemd-analyze verify (any output is a warning):\n{}", problems.join("\n"));
}

#[test]
fn nix_rendered_nats_configs_pass_nats_server_test() {
    let nats = cim_testkit::nats_server_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v = eval_default(&[]).unwrap();
    let mut checked = Vec::new();
    for (system, s) in v["systems"].as_object().unwrap() {
        let Some(conf) = s["nats"].as_str() else { continue };
        let path = dir.path().join(format!("{system}.json"));
        std::fs::write(&path, conf).unwrap();
        let out = run(Command::new(&nats).arg("-c").arg(&path).arg("-t")).unwrap();
        assert!(
            out.status.success(),
            "nats-server -t {system}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(system.clone());
    }
    for want in ["leaf", "leaf-auth", "cluster-node-1", "cluster-node-2", "cluster-node-3", "containers-host"] {
        assert!(checked.contains(&want.to_string()), "no nats config for {want}: {checked:?}");
    }
}

#[test]
fn nix_nats_permissions_file_is_generated_from_cim_events() {
    let out = run(Command::new(common::bin("cimctl")).args(["deploy", "nats-permissions", "--json"])).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = repo().join("nixos-modules/nats-permissions.json");
    if bless() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with `cimctl deploy nats-permissions --json > {}` (or CIM_BLESS=1) and review the change",
        path.display(),
        path.display()
    );
    let v: Value = serde_json::from_str(&generated).unwrap();
    let services = v["services"].as_object().unwrap();
    assert_eq!(services.len(), 7);
    for c in Component::ALL {
        let p = &services[c.service_name()];
        let publish: Vec<&str> =
            p["publish"]["allow"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert!(publish.contains(&subject::events_of(c).as_str()), "{c}: {publish:?}");
        for other in Component::ALL.into_iter().filter(|o| *o != c) {
            assert!(!publish.contains(&subject::events_of(other).as_str()), "{c} may publish {other}'s events");
        }
    }
}

/// On a cluster node with per-service NATS users, the storage manager's user may keep the
/// mirrors of the leaves it sources (`sourceLeaves = [ "leaf" ]`): every mirror it creates is
/// granted, and no other user gets any.
#[test]
fn nix_cluster_storage_manager_user_may_keep_the_leaf_mirrors() {
    let path = tests_dir().join("golden/cluster-node-auth/nats.json");
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let users = conf["authorization"]["users"].as_array().unwrap();
    let publish_of = |name: &str| -> Vec<String> {
        let u = users.iter().find(|u| u["user"] == name).unwrap_or_else(|| panic!("no user {name}"));
        u["permissions"]["publish"]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let sm = publish_of(Component::StorageManager.service_name());
    for stream in cim_archive::archived_streams() {
        let cfg = cim_events::resources::leaf_mirror_config(&stream, "leaf", cim_events::Tier::Cluster).unwrap();
        for verb in ["CREATE", "INFO", "UPDATE"] {
            let needed = format!("$JS.API.STREAM.{verb}.{}", cfg.name);
            assert!(sm.contains(&needed), "storage-manager lacks {needed}");
        }
    }
    for c in Component::ALL.into_iter().filter(|c| *c != Component::StorageManager) {
        assert!(!publish_of(c.service_name()).iter().any(|s| s.contains("_FROM_")), "{c} may touch leaf mirrors");
    }
}

/// nats-server processes of the live test, SIGKILLed on drop.
struct Servers {
    children: Vec<(String, tokio::process::Child, PathBuf)>,
}

impl Servers {
    fn start(&mut self, label: &str, conf: &Path, log: PathBuf) -> Result<()> {
        let child = tokio::process::Command::new(cim_testkit::nats_server_binary()?)
            .arg("-c")
            .arg(conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting nats-server {label}"))?;
        self.children.push((label.to_string(), child, log));
        Ok(())
    }

    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(label, _, log)| {
                let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
                let tail: Vec<&str> = err.lines().rev().take(8).collect();
                format!("--- {label}:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn monitor_json(addr: &str, path: &str) -> Result<Value> {
    let r = cim_testkit::http_get(addr, path).await?;
    ensure!(r.status == 200, "GET {path}: {}", r.status);
    Ok(serde_json::from_slice(&r.body)?)
}

/// Connects as `user` and records every error the server sends (permission violations).
async fn connect_as(url: &str, user: &str, password: &str) -> Result<(async_nats::Client, Arc<Mutex<Vec<String>>>)> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting as {user}"))?;
    Ok((client, errors))
}

/// The example topology on loopback, rendered by the modules (nixos-modules/tests/live.nix):
/// three hub nodes form a JetStream cluster, the leaf connects to them, every server has one
/// user per service with the generated permissions, and the leaf logs in to the hub's leaf-node
/// port as `leaf`. Then a service identity cannot publish another service's events (nor
/// subscribe to its commands, nor touch its streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_live_topology_with_per_service_identities() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pkg = package_dir(dir.path())?;
    let port = cim_testkit::free_port;
    let mut ports = serde_json::Map::new();
    for i in 1..=3 {
        ports.insert(
            format!("node{i}"),
            serde_json::json!({"client": port(), "cluster": port(), "leafnode": port(), "monitor": port(), "http": port()}),
        );
    }
    ports.insert("leaf".into(), serde_json::json!({"client": port(), "monitor": port(), "http": port()}));
    let live = nix_eval(
        "live.nix",
        &[
            ("pkgDir", pkg.to_str().unwrap()),
            ("base", dir.path().join("store").to_str().unwrap()),
            ("portsJSON", &Value::Object(ports.clone()).to_string()),
        ],
    )?;
    let servers_names = ["node1", "node2", "node3", "leaf"];
    let mut servers = Servers { children: Vec::new() };
    for name in servers_names {
        let conf = dir.path().join(format!("{name}.json"));
        std::fs::write(&conf, live[name]["nats"].as_str().context("nats config")?)?;
        servers.start(name, &conf, dir.path().join(format!("{name}.log")))?;
    }
    let monitor = |name: &str| live[name]["monitor"].as_str().unwrap().to_string();
    let password = |user: &str| live["passwords"][user].as_str().unwrap().to_string();
    let url = |name: &str| format!("nats://127.0.0.1:{}", ports[name]["client"]);

    // The hub forms: every node routes to the two others and JetStream has a meta leader.
    cim_testkit::eventually(Duration::from_secs(60), "hub cluster formed", || async {
        for i in 1..=3 {
            let m = monitor(&format!("node{i}"));
            let routez = monitor_json(&m, "/routez").await?;
            let peers: std::collections::BTreeSet<String> = routez["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["remote_name"].as_str().map(String::from))
                .collect();
            ensure!(peers.len() == 2, "node{i} routes to {peers:?}");
            let jsz = monitor_json(&m, "/jsz").await?;
            ensure!(jsz["meta_cluster"]["leader"].as_str().is_some_and(|l| !l.is_empty()), "node{i}: no meta leader");
            ensure!(jsz["config"]["domain"] == "hub", "node{i}: domain {}", jsz["config"]["domain"]);
        }
        Ok(())
    })
    .await
    .with_context(|| servers.logs())?;
    // The leaf connects to the hub and keeps its own domain, fsyncing every write.
    cim_testkit::eventually(Duration::from_secs(60), "leaf connected to the hub", || async {
        let leafz = monitor_json(&monitor("leaf"), "/leafz").await?;
        ensure!(leafz["leafnodes"] == 1, "leaf has {} leaf connections", leafz["leafnodes"]);
        let mut on_hub = 0;
        for i in 1..=3 {
            on_hub += monitor_json(&monitor(&format!("node{i}")), "/leafz").await?["leafnodes"].as_u64().unwrap_or(0);
        }
        ensure!(on_hub == 1, "the hub sees {on_hub} leaf connections");
        let varz = monitor_json(&monitor("leaf"), "/varz").await?;
        ensure!(
            varz["jetstream"]["config"]["domain"] == "leaf",
            "leaf domain {}",
            varz["jetstream"]["config"]["domain"]
        );
        ensure!(
            varz["jetstream"]["config"]["sync_always"] == true,
            "leaf: sync_always {}",
            varz["jetstream"]["config"]["sync_always"]
        );
        Ok(())
    })
    .await
    .with_context(|| servers.logs())?;

    // Without a user, nothing; with a wrong password, nothing.
    ensure!(async_nats::connect(url("leaf")).await.is_err(), "anonymous client accepted");
    ensure!(connect_as(&url("leaf"), "registry", "wrong").await.is_err(), "wrong password accepted");

    // Every identity publishes one event of another service's, then one of its own. An
    // observer sees each service's own event and none of the others' (a connection's messages
    // arrive in order, so a forbidden one that got through would come first).
    let (admin, _) = connect_as(&url("leaf"), "admin", &password("admin")).await?;
    // `cim.evt.>`: every event of every component (one component's event filter, widened).
    let registry_events = subject::events_of(Component::Registry);
    let every_event =
        format!("{}>", registry_events.trim_end_matches(".>").trim_end_matches(Component::Registry.token()));
    let mut observed = admin.subscribe(every_event).await?;
    admin.flush().await?;
    let mut identities = Vec::new();
    for (i, c) in Component::ALL.into_iter().enumerate() {
        let other = Component::ALL[(i + 1) % Component::ALL.len()];
        let (client, errors) = connect_as(&url("leaf"), c.service_name(), &password(c.service_name())).await?;
        client.publish(subject::event(other, "unit", "forged", "created")?, "forged".into()).await?;
        client.publish(subject::event(c, "unit", "own", "created")?, "own".into()).await?;
        client.flush().await?;
        identities.push((c, other, client, errors));
    }
    let mut own = Vec::new();
    while own.len() < Component::ALL.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), observed.next())
            .await
            .with_context(|| format!("waiting for the services' own events; got {own:?}"))?
            .context("observer subscription closed")?;
        let parsed = subject::parse_event(&msg.subject)?;
        ensure!(msg.payload.as_ref() == b"own", "a forged event got through: {} ({:?})", msg.subject, msg.payload);
        own.push(parsed.component);
    }
    own.sort();
    ensure!(own == Component::ALL.to_vec(), "own events seen: {own:?}");
    for (c, other, _, errors) in &identities {
        let forbidden = subject::event(*other, "unit", "forged", "created")?;
        cim_testkit::eventually(Duration::from_secs(10), &format!("{c}: permission violation reported"), || async {
            let seen = errors.lock().unwrap().clone();
            ensure!(
                seen.iter().any(|e| e.contains("Permissions Violation") && e.contains(&forbidden)),
                "{c} got {seen:?}"
            );
            Ok(())
        })
        .await?;
    }

    // Nor may the registry listen to the information unit's commands, or touch its streams.
    let (registry_client, registry_errors) = connect_as(&url("leaf"), "registry", &password("registry")).await?;
    let _sub = registry_client.subscribe(subject::command(Component::InformationUnit, "create")?).await?;
    let admin_js = async_nats::jetstream::with_domain(admin.clone(), "leaf");
    let iu_events = resources::events_stream(Component::InformationUnit);
    admin_js.create_stream(iu_events.config(Tier::Leaf)).await?;
    let mut registry_js = async_nats::jetstream::with_domain(registry_client.clone(), "leaf");
    registry_js.set_timeout(Duration::from_secs(2));
    ensure!(registry_js.get_stream(&iu_events.name).await.is_err(), "registry read {}'s stream info", iu_events.name);
    ensure!(
        registry_js
            .publish(subject::event(Component::InformationUnit, "unit", "forged", "created")?, "x".into())
            .await?
            .await
            .is_err(),
        "registry stored an event in {}",
        iu_events.name
    );
    cim_testkit::eventually(Duration::from_secs(10), "registry's violations reported", || async {
        let seen = registry_errors.lock().unwrap().clone();
        let create = subject::command(Component::InformationUnit, "create")?;
        for what in [format!("Subscription to \"{create}\""), format!("STREAM.INFO.{}", iu_events.name)] {
            ensure!(
                seen.iter().any(|e| e.contains("Permissions Violation") && e.contains(what.as_str())),
                "no violation for {what}: {seen:?}"
            );
        }
        Ok(())
    })
    .await?;
    let info = admin_js.get_stream(&iu_events.name).await?.info().await?.state.messages;
    ensure!(info == 0, "{} holds {info} messages", iu_events.name);

    // The real storage manager on the hub, as its own user, keeps the R3 mirror of the leaf's
    // unit events: the generated leaf_mirrors permissions are enough to create it, and the
    // leaf's events reach it across the leaf node connection.
    let sm_user = Component::StorageManager.service_name();
    let sm_url = format!("nats://{sm_user}:{}@127.0.0.1:{}", password(sm_user), ports["node1"]["client"]);
    // ...and archives it to S3 with the same identity (the template's read permissions).
    let nas = cim_testkit::S3Server::start().await?;
    let nas_c = cim_archive::S3Client::new(cim_archive::Target {
        name: "nas".into(),
        endpoint: nas.endpoint(),
        region: nas.region().into(),
        bucket: "cim-archive".into(),
        prefix: "hub/".into(),
        path_style: true,
        credentials: cim_archive::Credentials::new(nas.access_key(), nas.secret_key()),
        signing_key_file: None,
    })?;
    nas_c.ensure_bucket().await?;
    let spec = format!(
        "name=nas,endpoint={},region={},bucket=cim-archive,path-style=true,prefix=hub/,credentials-env=NAS",
        nas.endpoint(),
        nas.region()
    );
    let sm_env = [
        ("CIM_JS_DOMAIN", "hub"),
        ("NAS_ACCESS_KEY_ID", nas.access_key()),
        ("NAS_SECRET_ACCESS_KEY", nas.secret_key()),
    ];
    let sm_args =
        ["--tier", "cluster", "--source-leaf", "leaf", "--archive-target", spec.as_str(), "--archive-linger", "50ms"];
    let sm = common::ServiceProc::start_with_env(Component::StorageManager, &sm_url, &sm_args, &sm_env)?;
    let (hub_admin, _) = connect_as(&url("node1"), "admin", &password("admin")).await?;
    common::wait_ready(&hub_admin, &sm).await?;
    admin_js
        .publish(subject::event(Component::InformationUnit, "unit", "u1", "created")?, "to the hub".into())
        .await?
        .await?;
    let hub_js = async_nats::jetstream::with_domain(hub_admin.clone(), "hub");
    let mirror = resources::leaf_mirror(&iu_events.name, "leaf")?;
    cim_testkit::eventually(Duration::from_secs(60), "the leaf's event in the hub's mirror", || async {
        let mut m = hub_js.get_stream(&mirror).await?;
        let info = m.info().await?;
        ensure!(
            info.state.messages == 1 && info.config.num_replicas == 3,
            "{} messages, R{}",
            info.state.messages,
            info.config.num_replicas
        );
        Ok(())
    })
    .await
    .with_context(|| sm.log())?;
    cim_testkit::eventually(Duration::from_secs(60), "the hub's mirror archived to S3", || async {
        let archived = cim_archive::archived_through(&nas_c, &mirror).await?;
        ensure!(archived == 1, "archived through {archived}");
        Ok(())
    })
    .await
    .with_context(|| sm.log())?;
    ensure!(!sm.log().contains("Permissions Violation") && !sm.log().contains("permissions violation"), "{}", sm.log());

    drop(servers);
    Ok(())
}

/// The real registry binary runs with exactly its generated permissions and becomes ready:
/// it provisions its streams through the JetStream API of a domain, serves describe and
/// `$SRV` requests, announces itself and exits 0 on SIGTERM, with no permission violation.
///
/// The services authenticate with a credentials file (`--nats-creds`, the modules'
/// `natsCredentialsFile`), so this runs nats-server in operator mode with a user JWT that
/// carries the generated lists. (The user/password identities of nats-auth.nix are checked
/// against a real server in `nix_live_topology_with_per_service_identities`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_registry_runs_with_its_generated_permissions() -> Result<()> {
    // The generated permissions answer requests (the fixture gives a service exactly those).
    ensure!(generated_permissions(Component::Registry.service_name())["allow_responses"] == true);
    let mut cim = CimFixture::builder()
        .generated_permissions()
        .service(Svc::new(Component::Registry).env("CIM_TIER", "leaf").own_identity())
        .start()
        .await?;
    let js = cim.js();
    for spec in resources::streams(Component::Registry) {
        let log = || cim.service(Component::Registry).log();
        js.get_stream(&spec.name).await.with_context(|| format!("{} not provisioned:\n{}", spec.name, log()))?;
    }
    let svc = cim.service_mut(Component::Registry);
    let status = svc.terminate(Duration::from_secs(30)).await?;
    let log = svc.log();
    ensure!(status.success(), "registry exited {status}:\n{log}");
    ensure!(
        !log.contains("Permissions Violation") && !log.contains("permissions violation"),
        "registry hit its permissions:\n{log}"
    );
    Ok(())
}
