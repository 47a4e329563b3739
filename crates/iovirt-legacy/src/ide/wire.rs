//! Typed views of the IDE controller's on-wire layouts: bus-master PRD entries
//! in guest memory and ATAPI command descriptor blocks (CDBs).
//!
//! Each view wraps a byte buffer, checks its length once in `new_checked`, and
//! then reads named fields without any further bounds arithmetic in the
//! command logic (the smoltcp `wire` split).

/// Byte ranges of a physical region descriptor (PRD), 8 bytes little-endian.
mod prd_field {
    use std::ops::Range;
    /// Physical base address of the region (bit 0 is reserved, reads as 0).
    pub const ADDRESS: Range<usize> = 0..4;
    /// Byte count of the region (bit 0 reserved; 0 means 64 KiB).
    pub const COUNT: Range<usize> = 4..6;
    /// Flags word: bit 15 is the end-of-table marker.
    pub const FLAGS: Range<usize> = 6..8;
}

/// Size in bytes of one PRD entry.
pub const PRD_ENTRY_LEN: usize = 8;
/// Flags word bit 15: this is the last PRD of the table (EOT).
pub const PRD_EOT: u16 = 0x8000;
/// A byte count of 0 in a PRD means 64 KiB.
pub const PRD_MAX_BYTES: u32 = 0x1_0000;

/// Why a buffer cannot be viewed as a PRD entry or CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the layout.
    #[error("buffer of {len} bytes is shorter than the {need}-byte layout")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes the layout needs.
        need: usize,
    },
}

fn le16(b: &[u8]) -> u16 {
    let mut w = [0u8; 2];
    w.copy_from_slice(&b[..2]);
    u16::from_le_bytes(w)
}

fn le32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

fn be16(b: &[u8]) -> u16 {
    let mut w = [0u8; 2];
    w.copy_from_slice(&b[..2]);
    u16::from_be_bytes(w)
}

fn be32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_be_bytes(w)
}

/// A read-only view of one PRD entry as the bus master fetches it.
#[derive(Debug, Clone, Copy)]
pub struct PrdEntry<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> PrdEntry<T> {
    /// Wrap `buffer`, checking that it holds a whole entry.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let len = buffer.as_ref().len();
        if len < PRD_ENTRY_LEN {
            return Err(WireError::Truncated {
                len,
                need: PRD_ENTRY_LEN,
            });
        }
        Ok(PrdEntry { buffer })
    }

    /// Physical address of the region (bit 0 masked off, as the PIIX ignores it).
    pub fn address(&self) -> u32 {
        le32(&self.buffer.as_ref()[prd_field::ADDRESS]) & !1
    }

    /// Length of the region in bytes: 1..=65536 (a count of 0 means 64 KiB;
    /// bit 0 is masked off as on the PIIX).
    pub fn byte_count(&self) -> u32 {
        match u32::from(le16(&self.buffer.as_ref()[prd_field::COUNT])) & !1 {
            0 => PRD_MAX_BYTES,
            n => n,
        }
    }

    /// Whether this is the last entry of the table.
    pub fn is_last(&self) -> bool {
        le16(&self.buffer.as_ref()[prd_field::FLAGS]) & PRD_EOT != 0
    }
}

/// The meaning of a PRD entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrdRepr {
    /// Guest-physical base address.
    pub address: u32,
    /// Length in bytes (1..=65536).
    pub len: u32,
    /// End of table.
    pub last: bool,
}

impl PrdRepr {
    /// Parse a checked entry.
    pub fn parse<T: AsRef<[u8]>>(entry: &PrdEntry<T>) -> Self {
        PrdRepr {
            address: entry.address(),
            len: entry.byte_count(),
            last: entry.is_last(),
        }
    }

    /// Emit the entry as the 8 bytes a driver writes to memory.
    pub fn emit(&self) -> [u8; PRD_ENTRY_LEN] {
        let mut out = [0u8; PRD_ENTRY_LEN];
        out[prd_field::ADDRESS].copy_from_slice(&self.address.to_le_bytes());
        let count = if self.len >= PRD_MAX_BYTES {
            0
        } else {
            self.len as u16
        };
        out[prd_field::COUNT].copy_from_slice(&count.to_le_bytes());
        let flags = if self.last { PRD_EOT } else { 0 };
        out[prd_field::FLAGS].copy_from_slice(&flags.to_le_bytes());
        out
    }
}

