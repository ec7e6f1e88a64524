# NixOS module for the CIM integration-hub service: services.cim.integration-hub (see ./service.nix for the options).
import ./service.nix {
  name = "integration-hub";
  description = "webhooks and connectors";
  httpPort = 9707;
}
