//! vCPUs: CPUID per vCPU, one thread each running the exit loop, and the
//! machinery that stops them all when the guest resets or shuts down.
//!
//! Stopping: [`ExitHandle::request`] records why the VM ends and wakes the main
//! thread, which sets the shared stop flag and sends [`kick_signal`] to every vCPU
//! thread. The signal's handler sets `immediate_exit` in that thread's `kvm_run`,
//! so a thread that was about to enter `KVM_RUN` returns at once and one that was
//! inside it returns with `EINTR` (the scheme Firecracker and Cloud Hypervisor use).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use iovirt_bus::Bus;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::stats::EXITS;
use crate::vm::{kvm_err, VmError};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 0xFE, triple fault, PSCI/system event reset).
    /// A reset is treated as "the guest is done": exit status 0.
    Reset(String),
    /// The guest powered off.
    Shutdown(String),
    /// Something failed (a KVM error, an exit the VMM cannot handle).
    Error(String),
    /// The user asked to quit (Ctrl-A x on the serial terminal).
    User,
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Error(_) => 1,
            _ => 0,
        }
    }
}

/// Where vCPU threads, devices and the terminal report that the VM should stop.
#[derive(Default)]
pub struct ExitHandle {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
    stop: AtomicBool,
}

impl ExitHandle {
    /// A handle nobody has requested anything on yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Ask the VM to stop; the first reason wins.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::info!("VM exit requested: {reason:?}");
            *r = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Whether a stop has been requested.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Block until a stop is requested and return its reason.
    pub fn wait(&self) -> ExitReason {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = r.clone() {
                return reason;
            }
            r = self.cond.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

thread_local! {
    /// The `immediate_exit` byte of this thread's `kvm_run`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a volatile store through a pointer set by this thread.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this thread to its own kvm_run mapping, which
        // outlives the vCPU loop; it is cleared before the VcpuFd is dropped.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Install the kick signal's handler (once, before starting vCPU threads).
pub fn install_kick_handler() -> Result<(), VmError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(|e| VmError::Kvm {
        what: "installing the vCPU kick signal handler",
        err: kvm_ioctls::Error::new(e.errno()),
    })
}

/// Build vCPU `index`'s CPUID from KVM's supported list with a consistent topology:
/// `cpus` cores in one package, one thread per core, APIC ID = `index`.
pub fn cpuid_for(kvm: &Kvm, index: u32, cpus: u32) -> Result<CpuId, VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    patch_cpuid(cpuid.as_mut_slice(), index, cpus);
    Ok(cpuid)
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjust CPUID entries for vCPU `index` of `cpus` (see [`cpuid_for`]).
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], index: u32, cpus: u32) {
    let apic_id = index;
    let core_bits = id_bits(cpus);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0xffff) | (apic_id << 24) | ((cpus.min(255)) << 16);
                // EDX bit 28 HTT: more than one logical processor in the package.
                if cpus > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
                // ECX bit 31: running under a hypervisor.
                e.ecx |= 1 << 31;
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] cores per package - 1,
                // [25:14] logical processors sharing this cache - 1.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1).min(63) << 26) | ((sharing & 0xfff) << 14);
            }
            7 if e.index == 0 => {
                // Hide IA32_ARCH_CAPABILITIES (EDX bit 29): this KVM fails to restore the MSR,
                // as QEMU's `-cpu host,-arch-capabilities` works around.
                e.edx &= !(1 << 29);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT (1 thread), level 1 core (`cpus` cores).
                let (eax, ebx, ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (core_bits, cpus, (2 << 8) | 1),
                    i => (0, 0, i & 0xff),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = ecx;
                e.edx = apic_id;
            }
            _ => {}
        }
    }
}

/// What one vCPU thread needs.
pub struct VcpuContext {
    /// Index (also APIC ID).
    pub index: u32,
    /// The vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Stop reporting.
    pub exit: Arc<ExitHandle>,
}

/// Start vCPU `ctx.index`'s thread.
pub fn spawn(ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.index))
        .spawn(move || run(ctx))
}

/// Stops the VM if a vCPU thread unwinds, so the main thread never waits forever.
struct PanicGuard(Arc<ExitHandle>, u32);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .request(ExitReason::Error(format!("vcpu{} thread panicked", self.1)));
        }
    }
}

