//! The `pipeline-engine` binary: parse configuration, then hand over to the library's `run`.

fn main() -> std::process::ExitCode {
    let config: pipeline_engine::Config = cim_runtime::parse_or_exit();
    cim_runtime::service_main(pipeline_engine::COMPONENT, &config.common, pipeline_engine::run)
}
