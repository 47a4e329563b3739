//! Serial console on stdio: raw mode while the VM runs (restored on exit), and a
//! thread that moves stdin bytes into the UART's receive FIFO. Ctrl-A x quits.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use crate::devices::SerialDevice;
use crate::vcpu::{ExitHandle, ExitReason};

/// Saved terminal settings, restored on drop.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Put stdin in raw mode if it is a terminal; `None` when it is not.
    pub fn enable() -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing so host-side logs still start at column 0.
            t.c_oflag |= libc::OPOST;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring settings read from the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// Start the stdin → UART thread. `escape` enables Ctrl-A x (only on a terminal).
pub fn spawn_input(serial: SerialDevice, exit: Arc<ExitHandle>, escape: bool) -> io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut saw_ctrl_a = false;
            let mut stdin = io::stdin().lock();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return, // EOF: the guest just gets no more input
                    Ok(n) => n,
                };
                let mut pending: Vec<u8> = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape && saw_ctrl_a {
                        saw_ctrl_a = false;
                        if b == b'x' {
                            exit.request(ExitReason::User);
                            return;
                        }
                        if b != 0x01 {
                            pending.push(0x01);
                        }
                    } else if escape && b == 0x01 {
                        saw_ctrl_a = true;
                        continue;
                    }
                    pending.push(b);
                }
                let mut rest = &pending[..];
                while !rest.is_empty() {
                    if exit.stopping() {
                        return;
                    }
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        // FIFO full: the guest has not drained it yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
}
