# NixOS module for the CIM pipeline-engine service: services.cim.pipeline-engine (see ./service.nix for the options).
import ./service.nix {
  name = "pipeline-engine";
  description = "event-triggered, durable pipelines";
  httpPort = 9703;
}
