//! The guard's control map (`hsm_ctl`): the processes registered as holders and a
//! generation, encoded with the offsets of the Rust types generated from the program's BTF.

use std::mem::{offset_of, size_of};

use crate::skel::guard::types;

pub(crate) const HOLDER_AGENT: u32 = 1;
pub(crate) const HOLDER_KEEPER: u32 = 2;

/// What kind of process registers as a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderKind {
    Agent,
    Keeper,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) tgid: u32,
    pub(crate) flags: u32,
    pub(crate) start_ticks: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ctl {
    pub(crate) holders: Vec<Holder>,
    pub(crate) generation: u64,
}

/// Holder slots in `hsm_ctl`, as the program's BTF lays them out (`HSM_MAX_HOLDERS`).
pub(crate) const MAX_HOLDERS: usize = (offset_of!(types::hsm_ctl, generation)
    - offset_of!(types::hsm_ctl, holders))
    / size_of::<types::hsm_holder>();

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

fn holder_at(i: usize) -> usize {
    offset_of!(types::hsm_ctl, holders) + i * size_of::<types::hsm_holder>()
}

/// Encode with the offsets of the Rust types generated from the program's BTF.
pub(crate) fn encode_ctl(ctl: &Ctl) -> Vec<u8> {
    let mut buf = vec![0u8; size_of::<types::hsm_ctl>()];
    for (i, h) in ctl.holders.iter().take(MAX_HOLDERS).enumerate() {
        let base = holder_at(i);
        put_u32(&mut buf, base + offset_of!(types::hsm_holder, tgid), h.tgid);
        put_u32(
            &mut buf,
            base + offset_of!(types::hsm_holder, flags),
            h.flags,
        );
        put_u64(
            &mut buf,
            base + offset_of!(types::hsm_holder, start_ticks),
            h.start_ticks,
        );
    }
    put_u64(
        &mut buf,
        offset_of!(types::hsm_ctl, generation),
        ctl.generation,
    );
    buf
}

pub(crate) fn decode_ctl(buf: &[u8]) -> Ctl {
    let holders = (0..MAX_HOLDERS)
        .map(|i| {
            let base = holder_at(i);
            Holder {
                tgid: get_u32(buf, base + offset_of!(types::hsm_holder, tgid)),
                flags: get_u32(buf, base + offset_of!(types::hsm_holder, flags)),
                start_ticks: get_u64(buf, base + offset_of!(types::hsm_holder, start_ticks)),
            }
        })
        .collect();
    Ctl {
        holders,
        generation: get_u64(buf, offset_of!(types::hsm_ctl, generation)),
    }
}
