# The CIM pipeline-engine service in the nixos-container `cim-pipeline-engine` (see ./container.nix);
# enable with `cim.containers.pipeline-engine.enable = true`.
import ./container.nix {
  name = "pipeline-engine";
  index = 3;
}
