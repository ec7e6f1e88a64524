//! The `plugin-host` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: plugin_host::Config = cim_runtime::parse_or_exit();
    let common = config.common.clone();
    cim_runtime::service_main(plugin_host::COMPONENT, &common, move |settings, shutdown| {
        plugin_host::run(config, settings, shutdown)
    })
}
