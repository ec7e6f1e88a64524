# The CIM integration-hub service in the nixos-container `cim-integration-hub` (see ./container.nix);
# enable with `cim.containers.integration-hub.enable = true`.
import ./container.nix {
  name = "integration-hub";
  index = 7;
}
