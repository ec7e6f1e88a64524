# NixOS module for the CIM storage-manager service: services.cim.storage-manager (see
# ./service.nix for the options every service has; the storage manager's own are below, see
# docs/storage-manager.md, "Configuration").
#
# Archive targets become CIM_ARCHIVE_TARGETS, one `name=..,endpoint=..,...` spec per target
# separated by `;`. A target's credentials file is handed over with LoadCredential= as
# `archive-<name>` and its spec says `credentials-file=%d/archive-<name>`: the file stays
# root-only on the host and never enters the Nix store.
import ./service.nix {
  name = "storage-manager";
  description = "leaf, cluster and S3 tiers: archive and restore";
  httpPort = 9705;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
      duration = types.strMatching "[0-9]+(ms|s|m|h)";
      # What crates/storage-manager/src/target.rs accepts as a target name.
      targetName = types.strMatching "[A-Za-z0-9_-]+";
      # A value inside a spec: no `,` or `;` (the spec's separators), no whitespace (trimmed by
      # the binary), no `%` (systemd would read a specifier), no `"` or `\` (the unit file's
      # quoting).
      specValue = types.strMatching "[^,;%\"\\[:space:]]+";
      target = types.submodule {
        options = {
          name = mkOption {
            type = targetName;
            example = "nas";
            description = "Short name used in cursors, status, logs and `archiveRequired` (letters, digits, `-`, `_`).";
          };
          endpoint = mkOption {
            type = types.strMatching "https?://[^,;%\"\\[:space:]]+";
            example = "http://nas.local:9000";
            description = "`http(s)://host[:port]` of the S3-compatible service.";
          };
          region = mkOption {
            type = specValue;
            default = "us-east-1";
            description = "SigV4 region (MinIO accepts any).";
          };
          bucket = mkOption {
            type = specValue;
            example = "cim";
            description = "The bucket; it must exist.";
          };
          prefix = mkOption {
            type = types.strMatching "[^,;%\"\\[:space:]]*";
            default = "";
            example = "leaf1";
            description = "Key prefix inside the bucket, so that several installations can share it.";
          };
          pathStyle = mkOption {
            type = types.bool;
            default = true;
            description = "Path-style addressing (`endpoint/bucket/key`; MinIO, s3s-fs); false: virtual-hosted (`bucket.host`).";
          };
          credentialsFile = mkOption {
            # A string, never a Nix path (which would be copied into the store).
            type = types.nullOr (
              types.pathWith {
                inStore = false;
                absolute = true;
              }
            );
            default = null;
            example = "/run/keys/cim-archive-nas";
            description = ''
              AWS credentials file (`aws_access_key_id = …`, `aws_secret_access_key = …`) of
              this target. systemd reads it as root and hands it to the service as the
              credential `archive-<name>` (`LoadCredential=`); it never enters the Nix store.
            '';
          };
          credentialsEnv = mkOption {
            type = types.nullOr (types.strMatching "[A-Za-z_][A-Za-z0-9_]*");
            default = null;
            example = "WASABI";
            description = ''
              Instead of a file: `P` reads the keys from `P_ACCESS_KEY_ID` and
              `P_SECRET_ACCESS_KEY`, which belong in the service's `environmentFile` (never in
              `extraEnvironment`). With neither this nor `credentialsFile`, the service reads
              `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
            '';
          };
        };
      };
    in
    {
      archiveTargets = mkOption {
        type = types.listOf target;
        default = [ ];
        example = lib.literalExpression ''
          [
            { name = "nas"; endpoint = "http://nas.local:9000"; bucket = "cim"; prefix = "leaf1";
              credentialsFile = "/run/keys/cim-archive-nas"; }
            { name = "wasabi"; endpoint = "https://s3.eu-central-1.wasabisys.com"; region = "eu-central-1";
              bucket = "cim-archive"; pathStyle = false; credentialsEnv = "WASABI"; }
          ]
        '';
        description = "S3 archive targets, in order (`CIM_ARCHIVE_TARGETS`); none: nothing is archived.";
      };
      archiveRequired = mkOption {
        type = types.listOf targetName;
        default = [ ];
        description = ''
          Targets that must hold a verified copy before anything may be removed from a stream
          (`CIM_ARCHIVE_REQUIRED`); each must be one of `archiveTargets`. Empty: every target.
        '';
      };
      archiveSegmentBytes = mkOption {
        # The binary raises anything below 1 KiB to 1 KiB; memory per stream and target is
        # about twice this, so more than 1 GiB is refused as a mistake.
        type = types.ints.between 1024 1073741824;
        default = 8388608;
        description = "Cut a segment when its uncompressed records reach this many bytes (`CIM_ARCHIVE_SEGMENT_BYTES`).";
      };
      archiveLinger = mkOption {
        type = duration;
        default = "1s";
        description = "Cut a segment when its first record has waited this long (`CIM_ARCHIVE_LINGER`).";
      };
      archivePartBytes = mkOption {
        # S3 multipart parts: at least 5 MiB (the binary raises smaller values), at most 5 GiB.
        type = types.ints.between 5242880 5368709120;
        default = 8388608;
        description = "Objects are copied by name in multipart parts of this many bytes (`CIM_ARCHIVE_PART_BYTES`), 5 MiB to 5 GiB.";
      };
      archiveObjectPoll = mkOption {
        type = duration;
        default = "5s";
        description = "How often object buckets are checked for objects to copy by name (`CIM_ARCHIVE_OBJECT_POLL`).";
      };
      archiveRetryMax = mkOption {
        type = duration;
        default = "30s";
        description = "Longest wait between retries while a target is down (`CIM_ARCHIVE_RETRY_MAX`).";
      };
      archiveVerifyInterval = mkOption {
        type = duration;
        default = "5s";
        description = "How often committed segments are read back and checked, advancing the watermarks (`CIM_ARCHIVE_VERIFY_INTERVAL`).";
      };
      sourceLeaves = mkOption {
        # JetStream domains, as services.cim.nats-leaf.domain declares them.
        type = types.listOf (types.strMatching "[A-Za-z0-9_-]+");
        default = [ ];
        example = [ "leaf" ];
        description = "On the cluster: leaves' JetStream domains whose streams are mirrored here (`CIM_SOURCE_LEAVES`).";
      };
    };

  extraEnvironmentOf =
    lib: cfg:
    let
      names = map (t: t.name) cfg.archiveTargets;
      twice = builtins.filter (n: builtins.length (builtins.filter (m: m == n) names) > 1) names;
      unknownRequired = builtins.filter (r: !builtins.elem r names) cfg.archiveRequired;
      spec =
        t:
        if t.credentialsFile != null && t.credentialsEnv != null then
          throw "services.cim.storage-manager.archiveTargets: target `${t.name}' sets both credentialsFile and credentialsEnv"
        else
          builtins.concatStringsSep "," (
            [
              "name=${t.name}"
              "endpoint=${t.endpoint}"
              "region=${t.region}"
              "bucket=${t.bucket}"
            ]
            ++ lib.optional (t.prefix != "") "prefix=${t.prefix}"
            ++ [ "path-style=${if t.pathStyle then "true" else "false"}" ]
            ++ lib.optional (t.credentialsFile != null) "credentials-file=%d/archive-${t.name}"
            ++ lib.optional (t.credentialsEnv != null) "credentials-env=${t.credentialsEnv}"
          );
      # Refused at evaluation, like the binary would refuse them at start (exit 64).
      checked =
        if twice != [ ] then
          throw "services.cim.storage-manager.archiveTargets: the name `${builtins.head twice}' is used twice"
        else if unknownRequired != [ ] then
          throw "services.cim.storage-manager.archiveRequired: `${builtins.head unknownRequired}' is not the name of one of archiveTargets"
        else
          true;
    in
    {
      CIM_ARCHIVE_SEGMENT_BYTES = toString cfg.archiveSegmentBytes;
      CIM_ARCHIVE_LINGER = cfg.archiveLinger;
      CIM_ARCHIVE_PART_BYTES = toString cfg.archivePartBytes;
      CIM_ARCHIVE_OBJECT_POLL = cfg.archiveObjectPoll;
      CIM_ARCHIVE_RETRY_MAX = cfg.archiveRetryMax;
      CIM_ARCHIVE_VERIFY_INTERVAL = cfg.archiveVerifyInterval;
    }
    # Lists only when not empty: an empty variable is not the same as none to every parser.
    // lib.optionalAttrs (checked && cfg.archiveTargets != [ ]) {
      CIM_ARCHIVE_TARGETS = builtins.concatStringsSep ";" (map spec cfg.archiveTargets);
    }
    // lib.optionalAttrs (cfg.archiveRequired != [ ]) {
      CIM_ARCHIVE_REQUIRED = builtins.concatStringsSep "," cfg.archiveRequired;
    }
    // lib.optionalAttrs (cfg.sourceLeaves != [ ]) {
      CIM_SOURCE_LEAVES = builtins.concatStringsSep "," cfg.sourceLeaves;
    };

  extraCredentialsOf =
    _lib: cfg:
    map (t: "archive-${t.name}:${t.credentialsFile}") (
      builtins.filter (t: t.credentialsFile != null) cfg.archiveTargets
    );
}
