# NixOS module for the CIM storage-manager service: services.cim.storage-manager (see ./service.nix for the options).
import ./service.nix {
  name = "storage-manager";
  description = "leaf, cluster and S3 tiers: archive and restore";
  httpPort = 9705;
}
