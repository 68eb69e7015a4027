//! The control socket: accepts connections, reads one request each (bounded in size and time),
//! hands it to the daemon's loop with the caller's uid, and writes the answer back.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    control::{MAX_REQUEST, Request, Response},
    error::{Error, Result},
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request on its way to the daemon.
pub struct Call {
    pub request: Request,
    pub uid: u32,
    pub reply: oneshot::Sender<Response>,
    /// Fires once the answer has been written, so a daemon that exits after answering (`down`)
    /// can wait for the caller to have it.
    pub written: oneshot::Receiver<()>,
}

/// Binds the socket root-only (mode 0600). A socket file nobody answers on is stale and replaced;
/// one that answers belongs to a running kpf, so this one refuses to start.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // connect() to a file that is not a socket also fails with ECONNREFUSED: without this, a
        // mistyped `socket` would delete whatever file it names.
        if !meta.file_type().is_socket() {
            return Err(Error::Environment(format!(
                "{} exists and is not a socket: set `socket` to another path",
                path.display()
            )));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Error::Environment(format!(
                    "another kpf is already running (it answers on {}); stop it or use another `socket`",
                    path.display()
                )));
            }
            // Only a socket nobody listens on is stale; anything else (no permission, not a
            // socket) is not ours to remove.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(Error::io(format!("removing stale socket {}", path.display())))?;
            }
            Err(e) => return Err(Error::io(format!("checking the existing control socket {}", path.display()))(e)),
        }
    }
    // Created with a umask that leaves no window where others could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(Error::io(format!("binding the control socket {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    listener.set_nonblocking(true).map_err(Error::io("control socket"))?;
    Ok(listener)
}

pub async fn serve(listener: std::os::unix::net::UnixListener, calls: mpsc::Sender<Call>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("control socket: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, calls.clone()));
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_request(stream: &mut UnixStream) -> std::result::Result<Request, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err("no request within 10 s".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    Request::decode(&line)
}

async fn connection(mut stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (written_tx, written) = oneshot::channel();
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            log::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    };
    let response = match read_request(&mut stream).await {
        Err(error) => Response::Err { error },
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if calls.send(Call { request, uid, reply, written }).await.is_err() {
                return;
            }
            match answer.await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| r#"{"error":"unencodable answer"}"#.into());
    text.push('\n');
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
    let _ = written_tx.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kpf-server-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = scratch("file");
        let path = dir.join("kpf.toml");
        std::fs::write(&path, "interface = \"eth0\"\n").unwrap();
        let err = bind(&path).expect_err("bound over a regular file");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "interface = \"eth0\"\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = scratch("sock");
        let path = dir.join("kpf.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = bind(&path).expect("replacing a stale socket");
        let err = bind(&path).expect_err("bound over a live socket");
        assert!(err.to_string().contains("already running"), "{err}");
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
