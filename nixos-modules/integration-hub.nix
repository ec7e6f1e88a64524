# NixOS module for the CIM integration-hub service: services.cim.integration-hub (see
# ./service.nix for the options every service has; the hub's own are below, see
# docs/integration-hub.md).
#
# The hub's configuration file comes from one of two places:
# - `settings`: written by Nix into the store. The file format has no field for an inline
#   secret (secrets are `*_file` or `*_env`), and Nix paths are refused in it, so nothing
#   secret is copied into the store;
# - `configFile`: a file on the host (e.g. one `cimctl integration add` edits), handed over
#   with LoadCredential= as `hub-config`, so it may stay root-only.
# Secret files the configuration names are handed over the same way: `secretFiles.<id>` is
# readable by the hub as /run/credentials/cim-integration-hub.service/secret-<id>, the path to
# write as `secret_file` (`url_file`, `password_file`, ...).
import ./service.nix {
  name = "integration-hub";
  description = "webhooks and connectors";
  httpPort = 9707;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;

      nonStorePath = types.pathWith {
        inStore = false;
        absolute = true;
      };

      # A JSON value without Nix paths (which builtins.toJSON would copy into the store) or
      # store paths: the shape of one source, subscription or connector. The hub itself
      # refuses unknown fields and unclear values at start (exit 64).
      noPaths =
        v:
        if builtins.isPath v then
          false
        else if builtins.isString v then
          builtins.substring 0 (builtins.stringLength builtins.storeDir + 1) v != "${builtins.storeDir}/"
        else if builtins.isList v then
          builtins.all noPaths v
        else if builtins.isAttrs v then
          builtins.all noPaths (builtins.attrValues v)
        else
          !builtins.isFunction v;
      entry = lib.mkOptionType {
        name = "hubEntry";
        description = "attribute set of JSON values without Nix or store paths";
        check = v: builtins.isAttrs v && noPaths v;
        merge =
          loc: defs:
          if builtins.length defs == 1 then
            (builtins.head defs).value
          else
            throw "The option `${builtins.concatStringsSep "." loc}' is defined more than once.";
      };
      entries =
        what:
        mkOption {
          type = types.listOf entry;
          default = [ ];
          description = "The file's `${what}` (docs/integration-hub.md, \"The configuration file\").";
        };
    in
    {
      webhookListen = mkOption {
        type = types.str;
        default = "127.0.0.1:8470";
        description = ''
          Address of the webhook HTTP listener (`CIM_HUB_WEBHOOK_LISTEN`), opened only when
          webhook sources are configured; port 0 picks any free port.
        '';
      };

      settings = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              webhooks = entries "webhooks";
              outbound_allow = mkOption {
                type = types.listOf (types.strMatching "[0-9A-Fa-f.:]+(/[0-9]+)?");
                default = [ ];
                example = [ "10.0.0.0/8" ];
                description = "Addresses (CIDR blocks or single addresses) outbound deliveries may reach; empty allows nothing.";
              };
              subscriptions = entries "subscriptions";
              postgres = entries "postgres";
              mqtt = entries "mqtt";
              s3_import = entries "s3_import";
            };
          }
        );
        default = null;
        example = lib.literalExpression ''
          {
            webhooks = [
              { name = "shop"; secret_file = "/run/credentials/cim-integration-hub.service/secret-shop"; target = "unit"; }
            ];
          }
        '';
        description = ''
          The hub's configuration file (`CIM_HUB_CONFIG`), written into the Nix store: never
          write a secret here, name it with `secret_file` (see `secretFiles`) or `secret_env`
          (see `environmentFile`). Null, and no `configFile`: the hub serves no source.
        '';
      };

      configFile = mkOption {
        type = types.nullOr nonStorePath;
        default = null;
        example = "/etc/cim/hub.json";
        description = ''
          Instead of `settings`: the hub's configuration file on the host. systemd reads it as
          root and hands it over as `%d/hub-config` (`LoadCredential=`), so it may be
          root-only; it never enters the Nix store. The hub reads it at start: restart the
          unit after changing it.
        '';
      };

      secretFiles = mkOption {
        type = types.attrsOf nonStorePath;
        default = { };
        example = {
          shop = "/run/keys/hub-shop";
        };
        description = ''
          Secret files the configuration names (webhook and subscription secrets, PostgreSQL
          URLs, MQTT passwords, S3 keys). Each is handed to the hub with `LoadCredential=` and
          is readable at /run/credentials/cim-integration-hub.service/secret-<id>; write that
          path in the configuration. IDs: letters, digits, `-`, `_`, `.`.
        '';
      };
    };

  extraEnvironmentOf =
    lib: cfg:
    let
      settings = builtins.removeAttrs cfg.settings [ "_module" ];
      # builtins.toFile rather than pkgs.writeText: the generator's hooks see only `lib`, and
      # the file holds no store references (noPaths).
      file = builtins.toFile "cim-integration-hub.json" (builtins.toJSON settings);
    in
    { CIM_HUB_WEBHOOK_LISTEN = cfg.webhookListen; }
    // lib.optionalAttrs (cfg.configFile != null || cfg.settings != null) {
      CIM_HUB_CONFIG =
        if cfg.configFile != null && cfg.settings != null then
          throw "services.cim.integration-hub: set settings or configFile, not both"
        else if cfg.configFile != null then
          "%d/hub-config"
        else
          file;
    };

  extraCredentialsOf =
    lib: cfg:
    lib.optional (cfg.configFile != null) "hub-config:${cfg.configFile}"
    ++ lib.mapAttrsToList (
      id: path:
      if builtins.match "[A-Za-z0-9_.-]+" id != null then
        "secret-${id}:${path}"
      else
        throw "services.cim.integration-hub.secretFiles: `${id}' is not a credential ID (letters, digits, -, _, .)"
    ) cfg.secretFiles;
}
