# The CIM ui-gateway service in the nixos-container `cim-ui-gateway` (see ./container.nix);
# enable with `cim.containers.ui-gateway.enable = true`.
import ./container.nix {
  name = "ui-gateway";
  index = 6;
}
