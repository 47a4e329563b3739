//! QEMU's firmware configuration interface (fw_cfg), legacy port I/O flavour.
//!
//! Firmware (SeaBIOS, OVMF) asks the VMM for its configuration through two I/O
//! ports: it writes a 16-bit key to the selector port and then reads the
//! selected item one byte at a time from the data port. Besides a few fixed
//! keys (signature, interface ID, CPU counts) items are named files listed in a
//! directory at key [`FW_CFG_FILE_DIR`]. This model offers only the
//! traditional interface (no DMA), as announced by [`FW_CFG_ID`] reading 1.
//!
//! Register the device at [`FW_CFG_PORT`] with length [`FW_CFG_LEN`]: offset 0 is
//! the selector (16-bit write, little-endian), offset 1 the data port.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Conventional I/O port base of fw_cfg on x86.
pub const FW_CFG_PORT: u64 = 0x510;
/// Length of the port range: selector at +0, data at +1.
pub const FW_CFG_LEN: u64 = 2;
/// Offset of the selector register (write the 16-bit key here).
pub const SELECTOR_OFFSET: u64 = 0;
/// Offset of the data register (read the selected item byte by byte).
pub const DATA_OFFSET: u64 = 1;

/// Key of the signature item: the four bytes "QEMU".
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Key of the interface ID: bit 0 = traditional interface, bit 1 = DMA (le32).
pub const FW_CFG_ID: u16 = 0x0001;
/// Key of the number of CPUs present at boot (le16).
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
/// Key of the legacy "show boot menu" flag SeaBIOS exposes as etc/show-boot-menu (le16).
pub const FW_CFG_BOOT_MENU: u16 = 0x000e;
/// Key of the maximum number of CPUs (le16), SeaBIOS's etc/max-cpus.
pub const FW_CFG_MAX_CPUS: u16 = 0x000f;
/// Key of the file directory: be32 count, then [`FILE_ENTRY_LEN`]-byte entries.
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
/// First key handed to a file added with [`FwCfg::add_file`].
pub const FW_CFG_FILE_FIRST: u16 = 0x0020;
/// Keys from here on are the write channel and arch-local range; files stop below.
pub const FW_CFG_FILE_END: u16 = 0x4000;
/// Size of one directory entry: be32 size, be16 select, be16 reserved, 56-byte name.
pub const FILE_ENTRY_LEN: usize = 64;
/// Longest file name in bytes (the 56-byte field keeps a terminating NUL).
pub const MAX_FILE_NAME: usize = 55;
/// Interface ID bit: the traditional selector/data interface is available.
pub const FW_CFG_VERSION_TRADITIONAL: u32 = 1;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;
/// e820 type of ACPI reclaimable memory.
pub const E820_ACPI: u32 = 3;
/// e820 type of ACPI NVS memory.
pub const E820_NVS: u32 = 4;
/// Name of the file SeaBIOS reads the memory map from.
pub const E820_FILE: &str = "etc/e820";

/// Why fw_cfg content could not be added or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// The file name does not fit the 56-byte directory field with its NUL, or is empty.
    #[error("fw_cfg file name {0:?} is empty or longer than 55 bytes")]
    NameTooLong(String),
    /// A file of that name already exists.
    #[error("fw_cfg file {0:?} already exists")]
    Duplicate(String),
    /// All file keys (0x20..0x4000) are in use.
    #[error("no free fw_cfg file key for {0:?}")]
    NoFreeKey(String),
    /// An item is larger than the directory's 32-bit size field.
    #[error("fw_cfg item {name:?} is {len} bytes, more than 4 GiB")]
    TooLarge {
        /// Item or file name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// A snapshot names a file whose key has no item, or a key outside the file range.
    #[error("fw_cfg state lists file {name:?} at key {key:#x} that is not a file item")]
    BadFileKey {
        /// File name.
        name: String,
        /// Its key.
        key: u16,
    },
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgFile {
    /// File name, at most [`MAX_FILE_NAME`] bytes.
    pub name: String,
    /// Key that selects it.
    pub key: u16,
}

/// One entry of a firmware memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Type ([`E820_RAM`], [`E820_RESERVED`], ...).
    pub kind: u32,
}

