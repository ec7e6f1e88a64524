{
  description = "CIM (Composable Information Machine): services, NixOS modules, NATS host profiles";

  # The workspace needs rustc >= 1.89 (Cargo.toml `rust-version`) and nats-server >= 2.12.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The seven services; `cimctl` (the CLI) is packaged too but has no module.
      serviceNames = import ./nixos-modules/service-names.nix;
      binaryNames = serviceNames ++ [ "cimctl" ];

      workspace = (lib.importTOML ./Cargo.toml).workspace.package;

      # Only what cargo needs, so that editing docs or Nix files rebuilds nothing.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./.cargo
          ./crates
          ./integration-tests
        ];
      };

      # One derivation per binary (`cargo build -p <name>`), so that a host or container pulls
      # in only the binaries it runs. Each compiles the shared dependencies again, and any
      # change to the sources rebuilds them all; crane could share the dependency build, at
      # the cost of another input.
      mkCimPackage =
        pkgs: pname: cargoPackages:
        pkgs.rustPlatform.buildRustPackage {
          inherit pname src;
          inherit (workspace) version;
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = lib.concatMap (p: [
            "-p"
            p
          ]) cargoPackages;

          # The protobuf schemas are compiled by protox (Rust) in the build scripts: no protoc.

          # The tests need real servers (nats-server, an S3 server) and run in .ci/run, not
          # in the build sandbox.
          doCheck = false;

          meta = {
            description = "CIM ${pname}";
            license = lib.licenses.asl20;
            platforms = lib.platforms.linux;
          }
          // lib.optionalAttrs (lib.length cargoPackages == 1) { mainProgram = pname; };
        };

      cimPackages =
        pkgs:
        lib.genAttrs binaryNames (name: mkCimPackage pkgs name [ name ])
        // {
          # All eight binaries from one cargo invocation (the shared dependencies compile once).
          default = mkCimPackage pkgs "cim" binaryNames;
        };

      # nixosModules.<service>: the plain module from nixos-modules/ with `package` defaulting
      # to this flake's build for the host's platform. The keys let the module system import
      # each only once, however many outputs (default, containers) pull it in.
      serviceModule =
        name:
        { pkgs, ... }:
        {
          key = "cim-flake#nixosModules.${name}";
          _file = ./flake.nix;
          imports = [ ./nixos-modules/${name}.nix ];
          services.cim.${name}.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.${name};
        };

      # The example hubs' addresses (placeholders: put your nodes' addresses here).
      clusterAddresses = [
        "10.0.0.11"
        "10.0.0.12"
        "10.0.0.13"
      ];

      # The example hosts are x86_64-linux; nothing in the modules depends on that.
      mkHost =
        hostModule:
        lib.nixosSystem {
          modules = [
            { nixpkgs.hostPlatform = "x86_64-linux"; }
            self.nixosModules.default
            ./nixos-modules/hosts/common.nix
            hostModule
            (
              { pkgs, ... }:
              {
                environment.systemPackages = [ self.packages.${pkgs.stdenv.hostPlatform.system}.cimctl ];
              }
            )
          ];
        };
    in
    {
      packages = forAllSystems cimPackages;

      nixosModules =
        lib.genAttrs serviceNames serviceModule
        // {
          nats-leaf = ./nixos-modules/nats-leaf.nix;
          nats-cluster-node = ./nixos-modules/nats-cluster-node.nix;
          nats-auth = ./nixos-modules/nats-auth.nix;

          # Every service module (all off until enabled), both NATS profiles and the
          # per-service NATS users.
          default = {
            key = "cim-flake#nixosModules.default";
            imports = map (name: self.nixosModules.${name}) serviceNames ++ [
              self.nixosModules.nats-leaf
              self.nixosModules.nats-cluster-node
              self.nixosModules.nats-auth
            ];
          };

          # One nixos-container per service on this host (containers/); each is off until
          # `cim.containers.<name>.enable`.
          containers = {
            imports = [
              self.nixosModules.default
              ./containers
            ];
          };
        };

      nixosConfigurations =
        {
          leaf = mkHost (import ./nixos-modules/hosts/leaf.nix { hubAddresses = clusterAddresses; });
        }
        // lib.listToAttrs (
          lib.imap1 (index: _: {
            name = "cluster-node-${toString index}";
            value = mkHost (
              import ./nixos-modules/hosts/cluster-node.nix {
                inherit index;
                addresses = clusterAddresses;
              }
            );
          }) clusterAddresses
        );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.cargo-nextest
            # protoc: only `cargo xtask codegen` (the Python package's *_pb2.py) runs it
            pkgs.protobuf
            pkgs.nats-server
          ];
          # cim-testkit runs this nats-server (>= 2.12, cim-proc's MIN_NATS_SERVER).
          CIM_NATS_SERVER = lib.getExe pkgs.nats-server;
        };
      });

      # Every package builds, and on x86_64-linux the NixOS VM tests in nixos-modules/tests/vm.nix
      # boot a leaf with all services and a three-node hub with a leaf attached (needs KVM).
      checks = forAllSystems (
        pkgs:
        self.packages.${pkgs.stdenv.hostPlatform.system}
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") (
          import ./nixos-modules/tests/vm.nix { inherit pkgs self; }
        )
      );
    };
}
