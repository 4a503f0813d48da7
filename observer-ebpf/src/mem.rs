//! Stores of addresses and records in 8-byte words.
//!
//! The BPF target has no memset or memcpy of its own: for any store LLVM cannot prove
//! aligned (every `[u8; N]` field, every zeroed tail of an array) it calls a library one
//! that moves one byte per loop turn, about eight instructions a byte. Those calls were
//! most of the connect programs' run time. Every place written here is 8-byte aligned (the
//! offsets are checked at compile time) and in map or stack memory, which the verifier
//! lets a program store to in words.
use core::{
    mem::{offset_of, size_of},
    ptr::write_volatile,
};

use observer_common::{ConnectEvent, DnsEvent};

#[cfg(target_endian = "big")]
compile_error!("the word stores below lay bytes out little-endian");

// Every address field starts on a word; records are whole words.
const _: () = {
    assert!(offset_of!(ConnectEvent, src_addr) % 8 == 0);
    assert!(offset_of!(ConnectEvent, dst_addr) % 8 == 0);
    assert!(offset_of!(ConnectEvent, requested_addr) % 8 == 0);
    assert!(offset_of!(ConnectEvent, comm) % 8 == 0);
    assert!(size_of::<ConnectEvent>().is_multiple_of(8));
    assert!(offset_of!(DnsEvent, src_addr) % 8 == 0);
    assert!(offset_of!(DnsEvent, dst_addr) % 8 == 0);
};

/// An IPv4 address (as it sits in memory: network order) in the first four bytes of a
/// 16-byte address field, the rest zero.
///
/// # Safety
/// `field` is valid for writes and 8-byte aligned.
#[inline(always)]
pub unsafe fn put_ipv4(field: *mut [u8; 16], addr: u32) {
    let words = field.cast::<u64>();
    unsafe {
        write_volatile(words, u64::from(addr));
        write_volatile(words.add(1), 0);
    }
}

/// An IPv6 address given as four 32-bit words in memory order.
///
/// # Safety
/// `field` is valid for writes and 8-byte aligned.
#[inline(always)]
pub unsafe fn put_ipv6(field: *mut [u8; 16], addr: [u32; 4]) {
    let words = field.cast::<u64>();
    unsafe {
        write_volatile(words, u64::from(addr[0]) | u64::from(addr[1]) << 32);
        write_volatile(words.add(1), u64::from(addr[2]) | u64::from(addr[3]) << 32);
    }
}

/// Sixteen zero bytes.
///
/// # Safety
/// `field` is valid for writes and 8-byte aligned.
#[inline(always)]
pub unsafe fn zero16(field: *mut [u8; 16]) {
    let words = field.cast::<u64>();
    unsafe {
        write_volatile(words, 0);
        write_volatile(words.add(1), 0);
    }
}
