//! The `information-unit` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: information_unit::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(information_unit::COMPONENT, &config.common, information_unit::run)
}
