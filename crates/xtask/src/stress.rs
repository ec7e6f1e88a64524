//! `cargo xtask test --stress`: the suite while the machine is busy. One busy loop per core
//! takes every CPU at normal priority while the tests run at a higher one (`nice -n -5`, as
//! root; elsewhere `nice` says it cannot and the tests share the cores evenly with the hog).
//! A test that passes here does not depend on having the machine to itself: it polls with
//! generous deadlines instead of waiting once for something a retry would have fixed.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// The priority the tests run at against the hog (lower is more favoured).
const TEST_NICENESS: &str = "-5";

/// Busy loops on every core until dropped.
pub struct Hog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Hog {
    pub fn start() -> Hog {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        eprintln!("xtask: --stress: {cores} busy loops take every core while the tests run at nice {TEST_NICENESS}");
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                        }
                    }
                })
            })
            .collect();
        Hog { stop, threads }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `cmd` run through `nice -n -5` (the tests against the hog).
pub fn favoured(cmd: &Command) -> Command {
    let mut nice = Command::new("nice");
    nice.args(["-n", TEST_NICENESS]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => nice.env(k, v),
            None => nice.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        nice.current_dir(dir);
    }
    nice
}
