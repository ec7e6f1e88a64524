//! Generates the protobuf payload types from `proto/` with prost-build, the `.proto` files
//! parsed by protox (a protobuf compiler in Rust): building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
    // What `protoc --include_imports --include_source_info` gives prost-build: every file with
    // its imports, comments kept (they become the generated types' doc comments).
    let descriptors = protox::compile(protos, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
