# The CIM plugin-host service in the nixos-container `cim-plugin-host` (see ./container.nix);
# enable with `cim.containers.plugin-host.enable = true`.
import ./container.nix {
  name = "plugin-host";
  index = 4;
}
