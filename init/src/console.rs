//! What the init prints on the console: nothing but errors and the final status line, unless
//! `oci2uk.debug=1` asks for each step with its time.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::sys;

static DEBUG: AtomicBool = AtomicBool::new(false);
static LAST: Mutex<f64> = Mutex::new(0.0);

/// Turns step-by-step output on.
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether step-by-step output is on.
pub fn debug_on() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Prints one line as it is, on the console.
pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    // Nothing useful can be done when the console is gone.
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// `oci2uk: error: ...`.
pub fn error(msg: &str) {
    line(&format!("oci2uk: error: {msg}"));
}

/// `oci2uk: warning: ...`: something is wrong but the application can still start.
pub fn warn(msg: &str) {
    line(&format!("oci2uk: warning: {msg}"));
}

/// A step, with the time since boot and since the previous step, when debugging.
pub fn step(msg: impl FnOnce() -> String) {
    if !debug_on() {
        return;
    }
    let now = sys::boot_time();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let delta = if *last > 0.0 { now - *last } else { 0.0 };
    *last = now;
    drop(last);
    line(&format!(
        "oci2uk: [{now:9.6}] (+{:6.1} ms) {}",
        delta * 1e3,
        msg()
    ));
}
