//! Reading another process's memory, behind a trait so that the walkers can
//! be tested on fabricated memory images.
use std::fmt;

/// Highest user-space address on x86-64 (47-bit canonical lower half).
const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

/// Why a read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The address is null, misaligned or outside user space: a garbage
    /// pointer, never dereferenced.
    BadPointer(u64),
    /// The target did not have `len` readable bytes at the address.
    Unmapped { address: u64, len: usize },
    /// The process no longer exists.
    ProcessGone,
    /// Reading was refused (not root, or no CAP_SYS_PTRACE).
    PermissionDenied,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPointer(address) => write!(f, "invalid pointer {address:#x}"),
            Self::Unmapped { address, len } => {
                write!(f, "{len} bytes at {address:#x} are not readable")
            }
            Self::ProcessGone => f.write_str("the process exited"),
            Self::PermissionDenied => {
                f.write_str("permission denied: run as root (with CAP_SYS_PTRACE)")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// Memory of one process.
pub trait Memory {
    /// Fills `buf` from `address`, entirely or not at all.
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), ReadError>;

    /// Reads a little-endian `u64` at `address`.
    fn read_u64(&self, address: u64) -> Result<u64, ReadError> {
        let mut b = [0; 8];
        self.read(address, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `u32` at `address`.
    fn read_u32(&self, address: u64) -> Result<u32, ReadError> {
        let mut b = [0; 4];
        self.read(address, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a pointer that the data structure requires to be non-null
    /// and aligned to `align`.
    fn read_pointer(&self, address: u64, align: u64) -> Result<u64, ReadError> {
        let value = self.read_u64(address)?;
        check_pointer(value, align)?;
        Ok(value)
    }
}

/// Accepts only a non-null, `align`-aligned user-space address.
pub fn check_pointer(address: u64, align: u64) -> Result<(), ReadError> {
    // The first page is never mapped: small values are null plus a field.
    if !(4096..USER_SPACE_END).contains(&address) || !address.is_multiple_of(align) {
        return Err(ReadError::BadPointer(address));
    }
    Ok(())
}

/// A live process's memory, read with `process_vm_readv` (no ptrace stop:
/// the target keeps running, so the walkers validate what they read).
pub struct ProcessMemory {
    pid: u32,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }
}

impl Memory for ProcessMemory {
    fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        check_pointer(address, 1)?;
        let len = buf.len();
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: address as *mut libc::c_void,
            iov_len: len,
        };
        let pid = libc::pid_t::try_from(self.pid).map_err(|_| ReadError::ProcessGone)?;
        // SAFETY: `local` describes `buf`, which is valid for writes of
        // `len` bytes; the remote range is only read by the kernel, which
        // checks it against the target's address space.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ESRCH) => ReadError::ProcessGone,
                Some(libc::EPERM) => ReadError::PermissionDenied,
                _ => ReadError::Unmapped { address, len },
            });
        }
        if n.cast_unsigned() != len {
            return Err(ReadError::Unmapped { address, len });
        }
        Ok(())
    }
}

#[cfg(test)]
pub mod fake {
    //! A memory image made of byte ranges, for unit tests.
    use std::collections::BTreeMap;

    use super::{Memory, ReadError};

    #[derive(Default)]
    pub struct FakeMemory {
        ranges: BTreeMap<u64, Vec<u8>>,
    }

    impl FakeMemory {
        pub fn put(&mut self, address: u64, bytes: &[u8]) {
            self.ranges.insert(address, bytes.to_vec());
        }

        pub fn put_u64s(&mut self, address: u64, words: &[u64]) {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            self.put(address, &bytes);
        }
    }

    impl Memory for FakeMemory {
        fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), ReadError> {
            super::check_pointer(address, 1)?;
            let unmapped = ReadError::Unmapped {
                address,
                len: buf.len(),
            };
            let (start, bytes) = self.ranges.range(..=address).next_back().ok_or(unmapped)?;
            let from = usize::try_from(address - start).map_err(|_| unmapped)?;
            let src = bytes.get(from..from + buf.len()).ok_or(unmapped)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }
}
