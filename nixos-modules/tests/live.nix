# The example topology (three hub nodes, one leaf connected to them) from the same modules,
# moved onto loopback ports and temporary store directories so that ./check.sh --live can
# run it with real nats-servers and a real service binary.
{
  lib,
  pkgDir,
  # Directory for the JetStream stores.
  base,
  # First port of the range used: +1..3 client ports of the hub, +10 the leaf's.
  clientPorts ? 24220,
}:

let
  stubs = import ./stubs.nix { inherit lib; };
  render = import ./render.nix { inherit lib; };
  names = import ../service-names.nix;
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

  node =
    i:
    stubs.eval [
      ../.
      ../hosts/common.nix
      (import ../hosts/cluster-node.nix {
        index = i;
        addresses = [ "127.0.0.1" ];
      })
      packages
      {
        services.cim.nats-cluster-node = {
          listenAddress = "127.0.0.1";
          port = clientPorts + i;
          clusterPort = clientPorts + 2000 + i;
          leafnodePort = clientPorts + 3000 + i;
          monitorListen = "127.0.0.1:${toString (clientPorts + 4000 + i)}";
          routes = lib.mkForce (map (j: "nats-route://127.0.0.1:${toString (clientPorts + 2000 + j)}") hub);
        };
        services.nats.dataDir = "${base}/node${toString i}";
        services.cim.registry.httpListen = "127.0.0.1:${toString (clientPorts + 5000 + i)}";
      }
    ];

  leaf = stubs.eval [
    ../.
    ../hosts/common.nix
    (import ../hosts/leaf.nix { hubAddresses = [ ]; })
    packages
    {
      services.cim.nats-leaf = {
        port = clientPorts + 10;
        monitorListen = "127.0.0.1:${toString (clientPorts + 4010)}";
        hubUrls = map (j: "nats-leaf://127.0.0.1:${toString (clientPorts + 3000 + j)}") hub;
      };
      services.nats.dataDir = "${base}/leaf";
      services.cim.registry.httpListen = "127.0.0.1:${toString (clientPorts + 5010)}";
    }
  ];

  summary = system: {
    inherit (render.system system.config) nats;
    registryUnit = (render.system system.config).units.cim-registry;
    monitor = system.config.services.nats.settings.http;
    registryHttp = system.config.services.cim.registry.httpListen;
  };
in
{
  node1 = summary (node 1);
  node2 = summary (node 2);
  node3 = summary (node 3);
  leaf = summary leaf;
}
