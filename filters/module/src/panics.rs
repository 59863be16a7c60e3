//! Panics caught at the hook boundary: counted process-wide, logged once
//! per hook kind with where they happened, and published as
//! `llm_gateway_module_panics_total` by the stream that saw them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::abi::{self, Level};

/// Panics caught since the library was loaded.
static CAUGHT: AtomicU64 = AtomicU64::new(0);
static LOGGED: AtomicBool = AtomicBool::new(false);

/// Replaces the default hook (which prints to stderr) with Envoy's log: a
/// panic's message and location reach the operator in Envoy's own log.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        abi::log(Level::Critical, &format!("tokentap: panic: {info}"));
    }));
}

/// A hook panicked and the panic was caught; the request went on unharmed.
pub fn caught(hook: &str, payload: &(dyn std::any::Any + Send)) {
    let n = CAUGHT.fetch_add(1, Ordering::Relaxed) + 1;
    let why = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    // The first panic is logged with its message; later ones only in the count.
    if !LOGGED.swap(true, Ordering::Relaxed) || n.is_power_of_two() {
        abi::log(
            Level::Critical,
            &format!("tokentap: a panic in the {hook} hook was caught ({why}); the request passed unharmed and the filter skipped it ({n} caught so far, counted in llm_gateway_module_panics_total)"),
        );
    }
}
