# The CIM information-unit service in the nixos-container `cim-information-unit` (see ./container.nix);
# enable with `cim.containers.information-unit.enable = true`.
import ./container.nix {
  name = "information-unit";
  index = 1;
}
