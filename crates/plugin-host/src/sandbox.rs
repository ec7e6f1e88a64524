//! The WebAssembly sandbox: one wasmtime engine, modules compiled once and pre-instantiated,
//! and invocations with a hard memory limit, a fuel (CPU) budget and a wall-clock deadline.
//!
//! The ABI (docs/plugins.md): the module exports `memory` and `cim_invoke: () -> i32`, and may
//! import the host functions of module `cim` (input, metadata, output, error) and WASI preview 1
//! (stdio, clocks, random; no files unless allowed, no sockets). `cim_invoke` returns 0 for
//! success, 1 when it refuses the input, anything else for its own failure.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cim_events::proto::plugin::{Limits, Manifest, Status};
use wasmtime::{Caller, Engine, Extern, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, ValType};
use wasmtime_wasi::{DirPerms, FilePerms, I32Exit, WasiCtxBuilder, p1::WasiP1Ctx, p2::pipe::MemoryOutputPipe};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(2);
/// Standard error kept per invocation (writing more traps).
const STDERR_CAPACITY: usize = 64 * 1024;

/// What the operator allows a WebAssembly plugin at most.
#[derive(Clone, Debug)]
pub struct Policy {
    pub max_memory: u64,
    pub max_fuel: u64,
    pub max_timeout: Duration,
    /// Largest output a plugin may produce.
    pub max_output: usize,
    /// Directories plugins may ask for, by logical name.
    pub directories: HashMap<String, PathBuf>,
    /// Instances alive at once (the pooling allocator's slots): at least the host's
    /// parallelism. An invocation beyond it fails with a clear reason instead of mapping memory.
    pub instances: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_memory: 64 << 20,
            max_fuel: 10_000_000_000,
            max_timeout: Duration::from_secs(10),
            max_output: 8 << 20,
            directories: HashMap::new(),
            instances: 64,
        }
    }
}

/// Why a module cannot be loaded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LoadError {
    #[error("not a valid webassembly module: {0}")]
    InvalidModule(String),
    #[error("module does not follow the plugin abi: {0}")]
    Abi(String),
    #[error("{0}")]
    Refused(String),
}

/// The one engine of a host, with its epoch ticker.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<State>>,
    policy: Arc<Policy>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("policy", &self.policy).finish()
    }
}

