//! The `information-unit` binary: parse configuration, then hand over to the library's `run_with`.

fn main() -> std::process::ExitCode {
    let config: information_unit::Config = cim_runtime::parse_or_exit();
    let iu = config.iu.clone();
    cim_runtime::service_main(information_unit::COMPONENT, &config.common, move |settings, shutdown| {
        information_unit::run_with(settings, iu, shutdown)
    })
}
