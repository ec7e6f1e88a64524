# NixOS module for the CIM information-unit service: services.cim.information-unit (see ./service.nix for the options).
import ./service.nix {
  name = "information-unit";
  description = "content-addressed, versioned, linked information units";
  httpPort = 9701;
}
