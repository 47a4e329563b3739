//! The unix-socket side: accept clients, read request lines, write answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{error_reply, Control};

/// Longest request line accepted, in bytes (newline excluded).
pub const MAX_LINE: usize = 64 * 1024;
/// Most clients connected at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;

/// Serve one client on `stream` until it hangs up: one answer line per
/// request line, in order. Blank lines are skipped; a line longer than
/// [`MAX_LINE`] gets one error answer and the rest of it is discarded.
pub fn serve(control: &Control, stream: UnixStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_LINE as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
            // Too long: answer once, then drop the rest of the line.
            loop {
                line.clear();
                match (&mut reader).take(limit).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            log::warn!("control: a request line longer than {MAX_LINE} bytes was refused");
            error_reply(None, format!("line longer than {MAX_LINE} bytes"))
        } else {
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            control.handle_line(text)
        };
        let mut out = answer.to_string().into_bytes();
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

/// The listening socket, served from a background thread; the socket file
/// is removed on drop (the thread stays until the process exits).
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` (mode 0600; a stale socket there is replaced, a live one
/// or any other file is an error) and serve clients from a thread, each
/// client on its own thread, at most [`MAX_CLIENTS`] at once.
pub fn start(path: &Path, control: Arc<Control>) -> std::io::Result<ControlServer> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let server = ControlServer {
        path: path.to_path_buf(),
    };
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("control: more than {MAX_CLIENTS} clients, one refused");
                    let msg = error_reply(None, format!("more than {MAX_CLIENTS} clients"));
                    let _ = stream.write_all(format!("{msg}\n").as_bytes());
                    continue;
                }
                let control = control.clone();
                let active2 = active.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        serve(&control, stream);
                        active2.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("control: cannot start a client thread: {e}");
                }
            }
        })?;
    log::info!("control socket at {}", path.display());
    Ok(server)
}
