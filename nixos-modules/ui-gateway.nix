# NixOS module for the CIM ui-gateway service: services.cim.ui-gateway (see ./service.nix for the
# options every service has; its own are below, see docs/ui-gateway.md).
import ./service.nix {
  name = "ui-gateway";
  description = "HTTP, gRPC and the web UI";
  httpPort = 9706;

  extraOptions =
    lib:
    let
      inherit (lib) mkOption types;
    in
    {
      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:8480";
        description = "Address of the HTTP API, live events and web UI (`CIM_GATEWAY_LISTEN`).";
      };
      grpcListen = mkOption {
        type = types.str;
        default = "127.0.0.1:8481";
        description = "Address of the gRPC API, or \"off\" (`CIM_GATEWAY_GRPC_LISTEN`).";
      };
      corsOrigins = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Origins allowed by CORS; \"*\" = any (`CIM_GATEWAY_CORS_ORIGINS`).";
      };
      maxUpload = mkOption {
        type = types.ints.positive;
        default = 4294967296;
        description = "Largest upload in bytes (`CIM_GATEWAY_MAX_UPLOAD`).";
      };
      rateLimit = mkOption {
        type = types.ints.unsigned;
        default = 100;
        description = "Requests per second per API token, bursts of twice that; 0 = unlimited (`CIM_GATEWAY_RATE_LIMIT`).";
      };
    };

  extraEnvironmentOf = lib: cfg: {
    CIM_GATEWAY_LISTEN = cfg.listen;
    CIM_GATEWAY_GRPC_LISTEN = cfg.grpcListen;
    CIM_GATEWAY_CORS_ORIGINS = lib.concatStringsSep "," cfg.corsOrigins;
    CIM_GATEWAY_MAX_UPLOAD = toString cfg.maxUpload;
    CIM_GATEWAY_RATE_LIMIT = toString cfg.rateLimit;
  };
}