/// Byte offsets of the CDB fields this drive reads.
mod cdb_field {
    use std::ops::Range;
    /// Operation code.
    pub const OPCODE: usize = 0;
    /// Byte 1: command-specific flags (MSF, polled, RT, ...).
    pub const FLAGS1: usize = 1;
    /// Byte 2: page code / format / first LBA byte.
    pub const BYTE2: usize = 2;
    /// Byte 4: 6-byte commands' allocation length or START STOP flags.
    pub const BYTE4: usize = 4;
    /// Byte 6: READ TOC starting track.
    pub const BYTE6: usize = 6;
    /// Byte 9: READ TOC's old-style format bits 7:6.
    pub const BYTE9: usize = 9;
    /// Logical block address of READ(10)/READ(12).
    pub const LBA: Range<usize> = 2..6;
    /// Starting feature of GET CONFIGURATION.
    pub const FEATURE: Range<usize> = 2..4;
    /// 16-bit allocation length (10-byte commands) / READ(10) transfer length.
    pub const LEN10: Range<usize> = 7..9;
    /// 32-bit transfer length of READ(12).
    pub const LEN12: Range<usize> = 6..10;
    /// 16-bit allocation length of 6-byte INQUIRY (bytes 3..5).
    pub const ALLOC6: Range<usize> = 3..5;
}

/// Length of an ATAPI command packet.
pub const CDB_LEN: usize = 12;

/// A read-only view of a 12-byte ATAPI command descriptor block.
#[derive(Debug, Clone, Copy)]
pub struct Cdb<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Cdb<T> {
    /// Wrap `buffer`, checking that it holds a whole packet.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let len = buffer.as_ref().len();
        if len < CDB_LEN {
            return Err(WireError::Truncated { len, need: CDB_LEN });
        }
        Ok(Cdb { buffer })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Operation code (byte 0).
    pub fn opcode(&self) -> u8 {
        self.b()[cdb_field::OPCODE]
    }
    /// Byte 1 flags.
    pub fn flags1(&self) -> u8 {
        self.b()[cdb_field::FLAGS1]
    }
    /// Byte 2 (page code, format, ...).
    pub fn byte2(&self) -> u8 {
        self.b()[cdb_field::BYTE2]
    }
    /// Byte 4 (6-byte allocation length, START STOP UNIT flags, PREVENT bit).
    pub fn byte4(&self) -> u8 {
        self.b()[cdb_field::BYTE4]
    }
    /// Byte 6 (READ TOC starting track).
    pub fn byte6(&self) -> u8 {
        self.b()[cdb_field::BYTE6]
    }
    /// Byte 9 (control; old READ TOC format bits).
    pub fn byte9(&self) -> u8 {
        self.b()[cdb_field::BYTE9]
    }
    /// Big-endian LBA of READ(10)/READ(12).
    pub fn lba(&self) -> u32 {
        be32(&self.b()[cdb_field::LBA])
    }
    /// Big-endian 16-bit allocation/transfer length at bytes 7..9.
    pub fn len10(&self) -> u16 {
        be16(&self.b()[cdb_field::LEN10])
    }
    /// Big-endian 32-bit transfer length of READ(12).
    pub fn len12(&self) -> u32 {
        be32(&self.b()[cdb_field::LEN12])
    }
    /// Big-endian 16-bit allocation length at bytes 3..5 (INQUIRY).
    pub fn alloc6(&self) -> u16 {
        be16(&self.b()[cdb_field::ALLOC6])
    }
    /// Starting feature number of GET CONFIGURATION.
    pub fn feature(&self) -> u16 {
        be16(&self.b()[cdb_field::FEATURE])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prd_round_trip_and_zero_count() {
        let r = PrdRepr {
            address: 0x1000,
            len: PRD_MAX_BYTES,
            last: true,
        };
        let bytes = r.emit();
        assert_eq!(bytes, [0, 0x10, 0, 0, 0, 0, 0, 0x80]);
        let e = PrdEntry::new_checked(&bytes[..]).unwrap();
        assert_eq!(PrdRepr::parse(&e), r);
        assert!(PrdEntry::new_checked(&bytes[..7]).is_err());
    }

    #[test]
    fn cdb_fields() {
        let mut p = [0u8; 12];
        p[0] = 0x28;
        p[2..6].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        p[7..9].copy_from_slice(&3u16.to_be_bytes());
        let c = Cdb::new_checked(&p[..]).unwrap();
        assert_eq!((c.opcode(), c.lba(), c.len10()), (0x28, 0x1234_5678, 3));
        assert!(Cdb::new_checked(&p[..11]).is_err());
    }
}
