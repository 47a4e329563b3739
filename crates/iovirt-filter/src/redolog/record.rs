//! The redo log's on-disk record: a typed view over its bytes ([`Record`]),
//! its parsed form ([`RecordRepr`]) and the CRC-32 that guards both.
//!
//! Layout (little-endian), 48 header bytes followed by `data_len` data bytes:
//!
//! | bytes  | field      | meaning |
//! |--------|------------|---------|
//! | 0..4   | magic      | [`RECORD_MAGIC`] |
//! | 4      | kind       | [`RecordKind`] |
//! | 5..8   | reserved   | 0 |
//! | 8..16  | seq        | sequence number, strictly increasing along the log |
//! | 16..24 | time       | nanoseconds since the Unix epoch (from the log's clock) |
//! | 24..32 | offset     | first disk byte the record covers |
//! | 32..40 | disk_len   | disk bytes it covers |
//! | 40..44 | data_len   | data bytes after the header |
//! | 44..48 | crc        | CRC-32 (IEEE) of the header with this field zero, then the data |

use std::ops::Range;

/// The first four bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"IVRL";
/// Bytes in a record header.
pub const HEADER_LEN: usize = 48;
/// The largest data a record may carry (a single write of 64 MiB).
pub const MAX_DATA_LEN: u32 = 64 << 20;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const KIND: usize = 4;
    pub const RESERVED: Range<usize> = 5..8;
    pub const SEQ: Range<usize> = 8..16;
    pub const TIME: Range<usize> = 16..24;
    pub const OFFSET: Range<usize> = 24..32;
    pub const DISK_LEN: Range<usize> = 32..40;
    pub const DATA_LEN: Range<usize> = 40..44;
    pub const CRC: Range<usize> = 44..48;
}

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// The first record of every log file: `seq` is the point merged into the base (0 for none).
    Start,
    /// Data written at `offset`; `data_len == disk_len`.
    Write,
    /// `[offset, offset + disk_len)` reads as zeroes (write-zeroes, discard); no data.
    Zero,
    /// A named snapshot: the data is the name (UTF-8); the disk is unchanged.
    Snapshot,
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Start => 1,
            RecordKind::Write => 2,
            RecordKind::Zero => 3,
            RecordKind::Snapshot => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => RecordKind::Start,
            2 => RecordKind::Write,
            3 => RecordKind::Zero,
            4 => RecordKind::Snapshot,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header, or than the header says the data needs.
    #[error("short record: {have} bytes, {need} needed")]
    Short {
        /// Bytes there are.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic is wrong.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// The kind byte is unknown.
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// Fields that do not agree (data length of a write, a range that overflows, ...).
    #[error("inconsistent record: {0}")]
    Inconsistent(String),
    /// The checksum does not match.
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// What the record says.
        stored: u32,
        /// What its bytes give.
        computed: u32,
    },
}

/// A running CRC-32 (IEEE 802.3, as zlib's `crc32`), computed by `crc32fast`
/// (carry-less multiplication where the CPU has it: a 4 KiB record costs a
/// fraction of a microsecond instead of several with a byte-wise table).
#[derive(Clone, Debug, Default)]
pub struct Crc32(crc32fast::Hasher);

impl Crc32 {
    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The checksum of everything fed.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// CRC-32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::default();
    c.update(data);
    c.finish()
}

/// A typed view of a record header (and, when present, its data) in a buffer.
///
/// [`Record::new_checked`] checks the length once; the accessors then cannot
/// go out of bounds.
#[derive(Debug)]
pub struct Record<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Record<T> {
    /// Wrap `buf` if it holds at least a header.
    pub fn new_checked(buf: T) -> Result<Self, RecordError> {
        let have = buf.as_ref().len();
        if have < HEADER_LEN {
            return Err(RecordError::Short {
                have,
                need: HEADER_LEN,
            });
        }
        Ok(Record { buf })
    }

    fn array<const N: usize>(&self, r: Range<usize>) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.buf.as_ref().get(r) {
            if s.len() == N {
                out.copy_from_slice(s);
            }
        }
        out
    }

    /// The magic bytes.
    pub fn magic(&self) -> [u8; 4] {
        self.array(field::MAGIC)
    }
    /// The kind byte.
    pub fn kind_code(&self) -> u8 {
        self.buf.as_ref().get(field::KIND).copied().unwrap_or(0)
    }
    /// The reserved bytes.
    pub fn reserved(&self) -> [u8; 3] {
        self.array(field::RESERVED)
    }
    /// The sequence number.
    pub fn seq(&self) -> u64 {
        u64::from_le_bytes(self.array(field::SEQ))
    }
    /// The timestamp (ns since the Unix epoch).
    pub fn time(&self) -> u64 {
        u64::from_le_bytes(self.array(field::TIME))
    }
    /// First disk byte.
    pub fn offset(&self) -> u64 {
        u64::from_le_bytes(self.array(field::OFFSET))
    }
    /// Disk bytes covered.
    pub fn disk_len(&self) -> u64 {
        u64::from_le_bytes(self.array(field::DISK_LEN))
    }
    /// Data bytes after the header.
    pub fn data_len(&self) -> u32 {
        u32::from_le_bytes(self.array(field::DATA_LEN))
    }
    /// The stored CRC.
    pub fn crc(&self) -> u32 {
        u32::from_le_bytes(self.array(field::CRC))
    }
    /// The header bytes.
    pub fn header(&self) -> &[u8] {
        self.buf.as_ref().get(..HEADER_LEN).unwrap_or(&[])
    }
    /// The data bytes present in the buffer (up to `data_len`).
    pub fn data(&self) -> &[u8] {
        let b = self.buf.as_ref();
        let end = HEADER_LEN
            .saturating_add(self.data_len() as usize)
            .min(b.len());
        b.get(HEADER_LEN..end).unwrap_or(&[])
    }

    /// The CRC of the header (CRC field zero) followed by `data`.
    pub fn compute_crc(&self, data: &[u8]) -> u32 {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(self.header());
        h[field::CRC].fill(0);
        let mut c = Crc32::default();
        c.update(&h);
        c.update(data);
        c.finish()
    }
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRepr {
    /// What it says.
    pub kind: RecordKind,
    /// Sequence number.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time: u64,
    /// First disk byte.
    pub offset: u64,
    /// Disk bytes covered.
    pub disk_len: u64,
    /// Data bytes after the header.
    pub data_len: u32,
}