/// Serialisable state of [`FwCfg`]: the content and the guest's read position.
///
/// The directory item is not stored; it is rebuilt from `files`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// Key the guest selected last.
    pub selector: u16,
    /// Read position within the selected item.
    pub offset: u32,
    /// Every item except the directory, by key.
    pub items: BTreeMap<u16, Vec<u8>>,
    /// The files, in directory order.
    pub files: Vec<FwCfgFile>,
}

impl Default for FwCfgState {
    fn default() -> Self {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.insert(FW_CFG_ID, FW_CFG_VERSION_TRADITIONAL.to_le_bytes().to_vec());
        items.insert(FW_CFG_NB_CPUS, 1u16.to_le_bytes().to_vec());
        items.insert(FW_CFG_MAX_CPUS, 1u16.to_le_bytes().to_vec());
        FwCfgState {
            selector: FW_CFG_SIGNATURE,
            offset: 0,
            items,
            files: Vec::new(),
        }
    }
}

/// The fw_cfg device.
///
/// ```
/// use iovirt_bus::BusDeviceMut;
/// use iovirt_legacy::fw_cfg::{E820Entry, FwCfg, E820_RAM};
///
/// let mut cfg = FwCfg::new();
/// cfg.set_cpu_count(2);
/// cfg.add_e820(&[E820Entry { addr: 0, len: 0x9fc00, kind: E820_RAM }]).unwrap();
/// let key = cfg.add_int_file("etc/boot-menu-wait", 2500).unwrap();
/// assert_eq!(key, 0x21);
///
/// // The guest selects the signature and reads it byte by byte.
/// cfg.write(0, &0u16.to_le_bytes());
/// let mut sig = [0u8; 4];
/// for b in sig.iter_mut() {
///     let mut d = [0u8; 1];
///     cfg.read(1, &mut d);
///     *b = d[0];
/// }
/// assert_eq!(&sig, b"QEMU");
/// ```
#[derive(Clone, Debug)]
pub struct FwCfg {
    selector: u16,
    offset: u32,
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<FwCfgFile>,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new()
    }
}

fn check_name(name: &str) -> Result<(), FwCfgError> {
    if name.is_empty() || name.len() > MAX_FILE_NAME || name.contains('\0') {
        return Err(FwCfgError::NameTooLong(name.to_string()));
    }
    Ok(())
}

fn check_len(name: &str, data: &[u8]) -> Result<(), FwCfgError> {
    if u32::try_from(data.len()).is_err() {
        return Err(FwCfgError::TooLarge {
            name: name.to_string(),
            len: data.len(),
        });
    }
    Ok(())
}

/// The bytes of an "etc/e820" file: per entry le64 address, le64 length, le32 type.
pub fn e820_table(entries: &[E820Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 20);
    for e in entries {
        v.extend_from_slice(&e.addr.to_le_bytes());
        v.extend_from_slice(&e.len.to_le_bytes());
        v.extend_from_slice(&e.kind.to_le_bytes());
    }
    v
}

impl FwCfg {
    /// A device with the signature, the ID (traditional interface only) and one CPU.
    pub fn new() -> Self {
        let s = FwCfgState::default();
        let mut cfg = FwCfg {
            selector: s.selector,
            offset: s.offset,
            items: s.items,
            files: s.files,
        };
        cfg.rebuild_dir();
        cfg
    }

    /// Restore from a snapshot, rejecting file lists that do not match the items.
    pub fn from_state(state: &FwCfgState) -> Result<Self, FwCfgError> {
        let mut seen = std::collections::BTreeSet::new();
        for f in &state.files {
            check_name(&f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(FwCfgError::Duplicate(f.name.clone()));
            }
            if !(FW_CFG_FILE_FIRST..FW_CFG_FILE_END).contains(&f.key)
                || !state.items.contains_key(&f.key)
            {
                return Err(FwCfgError::BadFileKey {
                    name: f.name.clone(),
                    key: f.key,
                });
            }
        }
        for (k, v) in &state.items {
            check_len(&format!("key {k:#x}"), v)?;
        }
        let mut cfg = FwCfg {
            selector: state.selector,
            offset: state.offset,
            items: state.items.clone(),
            files: state.files.clone(),
        };
        cfg.items.remove(&FW_CFG_FILE_DIR);
        cfg.rebuild_dir();
        Ok(cfg)
    }

