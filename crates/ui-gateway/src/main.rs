//! The `ui-gateway` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: ui_gateway::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(ui_gateway::COMPONENT, &config.common, ui_gateway::run)
}
