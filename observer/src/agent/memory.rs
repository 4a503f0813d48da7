//! Memory the agent freed goes back to the system.
//!
//! The agent runs on mimalloc (see `main.rs`), which keeps freed pages to reuse them and
//! returns them only as later allocations pass by. An agent that went idle after a burst,
//! or after parsing the kernel's BTF at start-up, would keep that memory resident for good.

/// Returns the pages of every free mimalloc page to the system. Cheap when there is
/// nothing to return; a no-op under another global allocator (mimalloc then owns no pages).
pub fn release_freed() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