    /// The state to snapshot.
    pub fn state(&self) -> FwCfgState {
        let mut items = self.items.clone();
        items.remove(&FW_CFG_FILE_DIR);
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            items,
            files: self.files.clone(),
        }
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * FILE_ENTRY_LEN);
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for f in &self.files {
            let size = self.items.get(&f.key).map_or(0, |v| v.len() as u32);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&f.key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut name = [0u8; FILE_ENTRY_LEN - 8];
            let n = f.name.len().min(MAX_FILE_NAME);
            name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
            dir.extend_from_slice(&name);
        }
        self.items.insert(FW_CFG_FILE_DIR, dir);
    }

    /// Set (or replace) a numbered item, such as [`FW_CFG_NB_CPUS`].
    ///
    /// Use [`add_file`](Self::add_file) for named content; replacing a file's
    /// item through this call updates its directory size.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        if key == FW_CFG_FILE_DIR {
            log::warn!("fw_cfg: the file directory is generated, not set");
            return;
        }
        if data.len() > u32::MAX as usize {
            log::warn!("fw_cfg: item {key:#x} too large, dropped");
            return;
        }
        self.items.insert(key, data);
        if self.files.iter().any(|f| f.key == key) {
            self.rebuild_dir();
        }
    }

    /// Add a named file; returns the key it was given (from [`FW_CFG_FILE_FIRST`] upward).
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        check_name(name)?;
        check_len(name, &data)?;
        if self.files.iter().any(|f| f.name == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        let key = (FW_CFG_FILE_FIRST..FW_CFG_FILE_END)
            .find(|k| !self.items.contains_key(k))
            .ok_or_else(|| FwCfgError::NoFreeKey(name.to_string()))?;
        self.items.insert(key, data);
        self.files.push(FwCfgFile {
            name: name.to_string(),
            key,
        });
        self.rebuild_dir();
        Ok(key)
    }

    /// Add an integer file as firmware's `romfile_loadint` reads it (u64, little-endian),
    /// for example "etc/boot-menu-wait" in milliseconds.
    pub fn add_int_file(&mut self, name: &str, value: u64) -> Result<u16, FwCfgError> {
        self.add_file(name, value.to_le_bytes().to_vec())
    }

    /// Add the "etc/e820" memory map file built from `entries`.
    pub fn add_e820(&mut self, entries: &[E820Entry]) -> Result<u16, FwCfgError> {
        self.add_file(E820_FILE, e820_table(entries))
    }

    /// Set the CPU count firmware reads at boot ([`FW_CFG_NB_CPUS`] and, if it was
    /// lower, [`FW_CFG_MAX_CPUS`]).
    pub fn set_cpu_count(&mut self, n: u16) {
        self.add_item(FW_CFG_NB_CPUS, n.to_le_bytes().to_vec());
        let max = self
            .items
            .get(&FW_CFG_MAX_CPUS)
            .and_then(|v| v.get(..2))
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        if max < n {
            self.set_max_cpus(n);
        }
    }

    /// Set the maximum CPU count ([`FW_CFG_MAX_CPUS`], SeaBIOS's etc/max-cpus).
    pub fn set_max_cpus(&mut self, n: u16) {
        self.add_item(FW_CFG_MAX_CPUS, n.to_le_bytes().to_vec());
    }

    /// Ask SeaBIOS to offer its boot menu (legacy key [`FW_CFG_BOOT_MENU`],
    /// read as etc/show-boot-menu).
    pub fn set_boot_menu(&mut self, show: bool) {
        self.add_item(FW_CFG_BOOT_MENU, u16::from(show).to_le_bytes().to_vec());
    }

    /// The item at `key`, if any.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&key).map(Vec::as_slice)
    }

    /// The files, in directory order.
    pub fn files(&self) -> &[FwCfgFile] {
        &self.files
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selector)
            .and_then(|v| v.get(self.offset as usize))
            .copied();
        match b {
            Some(b) => {
                self.offset = self.offset.saturating_add(1);
                b
            }
            None => 0,
        }
    }
}