impl RecordRepr {
    /// Parse a checked header: magic, kind and field consistency (not the
    /// CRC, which needs the data: see [`RecordRepr::check_crc`]).
    pub fn parse<T: AsRef<[u8]>>(r: &Record<T>) -> Result<Self, RecordError> {
        if r.magic() != RECORD_MAGIC {
            return Err(RecordError::Magic(r.magic()));
        }
        let kind = RecordKind::from_code(r.kind_code()).ok_or(RecordError::Kind(r.kind_code()))?;
        if r.reserved() != [0; 3] {
            return Err(RecordError::Inconsistent(
                "reserved bytes are not zero".into(),
            ));
        }
        let repr = RecordRepr {
            kind,
            seq: r.seq(),
            time: r.time(),
            offset: r.offset(),
            disk_len: r.disk_len(),
            data_len: r.data_len(),
        };
        if repr.data_len > MAX_DATA_LEN {
            return Err(RecordError::Inconsistent(format!(
                "data length {} is over the limit of {MAX_DATA_LEN}",
                repr.data_len
            )));
        }
        if repr.offset.checked_add(repr.disk_len).is_none() {
            return Err(RecordError::Inconsistent(format!(
                "range {}+{} overflows",
                repr.offset, repr.disk_len
            )));
        }
        let ok = match kind {
            RecordKind::Write => u64::from(repr.data_len) == repr.disk_len && repr.disk_len > 0,
            RecordKind::Zero => repr.data_len == 0 && repr.disk_len > 0,
            RecordKind::Snapshot | RecordKind::Start => repr.disk_len == 0 && repr.offset == 0,
        };
        if !ok {
            return Err(RecordError::Inconsistent(format!(
                "{kind:?} record with disk length {} and data length {}",
                repr.disk_len, repr.data_len
            )));
        }
        Ok(repr)
    }

    /// Check the stored CRC against the header and `data`.
    pub fn check_crc<T: AsRef<[u8]>>(r: &Record<T>, data: &[u8]) -> Result<(), RecordError> {
        let computed = r.compute_crc(data);
        if computed != r.crc() {
            return Err(RecordError::Crc {
                stored: r.crc(),
                computed,
            });
        }
        Ok(())
    }

    /// Bytes the record takes in the log (header and data).
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.data_len)
    }

    /// The header bytes for this record with `data`, CRC filled in.
    pub fn emit(&self, data: &[u8]) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[field::MAGIC].copy_from_slice(&RECORD_MAGIC);
        h[field::KIND] = self.kind.code();
        h[field::SEQ].copy_from_slice(&self.seq.to_le_bytes());
        h[field::TIME].copy_from_slice(&self.time.to_le_bytes());
        h[field::OFFSET].copy_from_slice(&self.offset.to_le_bytes());
        h[field::DISK_LEN].copy_from_slice(&self.disk_len.to_le_bytes());
        h[field::DATA_LEN].copy_from_slice(&self.data_len.to_le_bytes());
        let mut c = Crc32::default();
        c.update(&h);
        c.update(data);
        h[field::CRC].copy_from_slice(&c.finish().to_le_bytes());
        h
    }
}

/// Parse one whole record (header, data, CRC) at the start of `bytes`;
/// returns it and its data. For fuzzing and tools; the log reads headers and
/// data separately from its file.
pub fn parse_record(bytes: &[u8]) -> Result<(RecordRepr, &[u8]), RecordError> {
    let r = Record::new_checked(bytes)?;
    let repr = RecordRepr::parse(&r)?;
    let need = HEADER_LEN + repr.data_len as usize;
    let data = bytes.get(HEADER_LEN..need).ok_or(RecordError::Short {
        have: bytes.len(),
        need,
    })?;
    RecordRepr::check_crc(&r, data)?;
    Ok((repr, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn emit_parse_round_trip_and_damage() {
        let repr = RecordRepr {
            kind: RecordKind::Write,
            seq: 7,
            time: 99,
            offset: 4096,
            disk_len: 4,
            data_len: 4,
        };
        let mut bytes = repr.emit(b"abcd").to_vec();
        bytes.extend_from_slice(b"abcd");
        assert_eq!(parse_record(&bytes), Ok((repr, &b"abcd"[..])));
        let mut bad = bytes.clone();
        bad[50] ^= 1;
        assert!(matches!(parse_record(&bad), Err(RecordError::Crc { .. })));
        assert!(matches!(
            parse_record(&bytes[..50]),
            Err(RecordError::Short { .. })
        ));
        bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(parse_record(&bad), Err(RecordError::Kind(9)));
    }
}
