//! The `pipeline-engine` binary: `cim_runtime::service_main` with this service's `Args`.

fn main() -> std::process::ExitCode {
    cim_runtime::service_main::<pipeline_engine::Args>()
}
