#![no_main]

use libfuzzer_sys::fuzz_target;
use tokentap_core_fuzz::{checks, run};

fuzz_target!(|data: &[u8]| run(checks::check_trace_context, data));
