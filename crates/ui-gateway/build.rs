//! Generates the gRPC server and client of `proto/cim/gateway/v1/gateway.proto` (tonic; the
//! file is parsed by protox, so no `protoc` is needed), reusing the information-unit messages
//! of `cim-events`, and the descriptor set for server reflection; and the list of the web UI's
//! files (`src/ui/dist`, built from `ui/` and committed) that the binary embeds.

use std::{fs, path::Path};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cim/gateway/v1/gateway.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let includes = ["proto", "../cim-events/proto"];
    // protox (a protobuf compiler in Rust) writes the descriptor set, so building needs no
    // `protoc`: with imports and comments, as `protoc --include_imports --include_source_info`
    // would. tonic then generates from that file (`skip_protoc_run`), by the same path as
    // when it ran protoc itself.
    let descriptors = out.join("gateway_descriptor.bin");
    let mut compiler = protox::Compiler::new(includes)?;
    compiler.include_imports(true).include_source_info(true).open_files([proto])?;
    fs::write(&descriptors, compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .skip_protoc_run()
        .extern_path(".cim.iu.v1", "::cim_events::proto::iu")
        .compile_protos(&[proto], &includes)?;
    ui_bundle(&out)
}

/// Writes `ui_bundle.rs`: `FILES`, every file of the bundle as (URL path, contents), sorted.
fn ui_bundle(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let dist = Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("src/ui/dist");
    println!("cargo:rerun-if-changed=src/ui/dist");
    if !dist.join("index.html").is_file() {
        return Err(format!("{} has no index.html: run `npm --prefix ui run build`", dist.display()).into());
    }
    let mut files = Vec::new();
    walk(&dist, &dist, &mut files)?;
    files.sort();
    let mut code = String::from("/// The web UI's files: (URL path, contents), sorted by path.\n");
    code.push_str("pub static FILES: &[(&str, &[u8])] = &[\n");
    for (url, path) in files {
        code.push_str(&format!("    ({url:?}, include_bytes!({path:?})),\n"));
    }
    code.push_str("];\n");
    fs::write(out.join("ui_bundle.rs"), code)?;
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), Box<dyn std::error::Error>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else {
            let rel =
                path.strip_prefix(root)?.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>();
            out.push((format!("/{}", rel.join("/")), path.to_string_lossy().into_owned()));
        }
    }
    Ok(())
}