impl iovirt_bus::BusDeviceMut for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            DATA_OFFSET => data.iter_mut().for_each(|b| *b = self.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != SELECTOR_OFFSET {
            return; // the data port is read-only in this model
        }
        let key = match *data {
            [lo] => u16::from(lo),
            [lo, hi, ..] => u16::from_le_bytes([lo, hi]),
            [] => return,
        };
        self.selector = key;
        self.offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::BusDeviceMut;

    fn read_item(cfg: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        cfg.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0xaa];
                cfg.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn fixed_keys() {
        let mut cfg = FwCfg::new();
        cfg.set_cpu_count(4);
        assert_eq!(read_item(&mut cfg, 0, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut cfg, 1, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut cfg, 5, 2), [4, 0]);
        assert_eq!(read_item(&mut cfg, 0xf, 2), [4, 0]);
        // Unknown keys read zeros; writes to the data port change nothing.
        assert_eq!(read_item(&mut cfg, 0x8000, 4), [0; 4]);
        cfg.write(1, &[0x55]);
        assert_eq!(read_item(&mut cfg, 0, 1), b"Q");
    }

    #[test]
    fn directory_layout() {
        let mut cfg = FwCfg::new();
        let a = cfg.add_file("etc/boot-menu-wait", vec![1, 2]).unwrap();
        let e = cfg
            .add_e820(&[
                E820Entry {
                    addr: 0,
                    len: 0x9fc00,
                    kind: E820_RAM,
                },
                E820Entry {
                    addr: 0xfeffc000,
                    len: 0x4000,
                    kind: E820_RESERVED,
                },
            ])
            .unwrap();
        assert_eq!((a, e), (0x20, 0x21));
        let dir = read_item(&mut cfg, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        let ent = &dir[4 + 64..4 + 128];
        assert_eq!(&ent[..4], &40u32.to_be_bytes());
        assert_eq!(&ent[4..6], &[0, 0x21]);
        assert_eq!(&ent[6..8], &[0, 0]);
        assert_eq!(&ent[8..16], b"etc/e820");
        assert!(ent[16..].iter().all(|&b| b == 0));
        let table = read_item(&mut cfg, e, 40);
        assert_eq!(&table[8..16], &0x9fc00u64.to_le_bytes());
        assert_eq!(&table[16..20], &1u32.to_le_bytes());
        assert_eq!(&table[20..28], &0xfeffc000u64.to_le_bytes());
        assert_eq!(&table[36..40], &2u32.to_le_bytes());
    }

    #[test]
    fn file_errors_and_ints() {
        let mut cfg = FwCfg::new();
        assert!(matches!(
            cfg.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::NameTooLong(_))
        ));
        assert!(cfg.add_file(&"x".repeat(55), vec![]).is_ok());
        let k = cfg.add_int_file("etc/boot-menu-wait", 0x1234).unwrap();
        assert_eq!(
            cfg.add_int_file("etc/boot-menu-wait", 1),
            Err(FwCfgError::Duplicate("etc/boot-menu-wait".into()))
        );
        assert_eq!(read_item(&mut cfg, k, 8), 0x1234u64.to_le_bytes());
        cfg.set_boot_menu(true);
        assert_eq!(read_item(&mut cfg, FW_CFG_BOOT_MENU, 2), [1, 0]);
    }

    #[test]
    fn state_round_trip_and_rejects() {
        let mut cfg = FwCfg::new();
        cfg.add_file("etc/a", vec![9; 3]).unwrap();
        cfg.write(0, &0x20u16.to_le_bytes());
        let mut b = [0];
        cfg.read(1, &mut b);
        let s = cfg.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: FwCfgState = serde_json::from_str(&json).unwrap();
        let mut cfg2 = FwCfg::from_state(&back).unwrap();
        assert_eq!(cfg2.state(), s);
        assert_eq!(read_item(&mut cfg2, 0x19, 4), [0, 0, 0, 1]);

        let mut bad = s.clone();
        bad.files[0].key = 0x30;
        assert!(FwCfg::from_state(&bad).is_err());
        let mut bad = s;
        bad.files.push(bad.files[0].clone());
        assert!(FwCfg::from_state(&bad).is_err());
    }
}
