# NixOS module for the CIM ui-gateway service: services.cim.ui-gateway (see ./service.nix for the options).
import ./service.nix {
  name = "ui-gateway";
  description = "HTTP, gRPC and the web UI";
  httpPort = 9706;
}
