use super::*;

#[test]
fn ctl_round_trips_through_the_generated_layout() {
    let ctl = Ctl {
        holders: vec![
            Holder {
                tgid: 42,
                flags: HOLDER_AGENT,
                start_ticks: 123_456,
            },
            Holder::default(),
            Holder {
                tgid: 7,
                flags: HOLDER_KEEPER,
                start_ticks: 9,
            },
            Holder::default(),
        ],
        generation: 5,
    };
    let bytes = encode_ctl(&ctl);
    assert_eq!(bytes.len(), size_of::<types::hsm_ctl>());
    assert_eq!(decode_ctl(&bytes), ctl);
}

#[test]
fn shared_layouts_have_the_sizes_the_c_header_promises() {
    // hsm_shared.h: holder {u32, u32, u64}, four holders then a u64.
    assert_eq!(size_of::<types::hsm_holder>(), 16);
    // MAX_HOLDERS comes from the generated layout: this checks HSM_MAX_HOLDERS.
    assert_eq!(MAX_HOLDERS, 4);
    assert_eq!(
        MAX_HOLDERS,
        types::hsm_ctl::default().holders.len(),
        "holder slots derived from the offsets match the array"
    );
    assert_eq!(size_of::<types::hsm_ctl>(), 4 * 16 + 8);
    assert_eq!(size_of::<types::hsm_served>(), 8);
    assert_eq!(size_of::<types::hsm_file_state>(), 8);
    assert_eq!(size_of::<types::hsm_inode_state>(), 8);
    assert_eq!(size_of::<types::hsm_inode_key>(), 16);
}

#[test]
fn kernel_dev_matches_mkdev() {
    let dev = libc::makedev(7, 3);
    assert_eq!(kernel_dev(dev), (7 << 20) | 3);
    let dev = libc::makedev(259, 70000);
    assert_eq!(kernel_dev(dev), (259 << 20) | 70000);
}
