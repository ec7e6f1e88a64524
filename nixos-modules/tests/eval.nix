# Evaluates the CIM modules and the flake's wiring against ./stubs.nix (real nixpkgs lib,
# stand-ins for NixOS and nixpkgs packages). Run through ./check.sh, which writes the
# rendered units and nats configs out and checks them with systemd-analyze and nats-server.
{
  # nixpkgs' lib, e.g. `import /path/to/nixpkgs/lib`.
  lib,
  # A directory with bin/<service> to stand in for the packages in ExecStart=.
  pkgDir,
  natsHasHostOption ? false,
}:

let
  repo = ../..;
  stubs = import ./stubs.nix { inherit lib natsHasHostOption; };
  render = import ./render.nix { inherit lib; };
  names = import ../service-names.nix;

  pkg = {
    type = "derivation";
    name = "cim-under-test";
    outPath = pkgDir;
  };
  packages.services.cim = lib.genAttrs names (_: { package = pkg; });
  hubAddresses = [
    "10.0.0.11"
    "10.0.0.12"
    "10.0.0.13"
  ];

  leaf = stubs.eval [
    ../.
    ../hosts/common.nix
    (import ../hosts/leaf.nix { inherit hubAddresses; })
    packages
    {
      services.cim.registry.natsCredentialsFile = "/run/keys/cim-registry.creds";
      services.cim.nats-leaf.hubCredentialsFile = "/run/keys/cim-leaf-hub.creds";
    }
  ];

  clusterNode =
    index:
    stubs.eval [
      ../.
      ../hosts/common.nix
      (import ../hosts/cluster-node.nix {
        inherit index;
        addresses = hubAddresses;
      })
      packages
    ];

  # A leaf host whose services all run in containers (none on the host itself).
  containerHost = stubs.eval [
    (repo + "/containers")
    ../hosts/common.nix
    (import ../hosts/leaf.nix { hubAddresses = [ ]; })
    packages
    { cim.containers = lib.genAttrs names (_: { enable = true; }); }
    { cim.containers.storage-manager.natsCredentialsFile = "/run/keys/cim-storage-manager.creds"; }
    { services.cim = lib.genAttrs names (_: { enable = lib.mkForce false; }); }
  ];

  # The flake's outputs with a stand-in nixpkgs input: real lib, stub packages,
  # nixosSystem = the stub evaluation. Checks names and wiring, builds nothing.
  flake =
    let
      mkPkgs = system: {
        stdenv.hostPlatform.system = system;
        rustPlatform.buildRustPackage =
          args: stubs.fakePkg "${args.pname}-${args.version}" // { inherit args; };
        mkShell = args: args;
      }
      // lib.genAttrs [
        "protobuf"
        "cargo"
        "rustc"
        "clippy"
        "rustfmt"
        "cargo-nextest"
        "nats-server"
      ] stubs.fakePkg;
      nixpkgs = {
        lib = lib // {
          nixosSystem = args: stubs.eval args.modules;
        };
        legacyPackages = lib.genAttrs [
          "x86_64-linux"
          "aarch64-linux"
        ] mkPkgs;
      };
      self = (import (repo + "/flake.nix")).outputs { inherit self nixpkgs; };
      # nixosModules.containers next to nixosModules.default, as a host would import them:
      # the module keys must make the second import a no-op.
      containersFromFlake = stubs.eval [
        self.nixosModules.containers
        self.nixosModules.default
        ../hosts/common.nix
        {
          services.cim.nats-leaf.enable = true;
          cim.containers.registry.enable = true;
        }
      ];
    in
    {
      packages = lib.mapAttrs (
        _:
        lib.mapAttrs (
          _: p: {
            inherit (p) name;
            cargoBuildFlags = p.args.cargoBuildFlags;
            mainProgram = p.args.meta.mainProgram or null;
          }
        )
      ) self.packages;
      nixosModules = lib.attrNames self.nixosModules;
      nixosConfigurations = lib.mapAttrs (_: host: {
        units = lib.attrNames host.config.systemd.services;
        registryExecStart = host.config.systemd.services.cim-registry.serviceConfig.ExecStart;
        systemPackages = map (p: p.name) host.config.environment.systemPackages;
      }) self.nixosConfigurations;
      checks = lib.mapAttrs (_: lib.attrNames) self.checks;
      devShell = map (p: p.name) self.devShells.x86_64-linux.default.packages;
      containerRegistryExecStart =
        containersFromFlake.config.containers.cim-registry.config.systemd.services.cim-registry.serviceConfig.ExecStart;
    };

  # Definitions the options must refuse (true = refused, as wanted) or accept (false).
  refused =
    let
      try =
        def:
        let
          r = stubs.eval [
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
          env = r.config.systemd.services.cim-registry.environment;
        in
        !(builtins.tryEval (builtins.deepSeq env env)).success;
    in
    lib.mapAttrs (_: try) {
      credentialsAsNixPath = {
        natsCredentialsFile = ./stubs.nix;
      };
      credentialsInStore = {
        natsCredentialsFile = "/nix/store/00000000000000000000000000000000-creds";
      };
      credentialsRelative = {
        natsCredentialsFile = "keys/registry.creds";
      };
      nodeWithDot = {
        node = "a.b";
      };
      domainWithWildcard = {
        jetstreamDomain = "leaf*";
      };
      heartbeatWithSpace = {
        heartbeatInterval = "5 s";
      };
      tierUnknown = {
        tier = "edge";
      };
      maxInFlightZero = {
        maxInFlight = 0;
      };
    }
    // lib.mapAttrs (_: def: !(try def)) {
      acceptsCredentialsPath = {
        natsCredentialsFile = "/run/keys/registry.creds";
      };
      acceptsNode = {
        node = "leaf-1_a";
      };
      acceptsHeartbeatMs = {
        heartbeatInterval = "250ms";
      };
    };
in
{
  systems = {
    leaf = render.system leaf.config;
    cluster-node-1 = render.system (clusterNode 1).config;
    cluster-node-2 = render.system (clusterNode 2).config;
    cluster-node-3 = render.system (clusterNode 3).config;
    containers-host = render.system containerHost.config;
  }
  // lib.mapAttrs' (
    name: c: lib.nameValuePair "container-${name}" (render.system c.config)
  ) containerHost.config.containers;

  containers = lib.mapAttrs (_: c: {
    inherit (c)
      autoStart
      privateNetwork
      hostAddress
      localAddress
      bindMounts
      ;
  }) containerHost.config.containers;
  containerHostFirewall = containerHost.config.networking.firewall.interfaces;
  clusterFirewall = (clusterNode 1).config.networking.firewall.allowedTCPPorts;

  inherit flake refused;
}
