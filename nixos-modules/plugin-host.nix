# NixOS module for the CIM plugin-host service: services.cim.plugin-host (see ./service.nix for
# the options every service has; the plugin host's own are below, see docs/plugins.md).
import ./service.nix {
  name = "plugin-host";
  description = "sandboxed WebAssembly and native plugins";
  httpPort = 9704;
  # wasmtime compiles plugins to machine code at load time: it needs writable-then-executable
  # pages, so this unit runs without MemoryDenyWriteExecute.
  needsJit = true;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
    in
    {
      parallelism = mkOption {
        type = types.nullOr (types.ints.between 1 1024);
        default = null;
        description = "WebAssembly invocations run at once (`CIM_PLUGIN_PARALLELISM`); null: one per core.";
      };
      queue = mkOption {
        type = types.ints.between 0 1000000;
        default = 256;
        description = "Invocations that may wait for a slot before new ones are refused as saturated (`CIM_PLUGIN_QUEUE`).";
      };
      maxMemory = mkOption {
        type = types.strMatching "[0-9]+(B|KiB|MiB|GiB)?";
        default = "64MiB";
        description = "Most linear memory a plugin may have (`CIM_PLUGIN_MAX_MEMORY`).";
      };
      maxFuel = mkOption {
        type = types.ints.positive;
        default = 10000000000;
        description = "Most fuel (roughly instructions) one invocation may use (`CIM_PLUGIN_MAX_FUEL`).";
      };
      maxTimeout = mkOption {
        type = types.strMatching "[0-9]+(ms|s|m|h)";
        default = "10s";
        description = "Longest wall-clock deadline of one invocation (`CIM_PLUGIN_MAX_TIMEOUT`).";
      };
      allowedDirectories = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = {
          models = "/var/lib/models";
        };
        description = "Host directories plugins may ask to read, mounted read-only at /NAME (`CIM_PLUGIN_DIRS`); none by default.";
      };
    };

  extraEnvironmentOf =
    lib: cfg:
    {
      CIM_PLUGIN_QUEUE = toString cfg.queue;
      CIM_PLUGIN_MAX_MEMORY = cfg.maxMemory;
      CIM_PLUGIN_MAX_FUEL = toString cfg.maxFuel;
      CIM_PLUGIN_MAX_TIMEOUT = cfg.maxTimeout;
    }
    // lib.optionalAttrs (cfg.parallelism != null) { CIM_PLUGIN_PARALLELISM = toString cfg.parallelism; }
    // lib.optionalAttrs (cfg.allowedDirectories != { }) {
      CIM_PLUGIN_DIRS = builtins.concatStringsSep "," (
        lib.mapAttrsToList (name: path: "${name}=${path}") cfg.allowedDirectories
      );
    };
}
