//! The `plugin-host` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: plugin_host::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(plugin_host::COMPONENT, &config.common, plugin_host::run)
}
