//! Per-CPU counters of what the programs could not deliver (see `LossCounter`).
use aya_ebpf::{macros::map, maps::PerCpuArray};
use observer_common::LossCounter;

#[map]
static LOSS_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LossCounter::COUNT, 0);

#[inline(always)]
pub fn count(counter: LossCounter) {
    if let Some(slot) = LOSS_COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other program instance writes it concurrently.
        unsafe { *slot += 1 };
    }
}
