//! The `integration-hub` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: integration_hub::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(integration_hub::COMPONENT, &config.common, integration_hub::run)
}
