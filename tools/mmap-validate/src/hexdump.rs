//! `hexdump -C`-style dumps with file offsets.

use std::fmt::Write as _;

const WIDTH: u64 = 16;

/// Dumps `bytes`, which hold the file contents starting at file offset
/// `start`, 16 bytes per line. Each line is prefixed with its 16-byte-aligned
/// file offset in hex and ends with an ASCII column (non-printable bytes as
/// `.`). If `start` is not aligned, the first line is padded so that columns
/// stay aligned with offsets.
///
/// ```text
/// 0007a120  61 61 61 61 61 61 61 61  61 61 61 61 61 61 61 61  |aaaaaaaaaaaaaaaa|
/// ```
pub fn hex_dump(start: u64, bytes: &[u8]) -> String {
    let mut out = String::new();
    if bytes.is_empty() {
        return out;
    }
    let end = start + bytes.len() as u64;
    let mut line = start - start % WIDTH;
    while line < end {
        let _ = write!(out, "{line:08x}  ");
        let mut ascii = String::with_capacity(WIDTH as usize);
        for col in 0..WIDTH {
            let off = line + col;
            if col == 8 {
                out.push(' ');
            }
            if off >= start && off < end {
                let b = bytes[(off - start) as usize];
                let _ = write!(out, "{b:02x} ");
                ascii.push(if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                });
            } else {
                out.push_str("   ");
                if off < start {
                    ascii.push(' ');
                }
            }
        }
        let _ = writeln!(out, " |{ascii}|");
        line += WIDTH;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_lines() {
        let data: Vec<u8> = (0u8..32).map(|i| b'a' + i % 26).collect();
        let dump = hex_dump(0x7a120, &data);
        assert_eq!(
            dump,
            "0007a120  61 62 63 64 65 66 67 68  69 6a 6b 6c 6d 6e 6f 70  |abcdefghijklmnop|\n\
             0007a130  71 72 73 74 75 76 77 78  79 7a 61 62 63 64 65 66  |qrstuvwxyzabcdef|\n"
        );
    }

    #[test]
    fn partial_last_line_and_non_printables() {
        let dump = hex_dump(0, &[0x00, b'A', 0x7f, b' ', 0xff]);
        assert_eq!(
            dump,
            "00000000  00 41 7f 20 ff                                    |.A. .|\n"
        );
    }

    #[test]
    fn unaligned_start_is_padded() {
        // Offsets beyond 4 GiB keep all their digits.
        let dump = hex_dump(0x1_0000_000e, b"wxyz");
        let blank = |n: usize| "   ".repeat(n);
        let expected = format!(
            "100000000  {} {}77 78  |{}wx|\n100000010  79 7a {} {} |yz|\n",
            blank(8),
            blank(6),
            " ".repeat(14),
            blank(6),
            blank(8),
        );
        assert_eq!(dump, expected);
    }

    #[test]
    fn empty() {
        assert_eq!(hex_dump(42, &[]), "");
    }
}
