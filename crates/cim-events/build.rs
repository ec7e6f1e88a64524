//! Generates the protobuf payload types from `proto/` with prost-build (needs `protoc`).

fn main() -> std::io::Result<()> {
    let protos = [
        "proto/cim/runtime/v1/runtime.proto",
        "proto/cim/runtime/v1/legacy.proto",
        "proto/cim/iu/v1/iu.proto",
        "proto/cim/registry/v1/registry.proto",
        "proto/cim/plugin/v1/plugin.proto",
        "proto/cim/hub/v1/hub.proto",
        "proto/cim/pipeline/v1/pipeline.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        // A clear reason beats prost-build's generic "could not find protoc".
        println!(
            "cargo:warning=protoc not found: install it with `apt-get install protobuf-compiler` \
             (Debian/Ubuntu) or enter `nix develop`"
        );
    }
    prost_build::Config::new().compile_protos(&protos, &["proto"])
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(bin)).find(|candidate| candidate.is_file()))
}
