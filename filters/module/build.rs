//! Links the unwinder into libtokentap_module.so instead of needing
//! `libgcc_s.so.1` next to Envoy.
//!
//! The module unwinds (profile `module`: panic = "unwind") so every exported
//! hook can catch a panic. On linux-gnu, std asks the linker for `-lgcc_s`,
//! the shared unwinder, and Envoy's distroless images (what Envoy Gateway
//! runs) ship glibc without it, so the library would not load there.
//! `-C link-arg=-static-libgcc` does not help: rustc names gcc_s itself.
//! `libgcc_eh.a` is the same unwinder, static and with hidden symbols;
//! named here, it comes on the link line before std's `-lgcc_s`, and with
//! rustc's `--as-needed` the linker then records no NEEDED entry for
//! libgcc_s. tests/e2e/test_module_runtime.py checks the NEEDED list and
//! catches a panic in Envoy running from a root filesystem without libgcc_s.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-lib=static:-bundle=gcc_eh");
    }
}
