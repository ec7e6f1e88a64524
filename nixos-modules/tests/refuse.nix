# Definitions the options must refuse, and a few they must accept: evaluates one case, e.g.
#   nix-instantiate --eval --strict --json nixos-modules/tests/refuse.nix --argstr case maxInFlightZero
# A refused case fails the evaluation with the module system's message (the integration test
# checks the message); an accepted one prints the unit's environment.
{
  case,
  lib ? import ./stub/lib.nix,
}:

let
  nixpkgs = import ./stub/nixpkgs.nix { inherit lib; };
  pkg = nixpkgs.fakePkg "cim-under-test";

  registry = def: [
    ../registry.nix
    {
      system.stateVersion = "26.05";
      services.cim.registry = {
        enable = true;
        package = pkg;
      }
      // def;
    }
  ];
  plugins = def: [
    ../plugin-host.nix
    {
      system.stateVersion = "26.05";
      services.cim.plugin-host = {
        enable = true;
        package = pkg;
      }
      // def;
    }
  ];
  leaf = def: [
    ../nats-leaf.nix
    {
      system.stateVersion = "26.05";
      services.cim.nats-leaf = {
        enable = true;
      }
      // def;
    }
  ];
  auth = def: [
    ../nats-auth.nix
    ../nats-leaf.nix
    {
      system.stateVersion = "26.05";
      services.cim.nats-leaf.enable = true;
      services.cim.nats-auth = {
        enable = true;
      }
      // def;
    }
  ];

  cases = {
    # refused
    unknownOption = registry { maxInflight = 8; };
    maxInFlightZero = registry { maxInFlight = 0; };
    cpuWeightTooHigh = registry { cpuWeight = 10001; };
    shutdownGraceNegative = registry { shutdownGrace = -1; };
    credentialsAsNixPath = registry { natsCredentialsFile = ./refuse.nix; };
    credentialsInStore = registry { natsCredentialsFile = "${builtins.storeDir}/00000000000000000000000000000000-creds"; };
    credentialsRelative = registry { natsCredentialsFile = "keys/registry.creds"; };
    environmentFileInStore = registry { environmentFile = "${builtins.storeDir}/00000000000000000000000000000000-env"; };
    nodeWithDot = registry { node = "a.b"; };
    domainWithWildcard = registry { jetstreamDomain = "leaf*"; };
    heartbeatWithSpace = registry { heartbeatInterval = "5 s"; };
    tierUnknown = registry { tier = "edge"; };
    leafPortOutOfRange = leaf { port = 70000; };
    leafUnknownOption = leaf { jetstreamDomain = "leaf"; };
    authUnknownService = auth { services.nope.passwordHash = "$2b$04$UxnifOpOCx8IV7NujGs93OaMEqMMgIAPfD./EEXJHlfFlEOsHye2."; };
    pluginMemoryWords = plugins { maxMemory = "lots"; };
    pluginParallelismZero = plugins { parallelism = 0; };
    authPlaintextPassword = auth { services.registry.passwordHash = "hunter2"; };

    # accepted
    acceptsCredentialsPath = registry { natsCredentialsFile = "/run/keys/registry.creds"; };
    acceptsNode = registry { node = "leaf-1_a"; };
    acceptsHeartbeatMs = registry { heartbeatInterval = "250ms"; };
    acceptsLimits = registry {
      maxInFlight = 65536;
      cpuWeight = 10000;
      shutdownGrace = 1;
    };
    acceptsPluginLimits = plugins {
      parallelism = 2;
      maxMemory = "16MiB";
      allowedDirectories.models = "/var/lib/models";
    };
    acceptsAuth = auth { services.registry.passwordHash = "$2b$04$UxnifOpOCx8IV7NujGs93OaMEqMMgIAPfD./EEXJHlfFlEOsHye2."; };
  };

  config = (nixpkgs.nixos.eval cases.${case}).config;
in
{
  units = lib.mapAttrs (_: s: { inherit (s) environment serviceConfig; }) config.systemd.services;
  nats = config.services.nats.settings;
}
