//! virtio-iommu requests and events on the wire (virtio 1.2, section 5.13),
//! parsed into typed values with a status for every way they can be malformed.

/// Request type ATTACH.
pub const T_ATTACH: u8 = 1;
/// Request type DETACH.
pub const T_DETACH: u8 = 2;
/// Request type MAP.
pub const T_MAP: u8 = 3;
/// Request type UNMAP.
pub const T_UNMAP: u8 = 4;
/// Request type PROBE.
pub const T_PROBE: u8 = 5;

/// MAP flag: the device may read.
pub const MAP_F_READ: u32 = 1;
/// MAP flag: the device may write.
pub const MAP_F_WRITE: u32 = 2;
/// MAP flag: MMIO mapping (needs VIRTIO_IOMMU_F_MMIO, not offered).
pub const MAP_F_MMIO: u32 = 4;
/// ATTACH flag: bypass (needs VIRTIO_IOMMU_F_BYPASS_CONFIG, not offered).
pub const ATTACH_F_BYPASS: u32 = 1;

/// Size of the request head (type + 3 reserved bytes).
pub const HEAD_LEN: usize = 4;
/// Size of the request tail (status + 3 reserved bytes).
pub const TAIL_LEN: usize = 4;
/// Reserved bytes after a PROBE request's endpoint.
pub const PROBE_RESERVED: usize = 64;

/// Status written in a request's tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Status {
    /// Success.
    #[error("ok")]
    Ok,
    /// The request could not be served (I/O error).
    #[error("I/O error")]
    IoErr,
    /// Unsupported request type.
    #[error("unsupported request")]
    Unsupp,
    /// Internal device error.
    #[error("device error")]
    DevErr,
    /// Invalid parameters.
    #[error("invalid parameters")]
    Inval,
    /// Out-of-range parameters.
    #[error("parameters out of range")]
    Range,
    /// No such endpoint or domain.
    #[error("no such endpoint or domain")]
    NoEnt,
    /// Invalid address.
    #[error("bad address")]
    Fault,
    /// Out of resources.
    #[error("out of resources")]
    NoMem,
}

impl Status {
    /// The status byte.
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::IoErr => 1,
            Status::Unsupp => 2,
            Status::DevErr => 3,
            Status::Inval => 4,
            Status::Range => 5,
            Status::NoEnt => 6,
            Status::Fault => 7,
            Status::NoMem => 8,
        }
    }
}

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Attach `endpoint` to `domain` (creating the domain).
    Attach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID (the PCI requester ID).
        endpoint: u32,
        /// Flags (bit 0: bypass).
        flags: u32,
    },
    /// Detach `endpoint` from `domain`.
    Detach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// Map `virt_start..=virt_end` to `phys_start`.
    Map {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// First guest-physical address.
        phys_start: u64,
        /// READ, WRITE, MMIO flags.
        flags: u32,
    },
    /// Unmap every mapping inside `virt_start..=virt_end`.
    Unmap {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
    /// Describe `endpoint` (reserved regions).
    Probe {
        /// Endpoint ID.
        endpoint: u32,
    },
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    let lo = le32(b, at)?;
    let hi = le32(b, at.checked_add(4)?)?;
    Some(u64::from(lo) | (u64::from(hi) << 32))
}

impl Request {
    /// Parse the device-readable part of a request (head and body).
    pub fn parse(b: &[u8]) -> Result<Request, Status> {
        let t = *b.first().ok_or(Status::Inval)?;
        let body = b.get(HEAD_LEN..).ok_or(Status::Inval)?;
        let short = Status::Inval;
        let need = match t {
            T_ATTACH | T_DETACH => 16,
            T_MAP => 32,
            T_UNMAP => 24,
            T_PROBE => 4 + PROBE_RESERVED,
            _ => return Err(Status::Unsupp),
        };
        if body.len() < need {
            return Err(short);
        }
        match t {
            T_ATTACH => Ok(Request::Attach {
                domain: le32(body, 0).ok_or(short)?,
                endpoint: le32(body, 4).ok_or(short)?,
                flags: le32(body, 8).ok_or(short)?,
            }),
            T_DETACH => Ok(Request::Detach {
                domain: le32(body, 0).ok_or(short)?,
                endpoint: le32(body, 4).ok_or(short)?,
            }),
            T_MAP => Ok(Request::Map {
                domain: le32(body, 0).ok_or(short)?,
                virt_start: le64(body, 4).ok_or(short)?,
                virt_end: le64(body, 12).ok_or(short)?,
                phys_start: le64(body, 20).ok_or(short)?,
                flags: le32(body, 28).ok_or(short)?,
            }),
            T_UNMAP => Ok(Request::Unmap {
                domain: le32(body, 0).ok_or(short)?,
                virt_start: le64(body, 4).ok_or(short)?,
                virt_end: le64(body, 12).ok_or(short)?,
            }),
            T_PROBE => Ok(Request::Probe {
                endpoint: le32(body, 0).ok_or(short)?,
            }),
            _ => Err(Status::Unsupp),
        }
    }

