//! The DATA reader: turns the dot-stuffed byte stream after `354` into the
//! message, and finds its end.
//!
//! Only `CRLF . CRLF` ends the data (RFC 5321 section 4.1.1.4). A bare LF or
//! a bare CR anywhere stops the reader with an error; it is never taken as a
//! line end. A receiver that reads line ends more loosely than the sender
//! can be tricked into seeing a second message inside the first (SMTP
//! smuggling). The session then rejects the message and closes.

/// Maximum line length of message content, excluding CRLF (RFC 5322 section 2.1.1).
pub const MAX_LINE_LENGTH: usize = 998;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// A LF not preceded by CR, on the given line (1-based).
    BareLf { line: usize },
    /// A CR not followed by LF, on the given line (1-based).
    BareCr { line: usize },
}

/// Outcome of feeding one buffer to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More data is needed; all input bytes were consumed.
    NeedMore,
    /// The end of data was found after `consumed` bytes of this input; the
    /// rest belongs to the next command.
    Done { consumed: usize },
    Failed(DataError),
}

/// Incremental reader for one DATA transfer.
pub struct DataReader {
    message: Vec<u8>,
    max_size: usize,
    /// Bytes of content seen, including those dropped for exceeding `max_size`.
    total_size: usize,
    at_line_start: bool,
    /// The current line so far is a single `.` (a stuffing dot or the end).
    dot_only: bool,
    pending_cr: bool,
    line: usize,
    line_length: usize,
    longest_line: usize,
}

impl DataReader {
    pub fn new(max_size: usize) -> DataReader {
        DataReader {
            message: Vec::with_capacity(max_size.min(64 * 1024)),
            max_size,
            total_size: 0,
            at_line_start: true,
            dot_only: false,
            pending_cr: false,
            line: 1,
            line_length: 0,
            longest_line: 0,
        }
    }

    /// Feeds the next bytes read from the client.
    pub fn feed(&mut self, input: &[u8]) -> Progress {
        let mut position = 0;
        while position < input.len() {
            let byte = input[position];
            position += 1;
            if self.pending_cr {
                self.pending_cr = false;
                if byte != b'\n' {
                    return Progress::Failed(DataError::BareCr { line: self.line });
                }
                if self.dot_only {
                    return Progress::Done { consumed: position };
                }
                self.push(b'\r');
                self.push(b'\n');
                self.longest_line = self.longest_line.max(self.line_length);
                self.line += 1;
                self.line_length = 0;
                self.at_line_start = true;
                continue;
            }
            match byte {
                b'\r' => self.pending_cr = true,
                b'\n' => return Progress::Failed(DataError::BareLf { line: self.line }),
                b'.' if self.at_line_start => {
                    // Either the end marker or a stuffing dot (RFC 5321 4.5.2);
                    // both are dropped from the content.
                    self.at_line_start = false;
                    self.dot_only = true;
                }
                _ => {
                    // Take the rest of the line up to its CR or LF at once.
                    let start = position - 1;
                    let end = memchr::memchr2(b'\r', b'\n', &input[start..]).map_or(input.len(), |offset| start + offset);
                    self.at_line_start = false;
                    self.dot_only = false;
                    self.line_length += end - start;
                    self.push_all(&input[start..end]);
                    position = end;
                }
            }
        }
        Progress::NeedMore
    }

    fn push(&mut self, byte: u8) {
        self.push_all(&[byte]);
    }

    /// Appends content, keeping at most `max_size` bytes but counting all.
    fn push_all(&mut self, bytes: &[u8]) {
        self.total_size += bytes.len();
        let room = self.max_size.saturating_sub(self.message.len());
        self.message.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Size of the content in bytes, counting any dropped for being too large.
    pub fn total_size(&self) -> usize {
        self.total_size
    }

    pub fn too_large(&self) -> bool {
        self.total_size > self.max_size
    }

    /// Length of the longest content line seen, excluding CRLF.
    pub fn longest_line(&self) -> usize {
        self.longest_line
    }

    pub fn into_message(self) -> Vec<u8> {
        self.message
    }
}

/// Checks content received with BDAT, where nothing is dot-stuffed: every
/// line must end in CRLF. Returns the first bare LF or CR, and the longest
/// line length.
pub fn check_line_endings(content: &[u8]) -> Result<usize, DataError> {
    let mut line = 1;
    let mut line_length = 0;
    let mut longest = 0;
    let mut index = 0;
    while index < content.len() {
        match content[index] {
            b'\r' => {
                if content.get(index + 1) != Some(&b'\n') {
                    return Err(DataError::BareCr { line });
                }
                longest = longest.max(line_length);
                line_length = 0;
                line += 1;
                index += 2;
                continue;
            }
            b'\n' => return Err(DataError::BareLf { line }),
            _ => line_length += 1,
        }
        index += 1;
    }
    Ok(longest.max(line_length))
}

/// Size and field count of a message's header section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderSection {
    /// Bytes from the start of the message to the end of the last header
    /// line, CRLFs included, without the empty line that ends the section.
    pub size: usize,
    /// Header fields; a folded field's continuation lines count with it.
    pub fields: usize,
}

