//! The `registry` binary: parse configuration, then hand over to the library's `run_with`.

fn main() -> std::process::ExitCode {
    let config: registry::Config = cim_runtime::parse_or_exit();
    let args = config.registry.clone();
    cim_runtime::service_main(registry::COMPONENT, &config.common, move |settings, shutdown| {
        registry::run_with(settings, args, shutdown)
    })
}
