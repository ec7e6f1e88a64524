//! The `registry` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: registry::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(registry::COMPONENT, &config.common, registry::run)
}
