//! Generates the gRPC server and client of `proto/cim/gateway/v1/gateway.proto` (tonic), reusing
//! the information-unit messages of `cim-events`, and the descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cim/gateway/v1/gateway.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gateway_descriptor.bin"))
        .extern_path(".cim.iu.v1", "::cim_events::proto::iu")
        .compile_protos(&[proto], &["proto", "../cim-events/proto"])?;
    Ok(())
}
