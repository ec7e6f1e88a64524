//! Crash points for fault tests. `CIM_CRASH_AT=<point>[,<point>…]` makes the process abort, as
//! abruptly as a SIGKILL (nothing flushed, no reply, no cleanup), the first time it reaches a
//! named point, so a test can stop a service between two steps of a command instead of hoping
//! a kill lands there. Unset (always, outside tests), a point costs one load of a static.

use std::sync::OnceLock;

/// The environment variable naming the armed points.
pub const ENV: &str = "CIM_CRASH_AT";

fn points() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// True when any point is armed (a test run).
pub fn any() -> bool {
    !points().is_empty()
}

/// True when `point` is armed.
pub fn armed(point: &str) -> bool {
    let points = points();
    !points.is_empty() && points.iter().any(|p| p == point)
}

/// Aborts the process if `point` is armed.
pub fn at(point: &str) {
    if armed(point) {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}
