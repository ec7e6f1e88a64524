//! The `storage-manager` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: storage_manager::Config = cim_runtime::parse_or_exit();
    let (targets, archive) = match config.archive() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("storage-manager: {e}");
            return std::process::ExitCode::from(cim_runtime::EXIT_CONFIG as u8);
        }
    };
    let leaves = config.source_leaves.clone();
    cim_runtime::service_main(storage_manager::COMPONENT, &config.common, move |settings, shutdown| {
        storage_manager::run_with(settings, targets, archive, leaves, shutdown)
    })
}
