# A stand-in for the flake input `nixpkgs` (no nixpkgs code): `lib` (./lib.nix plus a
# `nixosSystem` that evaluates ./nixos.nix's stand-in options), and `legacyPackages.<system>`
# with a stub builder: `rustPlatform.buildRustPackage` returns a derivation-shaped record of
# its arguments instead of building anything. Enough to evaluate flake.nix's outputs and
# check their names and wiring; nothing here compiles.
{
  lib ? import ./lib.nix,
  natsHasHostOption ? false,
}:

let
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];

  fakePkg = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };

  mkPkgs =
    system:
    {
      stdenv.hostPlatform.system = system;
      rustPlatform.buildRustPackage =
        args:
        fakePkg "${args.pname}-${args.version}"
        // {
          inherit args;
          inherit (args) meta;
        };
      mkShell = args: args // { type = "shell"; };
      inherit lib;
      # VM tests only run on a Nix machine; here they are records of their arguments.
      testers.runNixOSTest = args: fakePkg "vm-test-${args.name}" // { inherit args; };
    }
    // lib.genAttrs [
      "protobuf"
      "cargo"
      "rustc"
      "clippy"
      "rustfmt"
      "cargo-nextest"
      "nats-server"
      "curl"
    ] fakePkg;

  legacyPackages = lib.genAttrs systems mkPkgs;

  nixos =
    system:
    import ./nixos.nix {
      inherit lib natsHasHostOption;
      pkgs = legacyPackages.${system};
    };
in
{
  inherit legacyPackages fakePkg;
  lib = lib // {
    # The real one reads `nixpkgs.hostPlatform` to pick pkgs; the example hosts are x86_64.
    nixosSystem = args: (nixos "x86_64-linux").eval args.modules;
  };
  nixos = nixos "x86_64-linux";
}