impl Sandbox {
    pub fn new(policy: Policy) -> anyhow::Result<Sandbox> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // Instances come from pre-reserved slots whose memory is reset between uses instead of
        // mapped afresh per invocation: instantiation drops from tens of microseconds to a few.
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        let slots = policy.instances.max(1);
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .max_memory_size(usize::try_from(policy.max_memory).unwrap_or(usize::MAX));
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let weak = engine.weak();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;
        let mut linker = Linker::new(&engine);
        // Only modules that import WASI get a WASI context, so `wasi` is set whenever this runs.
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| {
            s.wasi.as_mut().expect("a wasi context for a module importing wasi")
        })?;
        add_host_functions(&mut linker)?;
        Ok(Sandbox { engine, linker: Arc::new(linker), policy: Arc::new(policy) })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The effective limits of a manifest under this host's policy, or why it is refused.
    pub fn limits(&self, manifest: &Manifest) -> Result<Limits, LoadError> {
        let asked = manifest.limits.unwrap_or_default();
        let p = &self.policy;
        if asked.memory_bytes > p.max_memory {
            return Err(LoadError::Refused(format!(
                "plugin asks for {} bytes of memory; this host allows at most {}",
                asked.memory_bytes, p.max_memory
            )));
        }
        if asked.fuel > p.max_fuel {
            return Err(LoadError::Refused(format!(
                "plugin asks for {} fuel; this host allows at most {}",
                asked.fuel, p.max_fuel
            )));
        }
        if u128::from(asked.timeout_ms) > p.max_timeout.as_millis() {
            return Err(LoadError::Refused(format!(
                "plugin asks for a {}ms deadline; this host allows at most {}ms",
                asked.timeout_ms,
                p.max_timeout.as_millis()
            )));
        }
        if manifest.network {
            return Err(LoadError::Refused(
                "plugin asks for network access, which webassembly plugins cannot have (wasi preview 1 has no sockets); run it as a native plugin".into(),
            ));
        }
        for d in &manifest.directories {
            if !p.directories.contains_key(d) {
                return Err(LoadError::Refused(format!(
                    "plugin asks for directory {d:?}, which the operator has not allowed (--plugin-dir {d}=PATH)"
                )));
            }
        }
        let or = |v: u64, max: u64| if v == 0 { max } else { v };
        Ok(Limits {
            memory_bytes: or(asked.memory_bytes, p.max_memory),
            fuel: or(asked.fuel, p.max_fuel),
            timeout_ms: if asked.timeout_ms == 0 { p.max_timeout.as_millis() as u32 } else { asked.timeout_ms },
        })
    }

    /// Compiles and pre-instantiates a module: all the work an invocation must not repeat.
    pub fn load(&self, wasm: &[u8], manifest: &Manifest) -> Result<Compiled, LoadError> {
        let limits = self.limits(manifest)?;
        let module = Module::from_binary(&self.engine, wasm).map_err(|e| LoadError::InvalidModule(one_line(&e)))?;
        match module.get_export("cim_invoke") {
            Some(wasmtime::ExternType::Func(f)) => {
                let params: Vec<ValType> = f.params().collect();
                let results: Vec<ValType> = f.results().collect();
                if !params.is_empty() || results.len() != 1 || !matches!(results[0], ValType::I32) {
                    return Err(LoadError::Abi("cim_invoke must have the type () -> i32".into()));
                }
            }
            _ => return Err(LoadError::Abi("the module does not export the function cim_invoke".into())),
        }
        if !matches!(module.get_export("memory"), Some(wasmtime::ExternType::Memory(_))) {
            return Err(LoadError::Abi("the module does not export its memory as \"memory\"".into()));
        }
        let pre = self.linker.instantiate_pre(&module).map_err(|e| LoadError::Abi(one_line(&e)))?;
        let directories = manifest
            .directories
            .iter()
            .filter_map(|d| self.policy.directories.get(d).map(|p| (d.clone(), p.clone())))
            .collect();
        let wasi = module.imports().any(|i| i.module() == "wasi_snapshot_preview1");
        Ok(Compiled { engine: self.engine.clone(), wasi, pre, limits, directories, max_output: self.policy.max_output })
    }
}

/// A module ready to run: compiled and pre-instantiated once, instantiated per invocation.
pub struct Compiled {
    engine: Engine,
    /// The module imports WASI (building a WASI context costs microseconds; skip it otherwise).
    wasi: bool,
    pre: InstancePre<State>,
    limits: Limits,
    directories: Vec<(String, PathBuf)>,
    max_output: usize,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("limits", &self.limits).finish()
    }
}

/// The result of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: Status,
    pub output: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    /// One-line reason when `status` is not OK.
    pub message: String,
    pub duration: Duration,
    pub fuel_used: u64,
}

impl Outcome {
    fn failed(status: Status, message: String) -> Outcome {
        Outcome {
            status,
            output: Vec::new(),
            metadata: BTreeMap::new(),
            message,
            duration: Duration::ZERO,
            fuel_used: 0,
        }
    }
}

impl Compiled {
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Runs `cim_invoke` once in a fresh instance. `timeout` can only shorten the plugin's
    /// own deadline. Never panics on anything the plugin does.
    pub fn invoke(&self, input: Bytes, metadata: HashMap<String, String>, timeout: Option<Duration>) -> Outcome {
        let started = Instant::now();
        let mut outcome = self.run(input, metadata, timeout);
        outcome.duration = started.elapsed();
        outcome
    }

