# NixOS module for the CIM pipeline-engine service: services.cim.pipeline-engine (see ./service.nix
# for the options every service has; the engine's own are below, see docs/pipelines.md).
import ./service.nix {
  name = "pipeline-engine";
  description = "event-triggered, durable pipelines";
  httpPort = 9703;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
    in
    {
      maxRuns = mkOption {
        type = types.ints.between 1 100000;
        default = 16;
        description = "Most runs this instance works on at once, over all pipelines (`CIM_PIPELINE_MAX_RUNS`).";
      };
      maxContent = mkOption {
        type = types.ints.positive;
        default = 67108864;
        description = "Largest unit content (bytes) a step may read into memory (`CIM_PIPELINE_MAX_CONTENT`).";
      };
      ackWait = mkOption {
        type = types.strMatching "[0-9]+(ms|s|m|h)";
        default = "10s";
        description = "How long a run stays with an instance that stopped confirming progress before another takes it over (`CIM_PIPELINE_ACK_WAIT`).";
      };
    };

  extraEnvironmentOf = lib: cfg: {
    CIM_PIPELINE_MAX_RUNS = toString cfg.maxRuns;
    CIM_PIPELINE_MAX_CONTENT = toString cfg.maxContent;
    CIM_PIPELINE_ACK_WAIT = cfg.ackWait;
  };
}
