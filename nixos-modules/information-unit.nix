# NixOS module for the CIM information-unit service: services.cim.information-unit (see
# ./service.nix for the options every service has; its own are below, see
# docs/information-units.md, "Collection").
import ./service.nix {
  name = "information-unit";
  description = "content-addressed, versioned, linked units on JetStream";
  httpPort = 9701;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
      duration = types.strMatching "[0-9]+(ms|s|m|h)";
    in
    {
      orphanGrace = mkOption {
        type = duration;
        default = "1h";
        description = "Uploads never committed and chunks of interrupted uploads younger than this are kept (`CIM_IU_ORPHAN_GRACE`).";
      };
      contentRetention = mkOption {
        type = duration;
        default = "168h";
        description = "Content no live unit references is kept at least this long (`CIM_IU_CONTENT_RETENTION`).";
      };
      collectInterval = mkOption {
        type = duration;
        default = "5m";
        description = "How often the collection rules run (`CIM_IU_COLLECT_INTERVAL`).";
      };
    };

  extraEnvironmentOf = _lib: cfg: {
    CIM_IU_ORPHAN_GRACE = cfg.orphanGrace;
    CIM_IU_CONTENT_RETENTION = cfg.contentRetention;
    CIM_IU_COLLECT_INTERVAL = cfg.collectInterval;
  };
}
