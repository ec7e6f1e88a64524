# Definitions the options must refuse, and a few they must accept: evaluates one case, e.g.
#   nix-instantiate --eval --strict --json nixos-modules/tests/refuse.nix --argstr case maxInFlightZero
# A refused case fails the evaluation with the module system's message (the integration test
# checks the message); an accepted one prints the unit's environment (and any container's
# bind mounts and units).
{
  case,
  lib ? import ./stub/lib.nix,
}:

let
  nixpkgs = import ./stub/nixpkgs.nix { inherit lib; };
  pkg = nixpkgs.fakePkg "cim-under-test";

  registry = def: [
    ../registry.nix
    {
      system.stateVersion = "26.05";
      services.cim.registry = {
        enable = true;
        package = pkg;
      }
      // def;
    }
  ];
  plugins = def: [
    ../plugin-host.nix
    {
      system.stateVersion = "26.05";
      services.cim.plugin-host = {
        enable = true;
        package = pkg;
      }
      // def;
    }
  ];
  service =
    name: def: [
      ../${name}.nix
      {
        system.stateVersion = "26.05";
        services.cim.${name} = {
          enable = true;
          package = pkg;
        }
        // def;
      }
    ];
  storage = service "storage-manager";
  hub = service "integration-hub";
  target = {
    name = "nas";
    endpoint = "http://nas.local:9000";
    bucket = "cim";
  };
  storeFile = "${builtins.storeDir}/00000000000000000000000000000000-secret";
  # A host with one service in its nixos-container (containers/), `def` under
  # cim.containers.<name>.
  container =
    name: def: [
      ../../containers
      {
        system.stateVersion = "26.05";
        services.cim = lib.genAttrs (import ../service-names.nix) (_: {
          package = pkg;
        });
        cim.containers.${name} = {
          enable = true;
        }
        // def;
      }
    ];
  leaf = def: [
    ../nats-leaf.nix
    {
      system.stateVersion = "26.05";
      services.cim.nats-leaf = {
        enable = true;
      }
      // def;
    }
  ];
  auth = def: [
    ../nats-auth.nix
    ../nats-leaf.nix
    {
      system.stateVersion = "26.05";
      services.cim.nats-leaf.enable = true;
      services.cim.nats-auth = {
        enable = true;
      }
      // def;
    }
  ];

  cases = {
    # refused
    unknownOption = registry { maxInflight = 8; };
    maxInFlightZero = registry { maxInFlight = 0; };
    cpuWeightTooHigh = registry { cpuWeight = 10001; };
    shutdownGraceNegative = registry { shutdownGrace = -1; };
    credentialsAsNixPath = registry { natsCredentialsFile = ./refuse.nix; };
    credentialsInStore = registry { natsCredentialsFile = "${builtins.storeDir}/00000000000000000000000000000000-creds"; };
    credentialsRelative = registry { natsCredentialsFile = "keys/registry.creds"; };
    environmentFileInStore = registry { environmentFile = "${builtins.storeDir}/00000000000000000000000000000000-env"; };
    nodeWithDot = registry { node = "a.b"; };
    domainWithWildcard = registry { jetstreamDomain = "leaf*"; };
    heartbeatWithSpace = registry { heartbeatInterval = "5 s"; };
    tierUnknown = registry { tier = "edge"; };
    leafPortOutOfRange = leaf { port = 70000; };
    leafUnknownOption = leaf { jetstreamDomain = "leaf"; };
    authUnknownService = auth { services.nope.passwordHash = "$2b$04$UxnifOpOCx8IV7NujGs93OaMEqMMgIAPfD./EEXJHlfFlEOsHye2."; };
    pluginMemoryWords = plugins { maxMemory = "lots"; };
    pluginParallelismZero = plugins { parallelism = 0; };
    authPlaintextPassword = auth { services.registry.passwordHash = "hunter2"; };
    registryMissedBeatsZero = registry { missedBeats = 0; };
    registryMinTtlWords = registry { minTtl = "a while"; };
    archiveTargetNameWithDot = storage { archiveTargets = [ (target // { name = "n.a.s"; }) ]; };
    archiveEndpointWithoutScheme = storage { archiveTargets = [ (target // { endpoint = "nas.local:9000"; }) ]; };
    archiveBucketWithComma = storage { archiveTargets = [ (target // { bucket = "cim,x"; }) ]; };
    archiveRegionWithPercent = storage { archiveTargets = [ (target // { region = "%d"; }) ]; };
    archiveTargetUnknownKey = storage { archiveTargets = [ (target // { colour = "blue"; }) ]; };
    archiveCredentialsInStore = storage { archiveTargets = [ (target // { credentialsFile = storeFile; }) ]; };
    archiveCredentialsAsNixPath = storage { archiveTargets = [ (target // { credentialsFile = ./refuse.nix; }) ]; };
    archiveCredentialsFileAndEnv = storage {
      archiveTargets = [
        (target // {
          credentialsFile = "/run/keys/nas";
          credentialsEnv = "NAS";
        })
      ];
    };
    archiveTargetTwice = storage { archiveTargets = [ target target ]; };
    archiveRequiredUnknown = storage {
      archiveTargets = [ target ];
      archiveRequired = [ "wasabi" ];
    };
    archivePartBytesBelow5MiB = storage { archivePartBytes = 1048576; };
    archiveSegmentBytesTiny = storage { archiveSegmentBytes = 10; };
    archiveLingerWords = storage { archiveLinger = "soon"; };
    sourceLeafWithDot = storage { sourceLeaves = [ "leaf.1" ]; };
    hubConfigInStore = hub { configFile = storeFile; };
    hubConfigAndSettings = hub {
      configFile = "/etc/cim/hub.json";
      settings = { };
    };
    hubSettingsUnknownKey = hub { settings.webhook = [ ]; };
    hubSettingsNixPath = hub {
      settings.webhooks = [
        {
          name = "shop";
          secret_file = ./refuse.nix;
        }
      ];
    };
    hubSettingsStorePath = hub {
      settings.subscriptions = [
        {
          name = "crm";
          secret_file = storeFile;
        }
      ];
    };
    hubSecretFileInStore = hub { secretFiles.shop = storeFile; };
    hubSecretIdWithSlash = hub { secretFiles."a/b" = "/run/keys/hub-ab"; };
    # In a container, the service module's own types check `service`.
    containerServiceBadValue = container "registry" { service.maxInFlight = 0; };
    containerServiceUnknownOption = container "registry" { service.maxInflight = 8; };
    containerArchiveCredentialsInStore = container "storage-manager" {
      service.archiveTargets = [ (target // { credentialsFile = storeFile; }) ];
    };
    containerHubConfigAsNixPath = container "integration-hub" { service.configFile = ./refuse.nix; };
    containerHubSecretFileInStore = container "integration-hub" { service.secretFiles.shop = storeFile; };
    containerServiceNatsUrl = container "registry" { service.natsUrl = "nats://10.0.0.1:4222"; };
    containerServiceCredentials = container "registry" { service.natsCredentialsFile = "/run/keys/registry.creds"; };
    containerCredentialsInStore = container "registry" { natsCredentialsFile = storeFile; };
    containerMemoryMaxWords = container "registry" { memoryMax = "lots"; };
    containerCpuWeightTooHigh = container "registry" { cpuWeight = 10001; };

    # accepted
    acceptsCredentialsPath = registry { natsCredentialsFile = "/run/keys/registry.creds"; };
    acceptsNode = registry { node = "leaf-1_a"; };
    acceptsHeartbeatMs = registry { heartbeatInterval = "250ms"; };
    acceptsLimits = registry {
      maxInFlight = 65536;
      cpuWeight = 10000;
      shutdownGrace = 1;
    };
    acceptsPluginLimits = plugins {
      parallelism = 2;
      maxMemory = "16MiB";
      allowedDirectories.models = "/var/lib/models";
    };
    acceptsArchiveTargets = storage {
      natsCredentialsFile = "/run/keys/storage.creds";
      archiveTargets = [
        (target // { credentialsFile = "/run/keys/nas"; })
        {
          name = "wasabi_2";
          endpoint = "https://s3.eu-central-1.wasabisys.com/";
          region = "eu-central-1";
          bucket = "cim-archive";
          prefix = "site/leaf1/";
          pathStyle = false;
          credentialsEnv = "WASABI";
        }
      ];
      archiveRequired = [
        "nas"
        "wasabi_2"
      ];
      archivePartBytes = 5242880;
      archiveLinger = "500ms";
      sourceLeaves = [
        "leaf"
        "leaf-2"
      ];
    };
    acceptsHubSettings = hub {
      settings = {
        webhooks = [
          {
            name = "shop";
            secret_file = "/run/credentials/cim-integration-hub.service/secret-shop";
            target = "unit";
            tags = [ "inbox" ];
          }
        ];
        outbound_allow = [
          "10.0.0.0/8"
          "::1"
        ];
        subscriptions = [
          {
            name = "crm";
            filter = "cim.evt.iu.unit.*.created";
            url = "http://10.0.0.5:8080/cim";
            secret_env = "CRM_SECRET";
            max_attempts = 8;
          }
        ];
      };
      secretFiles.shop = "/run/keys/hub-shop";
      environmentFile = "/run/keys/hub.env";
    };
    acceptsContainerService = container "storage-manager" {
      natsCredentialsFile = "/run/keys/storage.creds";
      service = {
        archiveTargets = [
          (target // { credentialsFile = "/run/keys/nas"; })
          (target // {
            name = "usb";
            credentialsFile = "/run/keys/usb";
          })
        ];
        memoryMax = "infinity";
        cpuWeight = 50;
        node = "leaf-1";
      };
    };
    acceptsAuth = auth { services.registry.passwordHash = "$2b$04$UxnifOpOCx8IV7NujGs93OaMEqMMgIAPfD./EEXJHlfFlEOsHye2."; };
  };

  config = (nixpkgs.nixos.eval cases.${case}).config;
in
{
  units = lib.mapAttrs (_: s: { inherit (s) environment serviceConfig; }) config.systemd.services;
  nats = config.services.nats.settings;
  # Each container's bind mounts and the units inside it.
  containers = lib.mapAttrs (_: c: {
    inherit (c) bindMounts;
    units = lib.mapAttrs (_: s: { inherit (s) environment serviceConfig; }) c.config.systemd.services;
  }) config.containers;
  # What the hub's `settings` become (the file itself is only a store path here).
  hubSettings =
    let
      s = config.services.cim.integration-hub.settings or null;
    in
    if s == null then null else builtins.removeAttrs s [ "_module" ];
}
