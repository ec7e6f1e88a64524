# NixOS module for the CIM plugin-host service: services.cim.plugin-host (see ./service.nix for the options).
import ./service.nix {
  name = "plugin-host";
  description = "sandboxed WebAssembly and native plugins";
  httpPort = 9704;
  # The WebAssembly engine is not chosen yet. One that compiles to machine code at run time
  # (wasmtime) needs `needsJit = true` (it turns MemoryDenyWriteExecute off); an interpreter
  # (wasmi) does not.
  needsJit = false;
}
