//! `--supervise`: run the server as a child process and start a new one
//! whenever it exits, the way a kubelet restarts a crashed container. A
//! drill's `/admin/restart` therefore gives a real restart: a new process,
//! counters from zero, and the port briefly closed.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::Command;

use crate::config::Args;

/// Why supervision stopped.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot resolve listen address {addr}: {source}")]
    Resolve {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot find own executable: {0}")]
    Exe(std::io::Error),
    #[error("cannot start server child: {0}")]
    Spawn(std::io::Error),
}

/// Resolves port 0 once, so every child listens on the same port.
fn resolve_listen(addr: SocketAddr) -> Result<SocketAddr, SupervisorError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = std::net::TcpListener::bind(addr)
        .map_err(|source| SupervisorError::Resolve { addr, source })?;
    probe
        .local_addr()
        .map_err(|source| SupervisorError::Resolve { addr, source })
}

/// The child's command line: ours without `--supervise` and `--listen`,
/// plus the resolved `--listen`.
pub fn child_args(argv: &[OsString], listen: SocketAddr) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in argv {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--supervise" || s.starts_with("--supervise=") || s.starts_with("--listen=") {
            continue;
        }
        if s == "--listen" {
            skip_next = true;
            continue;
        }
        out.push(a.clone());
    }
    out.push("--listen".into());
    out.push(listen.to_string().into());
    out
}

/// Asks the child to stop (SIGTERM) so it can drain.
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no
    // memory-safety preconditions. FFI is the only way to send SIGTERM
    // (tokio's Child::start_kill sends SIGKILL, which skips draining).
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Runs children until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<(), SupervisorError> {
    let listen = resolve_listen(args.listen)?;
    let exe = std::env::current_exe().map_err(SupervisorError::Exe)?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let child_argv = child_args(&argv, listen);
    let shutdown = crate::server::shutdown_signal();
    tokio::pin!(shutdown);
    let mut restarts: u64 = 0;
    loop {
        let mut child = Command::new(&exe)
            .args(&child_argv)
            .env_remove("LLM_SIM_SUPERVISE")
            .env("LLM_SIM_RESTARTS", restarts.to_string())
            .kill_on_drop(true)
            .spawn()
            .map_err(SupervisorError::Spawn)?;
        tracing::info!(pid = child.id(), %listen, restarts, "supervisor started server");
        tokio::select! {
            status = child.wait() => {
                tracing::warn!(status = ?status.ok(), restarts, "server exited; restarting");
                restarts += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(args.restart_delay_ms)) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
            _ = &mut shutdown => {
                if let Some(pid) = child.id() {
                    terminate(pid);
                }
                let grace = Duration::from_millis(args.drain_timeout_ms + 1000);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_args_drop_supervise_and_pin_the_port() {
        let argv: Vec<OsString> = [
            "--supervise",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "m",
            "--listen=x",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let got = child_args(&argv, "127.0.0.1:4321".parse().unwrap());
        let got: Vec<String> = got
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, ["--model", "m", "--listen", "127.0.0.1:4321"]);
    }

    #[test]
    fn port_zero_is_resolved_once() {
        let a = resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(a.port(), 0);
        let fixed: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        assert_eq!(resolve_listen(fixed).unwrap(), fixed);
    }
}