    /// The request's bytes (head and body), for drivers and tests.
    pub fn emit(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40);
        let head = |v: &mut Vec<u8>, t: u8| v.extend_from_slice(&[t, 0, 0, 0]);
        match *self {
            Request::Attach {
                domain,
                endpoint,
                flags,
            } => {
                head(&mut v, T_ATTACH);
                for x in [domain, endpoint, flags, 0] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
            Request::Detach { domain, endpoint } => {
                head(&mut v, T_DETACH);
                for x in [domain, endpoint, 0, 0] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                head(&mut v, T_MAP);
                v.extend_from_slice(&domain.to_le_bytes());
                for x in [virt_start, virt_end, phys_start] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                v.extend_from_slice(&flags.to_le_bytes());
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                head(&mut v, T_UNMAP);
                v.extend_from_slice(&domain.to_le_bytes());
                for x in [virt_start, virt_end] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                v.extend_from_slice(&[0; 4]);
            }
            Request::Probe { endpoint } => {
                head(&mut v, T_PROBE);
                v.extend_from_slice(&endpoint.to_le_bytes());
                v.extend_from_slice(&[0; PROBE_RESERVED]);
            }
        }
        v
    }
}

/// Probe property type: reserved memory region.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// Reserved region subtype: MSI doorbell (mapped by the IOMMU itself).
pub const RESV_MEM_T_MSI: u8 = 1;

/// A RESV_MEM probe property for `start..=end` of `subtype`.
pub fn resv_mem_property(subtype: u8, start: u64, end: u64) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    p[2..4].copy_from_slice(&20u16.to_le_bytes());
    p[4] = subtype;
    p[8..16].copy_from_slice(&start.to_le_bytes());
    p[16..24].copy_from_slice(&end.to_le_bytes());
    p
}

/// Fault event reason: the endpoint is not attached to a domain.
pub const FAULT_R_DOMAIN: u8 = 1;
/// Fault event reason: no mapping, or one without the needed right.
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault event flag: the access was a read.
pub const FAULT_F_READ: u32 = 1;
/// Fault event flag: the access was a write.
pub const FAULT_F_WRITE: u32 = 2;
/// Fault event flag: the address field is valid.
pub const FAULT_F_ADDRESS: u32 = 0x100;

/// A fault report for the event queue (24 bytes).
pub fn fault_event(reason: u8, flags: u32, endpoint: u32, address: u64) -> [u8; 24] {
    let mut e = [0u8; 24];
    e[0] = reason;
    e[4..8].copy_from_slice(&flags.to_le_bytes());
    e[8..12].copy_from_slice(&endpoint.to_le_bytes());
    e[16..24].copy_from_slice(&address.to_le_bytes());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects() {
        for r in [
            Request::Attach {
                domain: 1,
                endpoint: 0x20,
                flags: 0,
            },
            Request::Detach {
                domain: 1,
                endpoint: 0x20,
            },
            Request::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x9000,
                flags: 3,
            },
            Request::Unmap {
                domain: 1,
                virt_start: 0,
                virt_end: u64::MAX,
            },
            Request::Probe { endpoint: 0x20 },
        ] {
            let b = r.emit();
            assert_eq!(Request::parse(&b), Ok(r));
            assert_eq!(
                Request::parse(&b[..b.len() - 5]).err(),
                Some(Status::Inval),
                "{r:?}"
            );
        }
        assert_eq!(Request::parse(&[9, 0, 0, 0]), Err(Status::Unsupp));
        assert_eq!(Request::parse(&[]), Err(Status::Inval));
        assert_eq!(Request::parse(&[1, 0]), Err(Status::Inval));
    }
}
