//! The `registry` binary: `cim_runtime::service_main` with this service's `Args`.

fn main() -> std::process::ExitCode {
    cim_runtime::service_main::<registry::Args>()
}
