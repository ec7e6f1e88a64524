# Shared by the example hosts in flake.nix (`nixosConfigurations`).
{ lib, ... }:
{
  # Placeholder hardware, only so that the configurations are complete. A real host imports
  # its own hardware-configuration.nix (file systems, boot loader) instead.
  boot.loader.grub.enable = lib.mkDefault false;
  fileSystems."/" = lib.mkDefault {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  system.stateVersion = "26.05";
}
