//! The `integration-hub` binary: parse configuration, then hand over to the library's `run_with`.

fn main() -> std::process::ExitCode {
    let config: integration_hub::Config = cim_runtime::parse_or_exit();
    // A configuration file that does not load is bad configuration: one line, exit 64.
    if let Some(path) = &config.hub.config
        && let Err(e) = integration_hub::config::load(path)
    {
        eprintln!("integration-hub: {e}");
        return std::process::ExitCode::from(cim_runtime::EXIT_CONFIG as u8);
    }
    let hub = config.hub.clone();
    cim_runtime::service_main(integration_hub::COMPONENT, &config.common, move |settings, shutdown| {
        integration_hub::run_with(settings, hub, shutdown)
    })
}
