# NixOS module for the CIM registry service: services.cim.registry (see ./service.nix for the options).
import ./service.nix {
  name = "registry";
  description = "who runs where: services, plugins, nodes";
  httpPort = 9702;
}