fn run(mut ctx: VcpuContext) {
    let _guard = PanicGuard(ctx.exit.clone(), ctx.index);
    let run_ptr = &mut ctx.fd.get_kvm_run().immediate_exit as *mut u8;
    IMMEDIATE_EXIT.with(|c| c.set(run_ptr));
    let reason = run_loop(&mut ctx);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    if let Some(reason) = reason {
        ctx.exit.request(reason);
    }
}

/// Run until the VM stops; returns a reason if this vCPU is the one that ends the VM.
fn run_loop(ctx: &mut VcpuContext) -> Option<ExitReason> {
    let i = ctx.index;
    let run_ptr: *const kvm_bindings::kvm_run = ctx.fd.get_kvm_run();
    // String I/O (`rep insb`/`outsb`) exits once with `count` items of `size` bytes;
    // kvm-ioctls hands over all of them as one slice, so split it by `size`.
    let io_size = || {
        // SAFETY: `run_ptr` points at this vCPU's kvm_run mapping, alive as long as `ctx.fd`;
        // after a KVM_EXIT_IO the kernel has written `io`, and nothing else writes it
        // while this thread handles the exit.
        let size =
            unsafe { std::ptr::addr_of!((*run_ptr).__bindgen_anon_1.io.size).read_volatile() };
        usize::from(size).max(1)
    };
    loop {
        if ctx.exit.stopping() {
            return None;
        }
        let result = ctx.fd.run();
        let counter = match &result {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => &EXITS.io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => &EXITS.mmio,
            _ => &EXITS.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    for item in data.chunks_mut(io_size()) {
                        ctx.pio.read(u64::from(port), item);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    for item in data.chunks(io_size()) {
                        ctx.pio.write(u64::from(port), item);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio.read(addr, data) {
                        log::trace!("vcpu{i}: unclaimed MMIO read {addr:#x}");
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio.write(addr, data) {
                        log::trace!("vcpu{i}: unclaimed MMIO write {addr:#x}");
                    }
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip KVM handles HLT itself; an exit here
                    // means HLT with nothing left to wake us: treat as power-off.
                    return Some(ExitReason::Shutdown(format!("vcpu{i} halted")));
                }
                VcpuExit::Shutdown => {
                    // Triple fault: what a PC does on a reset request (Linux reboot=t).
                    return Some(ExitReason::Reset(format!(
                        "vcpu{i}: triple fault (KVM_EXIT_SHUTDOWN)"
                    )));
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                            ExitReason::Reset(format!("vcpu{i}: system reset event"))
                        }
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                            ExitReason::Shutdown(format!("vcpu{i}: system shutdown event"))
                        }
                        k => ExitReason::Error(format!("vcpu{i}: unhandled system event {k}")),
                    });
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Some(ExitReason::Error(format!(
                        "vcpu{i}: KVM entry failed (hardware reason {reason:#x} on cpu {cpu})"
                    )));
                }
                VcpuExit::InternalError => {
                    let rip = ctx
                        .fd
                        .get_regs()
                        .map_or_else(|_| "unknown".to_string(), |r| format!("{:#x}", r.rip));
                    return Some(ExitReason::Error(format!(
                        "vcpu{i}: KVM internal error (emulation failed?) at rip {rip}"
                    )));
                }
                VcpuExit::Intr => {}
                other => {
                    return Some(ExitReason::Error(format!(
                        "vcpu{i}: unexpected exit {other:?}"
                    )));
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear immediate_exit and look at the stop flag.
                ctx.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Some(ExitReason::Error(format!("vcpu{i}: KVM_RUN failed: {e}"))),
        }
    }
}

/// Kick every vCPU thread out of `KVM_RUN` and wait for them to finish.
pub fn stop_all(threads: Vec<JoinHandle<()>>) {
    for t in &threads {
        if let Err(e) = t.kill(kick_signal()) {
            log::debug!("kicking a vCPU thread failed: {e}");
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology() {
        let mut e = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
        ];
        e[4].eax = 3 << 5 | 1; // L3 data cache
        patch_cpuid(&mut e, 2, 3);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8, e[1].edx), (1, 1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, 2));
        assert_eq!(e[3].ecx >> 8, 0);
        assert_eq!(e[4].eax >> 26, 2);
        assert_eq!((e[4].eax >> 14) & 0xfff, 2);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
