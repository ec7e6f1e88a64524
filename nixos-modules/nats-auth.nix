# One NATS identity per CIM service on this host's nats-server (either profile, or any
# `services.nats`): a user named after the service, with the publish/subscribe permissions
# that `cim-events` assigns to it. The permissions come from ./nats-permissions.json, which
# `cimctl deploy nats-permissions --json` generates (an integration test fails when it is
# stale); they are not written by hand here.
#
# Passwords: the server config (in the world-readable Nix store) holds only bcrypt hashes.
# Each service gets its password from a root-only file outside the store, through its
# `environmentFile` (systemd `EnvironmentFile=`), as
#   CIM_NATS_URL=nats://<service>:<password>@127.0.0.1:4222
#
# Once users exist, nats-server refuses clients without one: give operators and tools
# (`cimctl`) a user in `extraUsers`. It refuses leaf nodes without one too: on a hub node,
# set `leafnodePasswordHash`, and let each leaf connect as `leaf` (the password goes into the
# leaf's `hubUrls`, and so into its Nix store: see docs/deploy.md). Routes are not covered.
{ config, lib, ... }:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.cim.nats-auth;
  names = import ./service-names.nix;
  generated = lib.importJSON ./nats-permissions.json;

  # What nats-server recognises as a bcrypt hash ($2a$, $2b$, $2x$, $2y$ and a cost).
  bcryptHash = types.strMatching "[$]2[abxy][$][0-9]{2}[$][./A-Za-z0-9]{53}";

  user = name: hash: {
    user = name;
    password = hash;
  };

  # Mirror names carry the leaf domain upper-cased (cim_events::resources::leaf_mirror).
  toUpper = builtins.replaceStrings (builtins.genList (i: builtins.substring i 1 "abcdefghijklmnopqrstuvwxyz") 26) (
    builtins.genList (i: builtins.substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26
  );
  # The storage manager on the cluster also keeps one mirror per leaf and stream: the
  # generated `leaf_mirrors` permissions, once per leaf domain.
  mirrors = generated.leaf_mirrors;
  # A process serving one native plugin (Rust, Python, ...): the generated `native_plugins`
  # template with the plugin's name, so only the identities listed here serve a plugin name.
  natives = generated.native_plugins;
  nativeUser =
    name: hash:
    let
      fill = map (builtins.replaceStrings [ natives.placeholder ] [ name ]);
    in
    if builtins.match "[a-z0-9][a-z0-9-]{0,63}" name == null then
      throw "services.cim.nats-auth.nativePlugins: `${name}' is not a plugin name (a-z, 0-9 and '-', 1-64 characters)"
    else
      user "${natives.user_prefix}${name}" hash
    // {
      permissions = {
        publish.allow = fill natives.publish.allow;
        subscribe.allow = fill natives.subscribe.allow;
        inherit (natives) allow_responses;
      };
    };
  permissionsOf =
    name:
    let
      own = generated.services.${name};
      extra = builtins.concatMap (
        domain: map (builtins.replaceStrings [ mirrors.placeholder ] [ (toUpper domain) ]) mirrors.publish
      ) cfg.leafMirrorDomains;
    in
    if name == mirrors.service && extra != [ ] then own // { publish.allow = own.publish.allow ++ extra; } else own;
in
{
  options.services.cim.nats-auth = {
    enable = mkEnableOption "one NATS user per CIM service, with permissions generated from cim-events";

    services = lib.genAttrs names (name: {
      passwordHash = mkOption {
        type = types.nullOr bcryptHash;
        default = null;
        example = "$2b$11$…";
        description = ''
          bcrypt hash of the `${name}` user's password (e.g. `mkpasswd -m bcrypt`). Null:
          no user for ${name} on this server.
        '';
      };
    });

    leafMirrorDomains = mkOption {
      type = types.listOf (types.strMatching "[A-Za-z0-9_-]{1,64}");
      default = config.services.cim.storage-manager.sourceLeaves or [ ];
      defaultText = lib.literalMD "`services.cim.storage-manager.sourceLeaves`";
      example = [ "leaf1" ];
      description = ''
        Leaf JetStream domains whose streams the cluster's storage manager mirrors: its user
        may create and read the mirror `<STREAM>_FROM_<DOMAIN>` of every archived stream of
        each (the `leaf_mirrors` section of nats-permissions.json). Set it on every cluster
        node, wherever the storage manager runs.
      '';
    };

    nativePlugins = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.passwordHash = mkOption {
            type = bcryptHash;
            description = "bcrypt hash of the password of the plugin's user `plugin-<name>`.";
          };
        }
      );
      default = { };
      example = {
        sha256.passwordHash = "$2b$11$…";
      };
      description = ''
        Native plugins (processes outside the plugin host, in any language) by plugin name
        (`[a-z0-9-]`, as plugin names are): each gets a user `plugin-<name>` that may announce
        that plugin's versions, receive their invocations and answer them, nothing else. No
        other identity but the plugin host may serve a plugin.
      '';
    };

    restorePasswordHash = mkOption {
      type = types.nullOr bcryptHash;
      default = null;
      description = ''
        bcrypt hash of the password of user `restore`, the identity `cimctl restore` runs as
        (`nats://restore:<password>@…`): it may write the archived streams into a fresh
        JetStream (publish on their subjects; create, reconfigure, purge and delete messages of
        those streams only) and nothing else (the `restore` section of nats-permissions.json).
        Null: no such user.
      '';
    };

    leafnodePasswordHash = mkOption {
      type = types.nullOr bcryptHash;
      default = null;
      description = ''
        bcrypt hash of the password leaf nodes present on this server's leaf-node port, as
        user `leaf` (`nats-leaf://leaf:<password>@<hub>:7422`). Null: no leaf-node user, and
        nats-server then refuses leaf nodes that do not log in as one of the users above.
      '';
    };

    extraUsers = mkOption {
      type = types.listOf (
        types.submodule {
          options = {
            user = mkOption { type = types.str; };
            passwordHash = mkOption { type = bcryptHash; };
            permissions = mkOption {
              type = types.nullOr types.anything;
              default = null;
              description = "A nats-server `permissions` block; null allows everything.";
            };
          };
        }
      );
      default = [ ];
      example = [
        {
          user = "admin";
          passwordHash = "$2b$11$…";
        }
      ];
      description = "More users of this server, e.g. one for operators and `cimctl`.";
    };
  };

  config = mkIf cfg.enable {
    services.nats.settings.authorization.users =
      map (name: user name cfg.services.${name}.passwordHash // { permissions = permissionsOf name; }) (
        builtins.filter (name: cfg.services.${name}.passwordHash != null) names
      )
      ++ lib.mapAttrsToList (name: p: nativeUser name p.passwordHash) cfg.nativePlugins
      ++ lib.optional (cfg.restorePasswordHash != null) (
        user generated.restore.user cfg.restorePasswordHash
        // {
          permissions = {
            inherit (generated.restore) publish subscribe allow_responses;
          };
        }
      )
      ++ map (
        u: user u.user u.passwordHash // lib.optionalAttrs (u.permissions != null) { inherit (u) permissions; }
      ) cfg.extraUsers;

    services.nats.settings.leafnodes = mkIf (cfg.leafnodePasswordHash != null) {
      authorization = user "leaf" cfg.leafnodePasswordHash;
    };
  };
}