/// Measures the header section of CRLF-terminated content: every line up
/// to the first empty line, or the whole content when it has none.
pub fn header_section(content: &[u8]) -> HeaderSection {
    let mut size = 0;
    let mut fields = 0;
    for line in content.split_inclusive(|&byte| byte == b'\n') {
        if line == b"\r\n" {
            break;
        }
        if !matches!(line.first(), Some(b' ' | b'\t')) || fields == 0 {
            fields += 1;
        }
        size += line.len();
    }
    HeaderSection { size, fields }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_section_measured() {
        let message = b"From: a@example.com\r\nSubject: one\r\n two\r\n\r\nbody\r\nX: not a header\r\n";
        assert_eq!(header_section(message), HeaderSection { size: 41, fields: 2 });
        assert_eq!(header_section(b"\r\nbody\r\n"), HeaderSection { size: 0, fields: 0 });
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n"), HeaderSection { size: 12, fields: 2 });
        assert_eq!(header_section(b""), HeaderSection { size: 0, fields: 0 });
    }

    fn read_all(input: &[u8]) -> (Progress, Vec<u8>) {
        let mut reader = DataReader::new(1 << 20);
        let progress = reader.feed(input);
        (progress, reader.into_message())
    }

    #[test]
    fn ends_at_crlf_dot_crlf() {
        let (progress, message) = read_all(b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert_eq!(progress, Progress::Done { consumed: 23 });
        assert_eq!(message, b"Subject: a\r\n\r\nbody\r\n");
    }

    #[test]
    fn empty_message() {
        let (progress, message) = read_all(b".\r\n");
        assert_eq!(progress, Progress::Done { consumed: 3 });
        assert!(message.is_empty());
    }

    #[test]
    fn removes_stuffing_dot() {
        let (_, message) = read_all(b"..leading\r\n...\r\n.\r\n");
        assert_eq!(message, b".leading\r\n..\r\n");
    }

    #[test]
    fn split_at_every_byte() {
        let input = b"a\r\n..b\r\n.\r\n";
        for split in 0..input.len() {
            let mut reader = DataReader::new(1024);
            let first = reader.feed(&input[..split]);
            assert_eq!(first, Progress::NeedMore, "split at {split}");
            let second = reader.feed(&input[split..]);
            assert_eq!(second, Progress::Done { consumed: input.len() - split });
            assert_eq!(reader.into_message(), b"a\r\n.b\r\n");
        }
    }

    #[test]
    fn bare_lf_fails() {
        let (progress, _) = read_all(b"a\r\nb\n.\n");
        assert_eq!(progress, Progress::Failed(DataError::BareLf { line: 2 }));
    }

    #[test]
    fn bare_cr_fails() {
        let (progress, _) = read_all(b"a\r.\r\n");
        assert_eq!(progress, Progress::Failed(DataError::BareCr { line: 1 }));
    }

    #[test]
    fn smuggling_variants_never_end_data() {
        let variants: [&[u8]; 7] = [
            b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r",
        ];
        for variant in variants {
            let mut input = b"Subject: x\r\n\r\nbody".to_vec();
            input.extend_from_slice(variant);
            input.extend_from_slice(b"MAIL FROM:<evil@example.com>\r\n");
            let (progress, _) = read_all(&input);
            assert!(
                matches!(progress, Progress::Failed(_) | Progress::NeedMore),
                "{variant:?} gave {progress:?}"
            );
        }
    }

    #[test]
    fn oversize_is_counted_not_stored() {
        let mut reader = DataReader::new(4);
        assert_eq!(reader.feed(b"abcdef\r\n.\r\n"), Progress::Done { consumed: 11 });
        assert!(reader.too_large());
        assert_eq!(reader.total_size(), 8);
        assert_eq!(reader.into_message(), b"abcd");
    }

    #[test]
    fn longest_line_measured() {
        let mut reader = DataReader::new(1 << 20);
        reader.feed(b"abc\r\n12345\r\n.\r\n");
        assert_eq!(reader.longest_line(), 5);
    }

    /// Dot-stuffs `content` and appends the end of data, as a client does.
    fn stuff(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut line_start = true;
        for &byte in content {
            if line_start && byte == b'.' {
                out.push(b'.');
            }
            out.push(byte);
            line_start = byte == b'\n';
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// Feeds `input` in pieces of the given sizes (the rest in one piece)
    /// and returns the first outcome other than `NeedMore`, with the offset
    /// of its piece in `input`.
    fn feed_in_pieces(reader: &mut DataReader, input: &[u8], sizes: &[usize]) -> (Progress, usize) {
        let mut offset = 0;
        let mut sizes = sizes.iter();
        while offset < input.len() {
            let size = sizes.next().copied().unwrap_or(input.len()).clamp(1, input.len() - offset);
            let progress = reader.feed(&input[offset..offset + size]);
            if progress != Progress::NeedMore {
                return (progress, offset);
            }
            offset += size;
        }
        (Progress::NeedMore, offset)
    }

    /// Lines without CR or LF, many starting with or made of dots.
    fn content_lines() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            proptest::collection::vec(any::<u8>().prop_filter("no line end", |b| *b != b'\r' && *b != b'\n'), 0..40),
            proptest::collection::vec(Just(b'.'), 1..4),
            proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'a'), Just(b' ')], 1..6),
        ];
        proptest::collection::vec(line, 0..20).prop_map(|lines| {
            let mut content = Vec::new();
            for line in lines {
                content.extend_from_slice(&line);
                content.extend_from_slice(b"\r\n");
            }
            content
        })
    }

    proptest! {
        /// Stuffed content, fed in any pieces, comes back unchanged and ends
        /// exactly at the end marker; bytes after it are left for commands.
        #[test]
        fn stuffed_content_round_trips(
            content in content_lines(),
            sizes in proptest::collection::vec(1usize..16, 0..64),
        ) {
            let mut input = stuff(&content);
            let end = input.len();
            input.extend_from_slice(b"QUIT\r\n");
            let mut reader = DataReader::new(1 << 20);
            let (progress, offset) = feed_in_pieces(&mut reader, &input, &sizes);
            let Progress::Done { consumed } = progress else {
                panic!("expected the end of data, got {progress:?}");
            };
            prop_assert_eq!(offset + consumed, end);
            prop_assert_eq!(reader.into_message(), content);
        }

        /// The delivery client's dot-stuffing, which scans by line, matches
        /// this byte-by-byte reference, so the reader inverts it.
        #[test]
        fn delivery_stuffing_matches_reference(content in content_lines()) {
            prop_assert_eq!(crate::delivery::client::dot_stuff(&content), stuff(&content));
        }

        /// On any bytes the reader gives the same outcome however the input
        /// is split, ends only at CRLF . CRLF, and fails on every bare CR or
        /// LF before the end.
        #[test]
        fn any_bytes_any_split_same_outcome(
            input in proptest::collection::vec(prop_oneof![
                Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), any::<u8>(),
            ], 0..200),
            sizes in proptest::collection::vec(1usize..8, 0..64),
        ) {
            let mut whole = DataReader::new(64);
            let expected = whole.feed(&input);
            let mut pieces = DataReader::new(64);
            let (progress, offset) = feed_in_pieces(&mut pieces, &input, &sizes);
            let outcome = match progress {
                Progress::Done { consumed } => Progress::Done { consumed: offset + consumed },
                other => other,
            };
            prop_assert_eq!(outcome, expected);

            match expected {
                Progress::Done { consumed } => {
                    let read = &input[..consumed];
                    prop_assert!(read == b".\r\n" || read.ends_with(b"\r\n.\r\n"), "ended after {:?}", read);
                    prop_assert!(check_line_endings(read).is_ok(), "bare CR or LF before the end: {:?}", read);
                }
                Progress::NeedMore => {
                    let complete = input.strip_suffix(b"\r").unwrap_or(&input);
                    prop_assert!(check_line_endings(complete).is_ok(), "bare CR or LF accepted: {:?}", input);
                }
                Progress::Failed(_) => {
                    prop_assert!(check_line_endings(&input).is_err(), "failed on valid input: {:?}", input);
                }
            }
        }

        /// `check_line_endings` accepts exactly the content where every CR
        /// is followed by LF and every LF follows a CR.
        #[test]
        fn bdat_line_endings_match_definition(
            content in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), any::<u8>()], 0..100),
        ) {
            let valid = content.iter().enumerate().all(|(index, &byte)| match byte {
                b'\r' => content.get(index + 1) == Some(&b'\n'),
                b'\n' => index > 0 && content[index - 1] == b'\r',
                _ => true,
            });
            prop_assert_eq!(check_line_endings(&content).is_ok(), valid);
        }
    }

    #[test]
    fn bdat_line_endings() {
        assert_eq!(check_line_endings(b"a\r\nbcd\r\n"), Ok(3));
        assert_eq!(check_line_endings(b"a\r\nb\n"), Err(DataError::BareLf { line: 2 }));
        assert_eq!(check_line_endings(b"a\rb"), Err(DataError::BareCr { line: 1 }));
    }
}
