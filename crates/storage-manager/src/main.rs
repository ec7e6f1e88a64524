//! The `storage-manager` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: storage_manager::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(storage_manager::COMPONENT, &config.common, storage_manager::run)
}
