//! The debug console port (QEMU's `isa-debugcon`, traditionally I/O port 0x402).
//!
//! Firmware such as SeaBIOS and OVMF writes its debug log one byte at a time to
//! this port. Before doing so, some firmware reads the port and only uses it if
//! it answers with QEMU's presence value [`DEBUGCON_PRESENT`].
//!
//! Register the device at [`DEBUGCON_PORT`] with length [`DEBUGCON_LEN`].

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Conventional I/O port of the debug console.
pub const DEBUGCON_PORT: u64 = 0x402;
/// Length of the port range the device claims.
pub const DEBUGCON_LEN: u64 = 1;
/// Value a read returns: QEMU's "a debug console is here" marker (also its default port 0xE9).
pub const DEBUGCON_PRESENT: u8 = 0xe9;

/// Guest-visible state of the debug console: there is none, but the type keeps
/// the snapshot interface uniform with the other device models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugConState {}

/// A write-only byte sink on one I/O port.
///
/// ```
/// use iovirt_bus::BusDeviceMut;
/// use iovirt_legacy::debugcon::{DebugCon, DEBUGCON_PRESENT};
///
/// let mut con = DebugCon::new(Vec::new());
/// let mut b = [0u8; 1];
/// con.read(0, &mut b);
/// assert_eq!(b[0], DEBUGCON_PRESENT);
/// for c in b"hi\n" {
///     con.write(0, &[*c]);
/// }
/// assert_eq!(con.output(), b"hi\n");
/// ```
#[derive(Debug)]
pub struct DebugCon<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> DebugCon<W> {
    /// A debug console that appends every byte the guest writes to `out`.
    pub fn new(out: W) -> Self {
        DebugCon { out }
    }

    /// Restore from a snapshot (the state carries nothing, so this cannot fail).
    pub fn from_state(_state: &DebugConState, out: W) -> Self {
        Self::new(out)
    }

    /// The guest-visible state.
    pub fn state(&self) -> DebugConState {
        DebugConState {}
    }

    /// The output sink.
    pub fn output(&self) -> &W {
        &self.out
    }

    /// The output sink, mutably.
    pub fn output_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Give back the output sink.
    pub fn into_output(self) -> W {
        self.out
    }
}

impl<W: Write + Send> iovirt_bus::BusDeviceMut for DebugCon<W> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUGCON_PRESENT);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // A wider OUT (outw/outl) sends its bytes in order, as QEMU does for byte-wide ports.
        if let Err(e) = self.out.write_all(data) {
            log::debug!("debugcon: output failed: {e}");
            return;
        }
        if data.contains(&b'\n') {
            let _ = self.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::{AddressSpace, Bus};
    use std::sync::{Arc, Mutex};

    /// A writer that can be inspected after it was moved into the device.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_the_bus() {
        let out = Shared::default();
        let bus = Bus::new(AddressSpace::Pio);
        bus.insert(
            "debugcon",
            DEBUGCON_PORT,
            DEBUGCON_LEN,
            Arc::new(Mutex::new(DebugCon::new(out.clone()))),
        )
        .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x402, &mut b));
        assert_eq!(b, [0xe9]);
        for c in b"SeaBIOS" {
            assert!(bus.write(0x402, &[*c]));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"SeaBIOS");
    }

    #[test]
    fn state_round_trip() {
        let con = DebugCon::new(std::io::sink());
        let s = con.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: DebugConState = serde_json::from_str(&json).unwrap();
        assert_eq!(DebugCon::from_state(&back, std::io::sink()).state(), s);
    }
}
