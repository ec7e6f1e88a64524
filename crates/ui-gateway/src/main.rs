//! The `ui-gateway` binary: parse configuration, then hand over to the library's `run_with`.

fn main() -> std::process::ExitCode {
    let config: ui_gateway::Config = cim_runtime::parse_or_exit();
    let gateway = config.gateway.clone();
    cim_runtime::service_main(ui_gateway::COMPONENT, &config.common, move |settings, shutdown| {
        ui_gateway::run_with(settings, gateway, shutdown)
    })
}
