# TEST-ONLY NATS identities for ./live.nix and the integration test
# (integration-tests/tests/it/nix.rs): a password and its bcrypt hash (cost 4, made with
# libxcrypt's crypt(3)) per service, an `admin` user for the test's own observer, and the
# `leaf` user with which the leaf node connects to the hub's leaf-node port.
# These passwords are public: never use them anywhere else.
{
  information-unit = {
    password = "test-only-information-unit-3nSOptaza7Dy3qY4";
    hash = "$2b$04$UxnifOpOCx8IV7NujGs93OaMEqMMgIAPfD./EEXJHlfFlEOsHye2.";
  };
  registry = {
    password = "test-only-registry-ZkJYLqnqPUZDAOyb";
    hash = "$2b$04$tfLZDO3L9gMRKJl7UnlZ8.uBtqHfXJaZS5So3CAHcKWC5MC7SjmC6";
  };
  pipeline-engine = {
    password = "test-only-pipeline-engine-oBjKACPtvEKEXoBv";
    hash = "$2b$04$arIsPM0oz4p6yEOzN8nILuX7kGM3uYdQcSDHbgQwv4/wo7T8Ms2i2";
  };
  plugin-host = {
    password = "test-only-plugin-host-QVPKhZCjONH1MT06";
    hash = "$2b$04$mYsOv7w0O7xeJzB3JtQkVOKfFgKqnGtG6/krnXCqhA1II4BSmdxs.";
  };
  storage-manager = {
    password = "test-only-storage-manager-9Gkc1IKrMstoCukQ";
    hash = "$2b$04$r09cgM1jXjaSxK3XisROtuLYqWFazgMESaHyisonwdu.wwgCDw6jG";
  };
  ui-gateway = {
    password = "test-only-ui-gateway-Ay6jVahJlFCbTtYs";
    hash = "$2b$04$Oktg3fccHbvHxdJWkw5S4eE3hRM8aU1tPda0l3Clrwq5f0huHxADC";
  };
  integration-hub = {
    password = "test-only-integration-hub-X7vz46ihZCwkd1or";
    hash = "$2b$04$LWL1kJYVCsyeRxOneAA77.5YPLKHRqh7sUYN2HHWW1lcVyF9yNp2a";
  };
  leaf = {
    password = "test-only-leaf-75pkZl6uYDg2WIA5";
    hash = "$2b$04$Fo4xAqxn47Msi0c7dwOldeDxInjqL/RYkOXSqXvg5qHpWQ5x3xqc.";
  };
  admin = {
    password = "test-only-admin-ey0lSiwri51Be866";
    hash = "$2b$04$dKOTyzI51cpzwijGYob1veRYkIkT5vKEBkFB9Z7tsWn5A/fjrjvuS";
  };
}
