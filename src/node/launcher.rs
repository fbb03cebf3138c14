//! The launcher: a small process that starts this node's replica and engine
//! processes on the node plugin's behalf, so that they are not the node
//! plugin's descendants.
//!
//! Why: in Kubernetes a container restart kills every process in that
//! container (its cgroup), and a process a program forks stays in the
//! program's container. A node plugin that forked its engines directly
//! would take every attached volume down with it on an upgrade or crash.
//! Run as its own container of the node pod (`shorthorn launcher`), which
//! is rarely restarted, the launcher forks them into its own container
//! instead; the node plugin supervises them by PID (the pod shares one PID
//! namespace) exactly as it supervises processes it adopted after a
//! restart, and finds them again by command line when it comes back. A
//! node plugin stopping with SIGTERM (its container restarted) leaves them
//! running; the launcher stops them, engines first, when it is stopped
//! itself (its pod going away, which would kill them anyway).
//!
//! Protocol, over a unix socket that only the launcher's own user may use:
//! one request per connection, a JSON line `{"args": [...]}` whose first
//! argument is `replica` or `engine`; the answer is a JSON line,
//! `{"pid": N}` or `{"error": "..."}`. The launcher only ever runs its own
//! executable, so the socket cannot be used to run anything else.
//!
//! Must not import `crate::controller` (enforced by `tests/layering.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The modes a launcher starts; anything else is refused.
const MODES: [&str; 2] = ["replica", "engine"];

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a launch may take, connecting included.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What the launcher can fail at, on either side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be served.
    #[error("serving the launcher socket {path}: {cause}")]
    Listen {
        /// The socket path.
        path: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// Talking to the launcher failed.
    #[error("asking the launcher at {path}: {cause}")]
    Call {
        /// The socket path.
        path: String,
        /// Cause.
        cause: String,
    },
    /// The launcher refused or failed the request.
    #[error("the launcher refused: {0}")]
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct LaunchRequest {
    args: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LaunchAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// How long processes get to exit on SIGTERM when the launcher stops,
/// before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The processes this launcher started and that have not exited, by PID,
/// with their mode.
type Children = Arc<Mutex<HashMap<i32, String>>>;

/// Serves launch requests on `socket`, starting `exe` with the requested
/// arguments, until `shutdown` resolves; then stops what it started,
/// engines first (each flushes to replicas still running), then replicas.
/// The launcher stops when its pod goes away, which would kill them
/// anyway: this lets them end cleanly.
pub async fn serve(
    socket: &Path,
    exe: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let children = Children::default();
    let listen_err = |cause| Error::Listen {
        path: socket.display().to_string(),
        cause,
    };
    // A socket left by a previous launcher that was killed.
    if std::fs::symlink_metadata(socket)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        std::fs::remove_file(socket).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(socket).map_err(listen_err)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(listen_err)?;
    tracing::info!(socket = %socket.display(), "launcher serving");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let exe = exe.clone();
                    let children = Arc::clone(&children);
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &exe, &children).await {
                            tracing::warn!(error = %e, "launch request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(socket);
    for mode in ["engine", "replica"] {
        stop_children(&children, mode).await;
    }
    Ok(())
}

/// SIGTERMs every child in `mode` and waits until they are gone, SIGKILLing
/// those still there after [`STOP_GRACE`].
async fn stop_children(children: &Children, mode: &str) {
    let of_mode = || -> Vec<Pid> {
        lock(children)
            .iter()
            .filter(|(_, m)| m.as_str() == mode)
            .map(|(pid, _)| Pid::from_raw(*pid))
            .collect()
    };
    let pids = of_mode();
    if pids.is_empty() {
        return;
    }
    tracing::info!(count = pids.len(), mode, "stopping");
    for pid in &pids {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    let mut killed = false;
    while !of_mode().is_empty() {
        if !killed && tokio::time::Instant::now() >= deadline {
            for pid in of_mode() {
                tracing::warn!(pid = pid.as_raw(), mode, "did not stop in time; killing");
                let _ = kill(pid, Signal::SIGKILL);
            }
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lock(c: &Children) -> std::sync::MutexGuard<'_, HashMap<i32, String>> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads one request from `stream`, starts it, answers.
async fn answer(stream: UnixStream, exe: &Path, children: &Children) -> std::io::Result<()> {
    // The socket's mode already keeps other users out; checking the peer
    // also covers a socket directory shared more widely than intended.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    let peer = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    let result = if peer == own {
        let mut line = String::new();
        let mut rd = BufReader::new(rd).take(MAX_REQUEST);
        rd.read_line(&mut line).await?;
        match serde_json::from_str::<LaunchRequest>(&line) {
            Ok(req) => start(exe, &req.args, children),
            Err(e) => Err(format!("undecodable request: {e}")),
        }
    } else {
        Err(format!("user {peer} may not launch; only {own} may"))
    };
    let reply = match result {
        Ok(pid) => LaunchAnswer {
            pid: Some(pid),
            error: None,
        },
        Err(e) => LaunchAnswer {
            pid: None,
            error: Some(e),
        },
    };
    let mut out = serde_json::to_vec(&reply).expect("plain struct");
    out.push(b'\n');
    wr.write_all(&out).await
}

/// Starts `exe args` in its own process group, keeps it in `children`
/// until it exits, and reaps it then.
fn start(exe: &Path, args: &[String], children: &Children) -> Result<i32, String> {
    let mode = args.first().map(String::as_str).unwrap_or_default();
    if !MODES.contains(&mode) {
        return Err(format!(
            "the first argument must be one of {MODES:?}, not {mode:?}"
        ));
    }
    let mut child = spawn_detached(exe, args)?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or("the process exited at once")?;
    tracing::info!(pid, ?args, "started");
    lock(children).insert(pid, mode.to_owned());
    let children = Arc::clone(children);
    tokio::spawn(async move {
        let status = child.wait().await;
        lock(&children).remove(&pid);
        tracing::info!(pid, ?status, "exited");
    });
    Ok(pid)
}

/// Starts `exe args` with no input, in its own process group: a signal
/// meant for its starter's group (a terminal's ^C) does not reach the
/// volumes.
pub(super) fn spawn_detached(exe: &Path, args: &[String]) -> Result<tokio::process::Child, String> {
    tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))
}

/// Asks the launcher at `socket` to start this binary with `args`;
/// returns the new process's PID (not a child of the caller).
pub async fn launch(socket: &Path, args: &[String]) -> Result<Pid, Error> {
    let call_err = |cause: String| Error::Call {
        path: socket.display().to_string(),
        cause,
    };
    let call = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| call_err(e.to_string()))?;
        let mut req = serde_json::to_vec(&LaunchRequest {
            args: args.to_vec(),
        })
        .expect("plain struct");
        req.push(b'\n');
        stream
            .write_all(&req)
            .await
            .map_err(|e| call_err(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(stream)
            .take(MAX_REQUEST)
            .read_line(&mut line)
            .await
            .map_err(|e| call_err(e.to_string()))?;
        let ans: LaunchAnswer = serde_json::from_str(&line)
            .map_err(|e| call_err(format!("undecodable answer {line:?}: {e}")))?;
        match (ans.pid, ans.error) {
            (Some(pid), _) => Ok(Pid::from_raw(pid)),
            (None, e) => Err(Error::Refused(
                e.unwrap_or_else(|| "no reason given".into()),
            )),
        }
    };
    tokio::time::timeout(LAUNCH_TIMEOUT, call)
        .await
        .map_err(|_| call_err(format!("no answer within {LAUNCH_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launcher whose "own executable" is a script that sleeps: it
    /// starts the two modes, refuses anything else without starting a
    /// thing, and stops what it started when it stops.
    #[tokio::test]
    async fn starts_only_its_own_modes_and_stops_them_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("launcher.sock");
        let exe = dir.path().join("fake-shorthorn");
        let marker = dir.path().join("ran");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\nexec sleep 30\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn({
            let sock = sock.clone();
            async move {
                serve(&sock, exe, async {
                    let _ = stop_rx.await;
                })
                .await
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "never listened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );

        for bad in [vec![], vec!["controller".to_owned()], vec!["-c".to_owned()]] {
            let e = launch(&sock, &bad).await.unwrap_err();
            assert!(
                matches!(&e, Error::Refused(m) if m.contains("first argument")),
                "{bad:?}: {e}"
            );
        }
        assert!(
            !marker.exists(),
            "nothing was started for a refused request"
        );

        let args = ["engine", "--volume", "v"].map(str::to_owned);
        let pid = loop {
            match launch(&sock, &args).await {
                // A test thread forking while the script was open for
                // writing holds it busy for a moment.
                Err(Error::Refused(m)) if m.contains("busy") => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                r => break r.unwrap(),
            }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !marker.exists() {
            assert!(std::time::Instant::now() < deadline, "never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "engine --volume v\n"
        );

        assert!(kill(pid, None).is_ok(), "running");
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(!sock.exists(), "socket removed on stop");
        assert!(
            kill(pid, None).is_err(),
            "what it started is stopped (and reaped) before it returns"
        );
        let e = launch(&sock, &["engine".into()]).await.unwrap_err();
        assert!(matches!(e, Error::Call { .. }), "{e}");
    }
}
