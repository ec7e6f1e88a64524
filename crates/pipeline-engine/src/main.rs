//! The `pipeline-engine` binary: parse configuration, then hand over to the library's `run_with`.

fn main() -> std::process::ExitCode {
    let config: pipeline_engine::Config = cim_runtime::parse_or_exit();
    if config.engine.max_runs == 0 {
        eprintln!("pipeline-engine: --pipeline-max-runs must be at least 1");
        return std::process::ExitCode::from(cim_runtime::EXIT_CONFIG as u8);
    }
    let engine = config.engine.clone();
    cim_runtime::service_main(pipeline_engine::COMPONENT, &config.common, move |settings, shutdown| {
        pipeline_engine::run_with(settings, engine, shutdown)
    })
}