    fn run(&self, input: Bytes, metadata: HashMap<String, String>, timeout: Option<Duration>) -> Outcome {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = if self.wasi {
            let mut wasi = WasiCtxBuilder::new();
            wasi.stderr(stderr.clone());
            for (name, path) in &self.directories {
                if let Err(e) = wasi.preopened_dir(path, format!("/{name}"), DirPerms::READ, FilePerms::READ) {
                    return Outcome::failed(
                        Status::Unavailable,
                        format!("directory {name} ({}) cannot be opened: {e}", path.display()),
                    );
                }
            }
            Some(wasi.build_p1())
        } else {
            None
        };
        let state = State {
            wasi,
            limiter: Limiter { max_memory: self.limits.memory_bytes as usize, hit: false },
            input,
            metadata,
            output: Vec::new(),
            out_meta: BTreeMap::new(),
            error: None,
            malformed: None,
            max_output: self.max_output,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        let fuel = self.limits.fuel;
        if let Err(e) = store.set_fuel(fuel) {
            return Outcome::failed(Status::Unavailable, one_line(&e));
        }
        let mut deadline = Duration::from_millis(u64::from(self.limits.timeout_ms));
        if let Some(t) = timeout
            && !t.is_zero()
        {
            deadline = deadline.min(t);
        }
        store.set_epoch_deadline(deadline.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1);
        store.epoch_deadline_trap();

        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), i32>(&mut store, "cim_invoke"))
            .and_then(|f| f.call(&mut store, ()));
        let fuel_used = fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let state = store.into_data();
        let stderr_text = String::from_utf8_lossy(&stderr.contents()).trim().to_string();
        let mut outcome = classify(result, state, &stderr_text);
        outcome.fuel_used = fuel_used;
        if outcome.status != Status::Ok && !stderr_text.is_empty() {
            let tail: String = stderr_text.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            outcome.metadata.insert(cim_events::plugin::meta::STDERR.to_string(), tail);
        }
        outcome
    }
}

fn classify(result: wasmtime::Result<i32>, state: State, stderr: &str) -> Outcome {
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(reason) = state.malformed {
                return Outcome::failed(Status::MalformedOutput, reason);
            }
            if state.limiter.hit {
                return Outcome::failed(
                    Status::OutOfMemory,
                    format!("plugin needed more than its {} bytes of memory", state.limiter.max_memory),
                );
            }
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                if exit.0 == 0 {
                    0
                } else {
                    return Outcome::failed(Status::PluginFailed, format!("plugin exited with code {}", exit.0));
                }
            } else {
                return match e.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => {
                        Outcome::failed(Status::OutOfFuel, "plugin used up its fuel (cpu limit)".into())
                    }
                    Some(Trap::Interrupt) => {
                        Outcome::failed(Status::DeadlineExceeded, "plugin did not finish before its deadline".into())
                    }
                    Some(trap) => {
                        let mut m = format!("plugin trapped: {trap}");
                        if let Some(line) = stderr.lines().find(|l| !l.trim().is_empty()) {
                            m.push_str(&format!(" (stderr: {})", line.trim()));
                        }
                        Outcome::failed(Status::Trapped, m)
                    }
                    None => Outcome::failed(Status::Trapped, format!("plugin failed: {}", one_line(&e))),
                };
            }
        }
    };
    let State { output, out_meta, error, .. } = state;
    match code {
        0 => Outcome {
            status: Status::Ok,
            output,
            metadata: out_meta,
            message: String::new(),
            duration: Duration::ZERO,
            fuel_used: 0,
        },
        1 => Outcome {
            status: Status::InvalidInput,
            output: Vec::new(),
            metadata: out_meta,
            message: error.unwrap_or_else(|| "plugin refused the input".into()),
            duration: Duration::ZERO,
            fuel_used: 0,
        },
        n => Outcome {
            status: Status::PluginFailed,
            output: Vec::new(),
            metadata: out_meta,
            message: error.unwrap_or_else(|| format!("plugin returned status {n}")),
            duration: Duration::ZERO,
            fuel_used: 0,
        },
    }
}

/// The first line of an error chain, lowercase-ish and short.
fn one_line(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let s = s.lines().next().unwrap_or_default().trim().to_string();
    if s.len() <= 400 {
        return s;
    }
    // `str::floor_char_boundary` is newer than the workspace's rust-version.
    let end = (0..=400).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}...", &s[..end])
}

/// Per-invocation state of a store.
pub struct State {
    wasi: Option<WasiP1Ctx>,
    limiter: Limiter,
    input: Bytes,
    metadata: HashMap<String, String>,
    output: Vec<u8>,
    out_meta: BTreeMap<String, String>,
    error: Option<String>,
    /// Set when the plugin broke the output ABI; the invocation then stops.
    malformed: Option<String>,
    max_output: usize,
}

struct Limiter {
    max_memory: usize,
    hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> anyhow::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> anyhow::Result<bool> {
        Ok(desired <= 100_000)
    }
}

fn memory(caller: &mut Caller<'_, State>) -> anyhow::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => anyhow::bail!("plugin has no exported memory"),
    }
}

