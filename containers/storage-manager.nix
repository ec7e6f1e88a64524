# The CIM storage-manager service in the nixos-container `cim-storage-manager` (see ./container.nix);
# enable with `cim.containers.storage-manager.enable = true`.
import ./container.nix {
  name = "storage-manager";
  index = 5;
}
