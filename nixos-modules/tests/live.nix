# The example topology (three hub nodes, one leaf connected to them) from the same modules,
# moved onto loopback ports and temporary store directories, with one NATS user per service
# (./auth-fixture.nix) on every server, so that integration-tests/tests/it/nix.rs can run it
# with real nats-servers and real service binaries.
{
  lib ? import ./stub/lib.nix,
  pkgDir,
  # Directory for the JetStream stores.
  base,
  # Free loopback ports, as a JSON object: node<i>.{client,cluster,leafnode,monitor,http}
  # for i = 1..3 and leaf.{client,monitor,http}.
  portsJSON,
}:

let
  nixpkgs = import ./stub/nixpkgs.nix { inherit lib; };
  render = import ./render.nix { inherit lib; };
  names = import ../service-names.nix;
  fixture = import ./auth-fixture.nix;
  ports = builtins.fromJSON portsJSON;
  pkg = {
    type = "derivation";
    name = "cim-under-test";
    outPath = pkgDir;
  };
  packages.services.cim = lib.genAttrs names (_: { package = pkg; });
  hub = [
    1
    2
    3
  ];
  node = i: ports."node${toString i}";

  auth.imports = [
    {
      services.cim = lib.genAttrs names (name: {
        environmentFile = "/run/keys/cim-${name}.env";
      });
    }
    {
    services.cim.nats-auth = {
      enable = true;
      services = lib.genAttrs names (name: {
        passwordHash = fixture.${name}.hash;
      });
      extraUsers = [
        {
          user = "admin";
          passwordHash = fixture.admin.hash;
        }
      ];
    };
    }
  ];

  hubNode =
    i:
    nixpkgs.nixos.eval [
      ../.
      ../hosts/common.nix
      (import ../hosts/cluster-node.nix {
        index = i;
        addresses = [ "127.0.0.1" ];
        # The storage manager mirrors the leaf: its NATS user may keep those mirrors.
        leafDomains = [ "leaf" ];
      })
      packages
      auth
      {
        services.cim.nats-auth.leafnodePasswordHash = fixture.leaf.hash;
        services.cim.nats-cluster-node = {
          listenAddress = "127.0.0.1";
          port = (node i).client;
          clusterPort = (node i).cluster;
          leafnodePort = (node i).leafnode;
          monitorListen = "127.0.0.1:${toString (node i).monitor}";
          routes = lib.mkForce (map (j: "nats-route://127.0.0.1:${toString (node j).cluster}") hub);
        };
        services.nats.dataDir = "${base}/node${toString i}";
        services.cim.registry.httpListen = "127.0.0.1:${toString (node i).http}";
      }
    ];

  leaf = nixpkgs.nixos.eval [
    ../.
    ../hosts/common.nix
    (import ../hosts/leaf.nix { hubAddresses = [ ]; })
    packages
    auth
    {
      services.cim.nats-leaf = {
        port = ports.leaf.client;
        monitorListen = "127.0.0.1:${toString ports.leaf.monitor}";
        hubUrls = map (j: "nats-leaf://leaf:${fixture.leaf.password}@127.0.0.1:${toString (node j).leafnode}") hub;
      };
      services.nats.dataDir = "${base}/leaf";
      services.cim.registry.httpListen = "127.0.0.1:${toString ports.leaf.http}";
    }
  ];

  summary =
    system:
    let
      rendered = render.system system.config;
    in
    {
      inherit (rendered) nats;
      registryUnit = rendered.units.cim-registry;
      monitor = system.config.services.nats.settings.http;
    };
in
{
  node1 = summary (hubNode 1);
  node2 = summary (hubNode 2);
  node3 = summary (hubNode 3);
  leaf = summary leaf;
  passwords = lib.mapAttrs (_: u: u.password) fixture;
}