/// Reads `len` bytes at `ptr` of the plugin's memory, or marks the output malformed.
fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32, what: &str) -> anyhow::Result<Vec<u8>> {
    let mem = memory(caller)?;
    let (start, n) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&*caller);
    match data.get(start..start.saturating_add(n)) {
        Some(bytes) if len >= 0 => Ok(bytes.to_vec()),
        _ => {
            let reason = format!("{what} range {start}+{n} is outside the plugin's {}-byte memory", data.len());
            caller.data_mut().malformed = Some(reason.clone());
            anyhow::bail!(reason)
        }
    }
}

fn read_str(caller: &mut Caller<'_, State>, ptr: i32, len: i32, what: &str) -> anyhow::Result<String> {
    let bytes = read(caller, ptr, len, what)?;
    String::from_utf8(bytes).map_err(|_| {
        let reason = format!("{what} is not utf-8");
        caller.data_mut().malformed = Some(reason.clone());
        anyhow::anyhow!(reason)
    })
}

fn add_host_functions(linker: &mut Linker<State>) -> anyhow::Result<()> {
    linker.func_wrap("cim", "input_len", |caller: Caller<'_, State>| -> i32 { caller.data().input.len() as i32 })?;
    linker.func_wrap("cim", "input_read", |mut caller: Caller<'_, State>, ptr: i32| -> anyhow::Result<()> {
        let mem = memory(&mut caller)?;
        let input = caller.data().input.clone();
        mem.write(&mut caller, ptr as u32 as usize, &input).map_err(|_| {
            anyhow::anyhow!("input_read: {} bytes at {} do not fit in the plugin's memory", input.len(), ptr as u32)
        })
    })?;
    linker.func_wrap(
        "cim",
        "meta_get",
        |mut caller: Caller<'_, State>, kptr: i32, klen: i32, vptr: i32, vcap: i32| -> anyhow::Result<i32> {
            let key = read_str(&mut caller, kptr, klen, "metadata key")?;
            let Some(value) = caller.data().metadata.get(&key).cloned() else { return Ok(-1) };
            let n = value.len().min(vcap.max(0) as usize);
            let mem = memory(&mut caller)?;
            mem.write(&mut caller, vptr as u32 as usize, &value.as_bytes()[..n])
                .map_err(|_| anyhow::anyhow!("meta_get: value buffer is outside the plugin's memory"))?;
            Ok(value.len() as i32)
        },
    )?;
    linker.func_wrap("cim", "output", |mut caller: Caller<'_, State>, ptr: i32, len: i32| -> anyhow::Result<()> {
        let bytes = read(&mut caller, ptr, len, "output")?;
        let state = caller.data_mut();
        if state.output.len() + bytes.len() > state.max_output {
            let reason = format!("output is larger than the {} bytes allowed", state.max_output);
            state.malformed = Some(reason.clone());
            anyhow::bail!(reason);
        }
        state.output.extend_from_slice(&bytes);
        Ok(())
    })?;
    linker.func_wrap(
        "cim",
        "meta_set",
        |mut caller: Caller<'_, State>, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> anyhow::Result<()> {
            let key = read_str(&mut caller, kptr, klen, "metadata key")?;
            let value = read_str(&mut caller, vptr, vlen, "metadata value")?;
            let state = caller.data_mut();
            if state.out_meta.len() >= 256 || key.len() > 256 || value.len() > 64 * 1024 {
                state.malformed = Some("too much metadata (at most 256 keys of 256 bytes, values of 64 KiB)".into());
                anyhow::bail!("too much metadata");
            }
            state.out_meta.insert(key, value);
            Ok(())
        },
    )?;
    linker.func_wrap("cim", "error", |mut caller: Caller<'_, State>, ptr: i32, len: i32| -> anyhow::Result<()> {
        let bytes = read(&mut caller, ptr, len.min(4096), "error message")?;
        caller.data_mut().error = Some(String::from_utf8_lossy(&bytes).lines().next().unwrap_or_default().to_string());
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest { name: "t".into(), version: "1".into(), ..Default::default() }
    }

    fn load(wat: &str, m: Manifest) -> Result<Compiled, LoadError> {
        let sandbox = Sandbox::new(Policy {
            max_fuel: 50_000_000,
            max_timeout: Duration::from_secs(2),
            max_memory: 4 << 20,
            ..Default::default()
        })
        .unwrap();
        sandbox.load(&wat::parse_str(wat).unwrap(), &m)
    }

    const ECHO: &str = r#"(module
      (import "cim" "input_len" (func $len (result i32)))
      (import "cim" "input_read" (func $read (param i32)))
      (import "cim" "output" (func $out (param i32 i32)))
      (memory (export "memory") 1)
      (func (export "cim_invoke") (result i32)
        (call $read (i32.const 0))
        (call $out (i32.const 0) (call $len))
        (i32.const 0)))"#;

    #[test]
    fn echo_round_trips() {
        let c = load(ECHO, manifest()).unwrap();
        let o = c.invoke(Bytes::from_static(b"hello"), HashMap::new(), None);
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.output, b"hello");
        assert!(o.fuel_used > 0);
    }

    #[test]
    fn bad_plugins_fail_with_their_reason() {
        let body =
            |b: &str| format!(r#"(module (memory (export "memory") 1) (func (export "cim_invoke") (result i32) {b}))"#);
        let trap = load(&body("unreachable"), manifest()).unwrap().invoke(Bytes::new(), HashMap::new(), None);
        assert_eq!(trap.status, Status::Trapped);
        assert!(trap.message.contains("unreachable"), "{}", trap.message);

        let spin = load(&body("(loop (br 0)) (i32.const 0)"), manifest()).unwrap();
        assert_eq!(spin.invoke(Bytes::new(), HashMap::new(), None).status, Status::OutOfFuel);

        let mut m = manifest();
        m.limits = Some(Limits { fuel: 0, memory_bytes: 0, timeout_ms: 0 });
        let grow =
            body("(block (loop (br_if 1 (i32.eq (memory.grow (i32.const 1)) (i32.const -1))) (br 0))) unreachable");
        let o = load(&grow, m).unwrap().invoke(Bytes::new(), HashMap::new(), None);
        assert_eq!(o.status, Status::OutOfMemory, "{}", o.message);

        assert!(matches!(
            load(&body("(i32.const 0)").replace("cim_invoke", "other"), manifest()),
            Err(LoadError::Abi(_))
        ));
        let err = Sandbox::new(Policy::default()).unwrap().load(b"not wasm", &manifest()).unwrap_err();
        assert!(matches!(err, LoadError::InvalidModule(_)), "{err}");
    }

    #[test]
    fn wasi_clocks_and_stderr_work() {
        let wat = r#"(module
          (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "boom")
          (func (export "cim_invoke") (result i32)
            (if (call $clock (i32.const 0) (i64.const 0) (i32.const 0)) (then (return (i32.const 3))))
            (i32.store (i32.const 200) (i32.const 100))
            (i32.store (i32.const 204) (i32.const 4))
            (drop (call $write (i32.const 2) (i32.const 200) (i32.const 1) (i32.const 208)))
            unreachable))"#;
        let o = load(wat, manifest()).unwrap().invoke(Bytes::new(), HashMap::new(), None);
        assert_eq!(o.status, Status::Trapped, "{}", o.message);
        assert!(o.message.contains("stderr: boom"), "{}", o.message);
        assert_eq!(o.metadata[cim_events::plugin::meta::STDERR], "boom");
    }

    #[test]
    fn output_outside_memory_is_malformed() {
        let wat = r#"(module (import "cim" "output" (func $out (param i32 i32)))
          (memory (export "memory") 1)
          (func (export "cim_invoke") (result i32) (call $out (i32.const 65000) (i32.const 1000)) (i32.const 0)))"#;
        let o = load(wat, manifest()).unwrap().invoke(Bytes::new(), HashMap::new(), None);
        assert_eq!(o.status, Status::MalformedOutput, "{}", o.message);
        assert!(o.message.contains("outside"), "{}", o.message);
    }

    #[test]
    fn manifests_asking_too_much_are_refused() {
        let mut m = manifest();
        m.limits = Some(Limits { memory_bytes: 1 << 40, ..Default::default() });
        assert!(matches!(load(ECHO, m), Err(LoadError::Refused(_))));
        let mut m = manifest();
        m.network = true;
        assert!(load(ECHO, m).unwrap_err().to_string().contains("network"));
        let mut m = manifest();
        m.directories = vec!["data".into()];
        assert!(load(ECHO, m).unwrap_err().to_string().contains("--plugin-dir data=PATH"));
    }
}
