# Renders an evaluated (stub) system the way NixOS would write it, close enough for
# `systemd-analyze verify` and `nats-server -t`: unit files as nixos/lib/systemd-lib.nix lays
# them out (a list value becomes one line per element), and the nats config as JSON (what
# pkgs.formats.json writes; nats-server reads JSON).
{ lib }:

let
  value =
    v:
    if builtins.isBool v then
      (if v then "true" else "false")
    else
      toString v;

  lines = key: v: if builtins.isList v then map (x: "${key}=${value x}") v else [ "${key}=${value v}" ];

  unit =
    s:
    lib.concatStringsSep "\n" (
      [
        "[Unit]"
        "Description=${s.description}"
      ]
      ++ lib.optional (s.after != [ ]) "After=${toString s.after}"
      ++ lib.optional (s.wants != [ ]) "Wants=${toString s.wants}"
      ++ [
        ""
        "[Service]"
      ]
      ++ lib.mapAttrsToList (k: v: ''Environment="${k}=${toString v}"'') (
        lib.filterAttrs (_: v: v != null) s.environment
      )
      ++ lib.concatLists (lib.mapAttrsToList lines s.serviceConfig)
      ++ lib.optionals (s.wantedBy != [ ]) [
        ""
        "[Install]"
        "WantedBy=${toString s.wantedBy}"
      ]
    )
    + "\n";
in
{
  system = config: {
    units = lib.mapAttrs (_: unit) config.systemd.services;
    nats = if config.services.nats.enable then builtins.toJSON config.services.nats.settings else null;
  };
}
