use super::*;

fn metadata(event_len: u32, mask: u64, fd: i32, pid: i32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&event_len.to_ne_bytes());
    v.push(FANOTIFY_METADATA_VERSION);
    v.push(0);
    v.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
    v.extend_from_slice(&mask.to_ne_bytes());
    v.extend_from_slice(&fd.to_ne_bytes());
    v.extend_from_slice(&pid.to_ne_bytes());
    v
}

fn info(info_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![info_type, 0];
    v.extend_from_slice(&((INFO_HEADER_LEN + body.len()) as u16).to_ne_bytes());
    v.extend_from_slice(body);
    v
}

fn range_record(offset: u64, count: u64) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&offset.to_ne_bytes());
    body.extend_from_slice(&count.to_ne_bytes());
    info(FAN_EVENT_INFO_TYPE_RANGE, &body)
}

#[test]
fn parses_range_after_other_records() {
    // A pidfd record (type 4, 8 bytes) first, as with FAN_REPORT_PIDFD.
    let pidfd = info(libc::FAN_EVENT_INFO_TYPE_PIDFD, &7i32.to_ne_bytes());
    let range = range_record(1 << 33, 8192);
    let len = (METADATA_LEN + pidfd.len() + range.len()) as u32;
    let mut buf = metadata(len, FAN_PRE_ACCESS, 9, 1234);
    buf.extend(pidfd);
    buf.extend(range);
    // A second event without records.
    buf.extend(metadata(METADATA_LEN as u32, FAN_PRE_ACCESS, 10, 5));
    let evs: Vec<_> = EventParser::new(&buf)
        .collect::<Result<_>>()
        .expect("parse");
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0].fd, 9);
    assert_eq!(evs[0].pid, 1234);
    assert_eq!(
        evs[0].range,
        Some(FileRange {
            offset: 1 << 33,
            count: 8192
        })
    );
    assert_eq!(evs[1].fd, 10);
    assert_eq!(evs[1].range, None);
}

#[test]
fn rejects_inconsistent_lengths() {
    let buf = metadata(1000, FAN_PRE_ACCESS, 3, 1);
    let r: Vec<_> = EventParser::new(&buf).collect();
    assert_eq!(r.len(), 1);
    assert!(r[0].is_err());
    let mut bad_info = metadata((METADATA_LEN + 4) as u32, FAN_PRE_ACCESS, 3, 1);
    bad_info.extend([6, 0, 0, 0]); // info record claiming length 0
    assert!(
        EventParser::new(&bad_info)
            .next()
            .is_some_and(|r| r.is_err())
    );
}

#[test]
fn never_panics_on_truncated_input() {
    let range = range_record(4096, 4096);
    let mut buf = metadata((METADATA_LEN + range.len()) as u32, FAN_PRE_ACCESS, 3, 1);
    buf.extend(range);
    for cut in 0..buf.len() {
        for r in EventParser::new(&buf[..cut]) {
            let _ = r;
        }
    }
}

#[test]
fn deny_encoding_carries_errno() {
    assert_eq!(Response::Allow.encode(), 1);
    assert_eq!(Response::Deny(DenyErrno::Eio).encode(), 2 | (5 << 24));
    assert_eq!(Response::Deny(DenyErrno::Enospc).encode(), 2 | (28 << 24));
}
