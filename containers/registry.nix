# The CIM registry service in the nixos-container `cim-registry` (see ./container.nix);
# enable with `cim.containers.registry.enable = true`.
import ./container.nix {
  name = "registry";
  index = 2;
}
