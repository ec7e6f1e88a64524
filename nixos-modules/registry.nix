# NixOS module for the CIM registry service: services.cim.registry (see ./service.nix for the
# options every service has; the registry's own are below, see docs/registry.md).
import ./service.nix {
  name = "registry";
  description = "who runs where: services, plugins, nodes";
  httpPort = 9702;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
    in
    {
      missedBeats = mkOption {
        type = types.ints.between 1 1000;
        default = 3;
        description = "An instance is marked lost after this many of its heartbeat intervals without a beat (`CIM_REGISTRY_MISSED_BEATS`).";
      };
      minTtl = mkOption {
        type = types.strMatching "[0-9]+(ms|s|m|h)";
        default = "1s";
        description = "... but never sooner than this after its last beat (`CIM_REGISTRY_MIN_TTL`).";
      };
    };

  extraEnvironmentOf = _lib: cfg: {
    CIM_REGISTRY_MISSED_BEATS = toString cfg.missedBeats;
    CIM_REGISTRY_MIN_TTL = cfg.minTtl;
  };
}
