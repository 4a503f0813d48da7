//! DNS wire format, parsed once into observer's own typed [`DnsMessage`].
//!
//! hickory-proto does the byte-level work (names with compression, fields), except that
//! the fixed header and plain names are read directly (see `WireHeader`,
//! `plain_name_text`); nothing outside
//! this module sees wire bytes or hickory types. Only what correlation
//! needs is kept: header flags, the first question, and the answer section's address and
//! CNAME records (at most [`MAX_ANSWERS`]). Authority and additional sections are not
//! read, so a malformed record there cannot reject a usable answer.
//!
//! Every failure is a [`DnsParseError`] with a small [`DnsParseErrorKind`] for counting;
//! work is bounded by the message length and the answer cap.
pub mod tcp;

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use hickory_proto::{
    op::OpCode,
    rr::{Name, RecordType},
    serialize::binary::{BinDecodable, BinDecoder, DecodeError},
};

/// Answer records kept per message; the rest are skipped and
/// [`DnsMessage::answers_capped`] is set.
pub const MAX_ANSWERS: usize = 64;
/// More questions than this is not a message any stub resolver sends.
pub const MAX_QUESTIONS: u16 = 4;

const HEADER_LEN: usize = 12;
/// Smallest question: root name (1) + type (2) + class (2).
const MIN_QUESTION_LEN: usize = 5;
/// Smallest record: root name (1) + type, class (4) + ttl (4) + rdlength (2).
const MIN_RECORD_LEN: usize = 11;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

/// A record type by number, with its mnemonic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QType(pub u16);

impl QType {
    pub const A: QType = QType(TYPE_A);
    pub const AAAA: QType = QType(TYPE_AAAA);
    pub const CNAME: QType = QType(TYPE_CNAME);

    /// "A", "AAAA", "TYPE65534" for types without a mnemonic.
    pub fn mnemonic(self) -> Cow<'static, str> {
        match RecordType::from(self.0) {
            RecordType::Unknown(n) => Cow::Owned(format!("TYPE{n}")),
            known => Cow::Borrowed(<&'static str>::from(known)),
        }
    }
}

/// A response code (4 header bits; extended codes from EDNS are not read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rcode(pub u16);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const SERVFAIL: Rcode = Rcode(2);
    pub const NXDOMAIN: Rcode = Rcode(3);
    pub const REFUSED: Rcode = Rcode(5);

    /// "NOERROR", "NXDOMAIN", ... upper case as in dig output.
    pub fn mnemonic(self) -> Cow<'static, str> {
        let name = match self.0 {
            0 => "NOERROR",
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            6 => "YXDOMAIN",
            7 => "YXRRSET",
            8 => "NXRRSET",
            9 => "NOTAUTH",
            10 => "NOTZONE",
            n => return Cow::Owned(format!("RCODE{n}")),
        };
        Cow::Borrowed(name)
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mnemonic())
    }
}

/// The question: name lower case, without the trailing dot (every wire name is absolute;
/// whether the application asked for it that way is decided in correlation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: Arc<str>,
    pub qtype: QType,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Target name, lower case, no trailing dot.
    Cname(Arc<str>),
}

impl AnswerData {
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            AnswerData::A(a) => Some(IpAddr::V4(*a)),
            AnswerData::Aaaa(a) => Some(IpAddr::V6(*a)),
            AnswerData::Cname(_) => None,
        }
    }
}

/// One A, AAAA or CNAME record of the answer section (other types are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Owner name, lower case, no trailing dot. Shared with the question (or an earlier
    /// record) when the message compresses it to a name already read.
    pub owner: Arc<str>,
    pub ttl: u32,
    pub data: AnswerData,
}

/// What observer keeps of one DNS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsMessage {
    pub id: u16,
    /// QR bit: this is a response.
    pub is_response: bool,
    /// 0 = QUERY; correlation ignores the others.
    pub opcode: u8,
    /// TC bit: the server cut the answer, the client will retry over TCP.
    pub truncated: bool,
    pub rcode: Rcode,
    /// The first question; `None` when the message has none.
    pub question: Option<Question>,
    pub answers: Vec<Answer>,
    /// The answer section held more than [`MAX_ANSWERS`] records.
    pub answers_capped: bool,
}

impl DnsMessage {
    /// Addresses of the answer section, in order.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, u32)> + '_ {
        self.answers
            .iter()
            .filter_map(|a| a.data.address().map(|ip| (ip, a.ttl)))
    }
}

/// Why a message was rejected: few kinds, so that callers can count them by label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsParseErrorKind {
    /// Zero bytes.
    Empty,
    /// The message ends before a header, name or record it announces.
    Truncated,
    /// Section counts that the message length cannot hold, or too many questions.
    BadCounts,
    /// A name with a compression loop, a forward pointer, an over-long label or name.
    BadName,
    /// A record whose data does not match its type or length.
    BadRecord,
}

impl DnsParseErrorKind {
    pub const ALL: [DnsParseErrorKind; 5] = [
        DnsParseErrorKind::Empty,
        DnsParseErrorKind::Truncated,
        DnsParseErrorKind::BadCounts,
        DnsParseErrorKind::BadName,
        DnsParseErrorKind::BadRecord,
    ];

    /// Stable snake_case label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DnsParseErrorKind::Empty => "empty",
            DnsParseErrorKind::Truncated => "truncated",
            DnsParseErrorKind::BadCounts => "bad_counts",
            DnsParseErrorKind::BadName => "bad_name",
            DnsParseErrorKind::BadRecord => "bad_record",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DNS message rejected ({kind:?}) at byte {offset} of {len}: {detail}")]
pub struct DnsParseError {
    pub kind: DnsParseErrorKind,
    /// Where decoding stopped.
    pub offset: usize,
    /// Length of the message.
    pub len: usize,
    pub detail: String,
}

impl DnsParseError {
    fn new(kind: DnsParseErrorKind, offset: usize, len: usize, detail: impl Into<String>) -> Self {
        Self {
            kind,
            offset,
            len,
            detail: detail.into(),
        }
    }

    fn from_decode(err: DecodeError, offset: usize, len: usize) -> Self {
        let kind = match &err {
            DecodeError::InsufficientBytes => DnsParseErrorKind::Truncated,
            DecodeError::PointerNotPriorToLabel { .. }
            | DecodeError::LabelBytesTooLong(_)
            | DecodeError::UnrecognizedLabelCode(_)
            | DecodeError::DomainNameTooLong(_)
            | DecodeError::LabelOverlapsWithOther { .. } => DnsParseErrorKind::BadName,
            _ => DnsParseErrorKind::BadRecord,
        };
        Self::new(kind, offset, len, err.to_string())
    }
}

/// The header's QR bit, read without parsing: `Some(true)` for a response, `None` when the
/// bytes are too short to hold a header (the parser then reports them).
pub fn is_response(bytes: &[u8]) -> Option<bool> {
    (bytes.len() >= HEADER_LEN).then(|| bytes[2] & 0x80 != 0)
}

/// Parses one DNS message (UDP payload, or one TCP message without its length prefix).
pub fn parse(bytes: &[u8]) -> Result<DnsMessage, DnsParseError> {
    let len = bytes.len();
    if len == 0 {
        return Err(DnsParseError::new(
            DnsParseErrorKind::Empty,
            0,
            0,
            "no bytes",
        ));
    }
    if len < HEADER_LEN {
        return Err(DnsParseError::new(
            DnsParseErrorKind::Truncated,
            0,
            len,
            "shorter than the 12-byte header",
        ));
    }
    // The header's fields are at fixed offsets and any value is valid, so they are read
    // directly (the same bits hickory's `Header::read` would decode).
    let header = WireHeader::read(bytes);
    let counts = &header;
    let mut cursor = Cursor {
        bytes,
        pos: HEADER_LEN,
    };

    if counts.queries > MAX_QUESTIONS {
        return Err(DnsParseError::new(
            DnsParseErrorKind::BadCounts,
            HEADER_LEN,
            len,
            format!("{} questions", counts.queries),
        ));
    }
    // Hostile counts are rejected before any allocation: every question and record takes
    // a minimum number of bytes. Only the answer section is read, so only it is checked.
    let needed = usize::from(counts.queries) * MIN_QUESTION_LEN
        + usize::from(counts.answers).min(MAX_ANSWERS + 1) * MIN_RECORD_LEN;
    if needed > len - HEADER_LEN {
        return Err(DnsParseError::new(
            DnsParseErrorKind::BadCounts,
            HEADER_LEN,
            len,
            format!(
                "{} questions and {} answers cannot fit in {} bytes",
                counts.queries, counts.answers, len
            ),
        ));
    }

    let mut names = NamesRead::default();
    let mut question = None;
    for _ in 0..counts.queries {
        if question.is_none() {
            let name = names.read(&mut cursor)?;
            let qtype = cursor.u16()?;
            let _qclass = cursor.u16()?;
            question = Some(Question {
                name,
                qtype: QType(qtype),
            });
        } else {
            cursor.hickory_name()?;
            cursor.u16()?;
            cursor.u16()?;
        }
    }

    let wanted = usize::from(counts.answers);
    let mut answers = Vec::with_capacity(wanted.min(MAX_ANSWERS));
    for _ in 0..wanted.min(MAX_ANSWERS) {
        if let Some(answer) = read_answer(&mut cursor, &mut names)? {
            answers.push(answer);
        }
    }

    Ok(DnsMessage {
        id: header.id,
        is_response: header.is_response,
        opcode: header.opcode,
        truncated: header.truncated,
        rcode: Rcode(u16::from(header.rcode)),
        question,
        answers,
        answers_capped: wanted > MAX_ANSWERS,
    })
}

/// The fixed 12-byte header, as far as observer reads it.
struct WireHeader {
    id: u16,
    is_response: bool,
    opcode: u8,
    truncated: bool,
    /// The 4 header bits (extended codes from EDNS are not read).
    rcode: u8,
    queries: u16,
    answers: u16,
}

impl WireHeader {
    /// `bytes` holds at least [`HEADER_LEN`] bytes (checked by the caller).
    fn read(bytes: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
        let flags = bytes[2];
        Self {
            id: u16_at(0),
            is_response: flags & 0x80 != 0,
            opcode: (flags & 0x78) >> 3,
            truncated: flags & 0x02 != 0,
            rcode: bytes[3] & 0x0f,
            queries: u16_at(4),
            answers: u16_at(6),
        }
    }
}

/// Where parsing is in the message: reads that run past the end are `Truncated` errors at
/// the offset they started from.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &str) -> DnsParseError {
        DnsParseError::new(
            DnsParseErrorKind::Truncated,
            self.pos,
            self.bytes.len(),
            format!("the message ends inside {what}"),
        )
    }

    fn slice(&mut self, n: usize, what: &str) -> Result<&'a [u8], DnsParseError> {
        let bytes = self.bytes;
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| bytes.get(self.pos..end))
            .ok_or_else(|| self.truncated(what))?;
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, DnsParseError> {
        let s = self.slice(2, "a 16-bit field")?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, DnsParseError> {
        let s = self.slice(4, "a 32-bit field")?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A name through hickory (escapes, odd labels, long pointer chains: its errors and
    /// text form stay the reference for everything the plain walk leaves to it).
    fn hickory_name(&mut self) -> Result<Name, DnsParseError> {
        let len = self.bytes.len();
        let mut decoder = BinDecoder::new(self.bytes);
        decoder
            .read_slice(self.pos)
            .map_err(|e| DnsParseError::from_decode(e, self.pos, len))?;
        let name = Name::read(&mut decoder)
            .map_err(|e| DnsParseError::from_decode(e, decoder.index(), len))?;
        self.pos = decoder.index();
        Ok(name)
    }
}

/// Names already read in one message, by the offset they start at: a compression pointer
/// to one of them (an answer's owner pointing at the question, nearly always) shares its
/// text instead of decoding and copying it again.
#[derive(Default)]
struct NamesRead {
    known: [(u16, Option<Arc<str>>); 4],
    next: usize,
}

impl NamesRead {
    fn read(&mut self, cursor: &mut Cursor<'_>) -> Result<Arc<str>, DnsParseError> {
        let bytes = cursor.bytes;
        let start = cursor.pos;
        if let [hi, lo, ..] = bytes[start.min(bytes.len())..]
            && hi & 0xc0 == 0xc0
        {
            let target = u16::from_be_bytes([hi & 0x3f, lo]);
            let found = self.known.iter().find_map(|(at, name)| match name {
                Some(name) if *at == target => Some(name.clone()),
                _ => None,
            });
            if let Some(name) = found {
                cursor.pos += 2;
                return Ok(name);
            }
        }
        let text: Arc<str> = match plain_name_text(bytes, start) {
            Some((text, end)) => {
                cursor.pos = end;
                text
            }
            None => Arc::from(name_text(&cursor.hickory_name()?)),
        };
        // Offsets past 0x3fff cannot be pointed at.
        if let Ok(at) = u16::try_from(start)
            && at <= 0x3fff
        {
            self.known[self.next] = (at, Some(text.clone()));
            self.next = (self.next + 1) % self.known.len();
        }
        Ok(text)
    }
}

/// The longest wire name, its final zero byte included.
const MAX_WIRE_NAME: usize = 255;

/// A name's text, read straight from the wire when it is the common case: plain labels
/// (see [`lower_plain`]), at most 255 bytes, pointers only backwards and few of them.
/// Returns the text and where the name ends in the message; `None` for anything else,
/// which then goes through hickory (its errors and escaping stay the reference).
fn plain_name_text(bytes: &[u8], start: usize) -> Option<(Arc<str>, usize)> {
    // The labels' lengths first: a name without pointers (every question, most names)
    // is then the wire's bytes in one piece, each length byte after the first a dot.
    let mut pos = start;
    let mut labels = 0;
    loop {
        let len = *bytes.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => break,
            0x00 => {}
            0xc0 => return compressed_name_text(bytes, start),
            _ => return None,
        }
        if *bytes.get(pos + 1)? == b'-' {
            return None;
        }
        pos += 1 + usize::from(len);
        labels += 1;
        if pos + 1 - start > MAX_WIRE_NAME {
            return None;
        }
    }
    if labels == 0 {
        return Some((Arc::from(""), pos + 1));
    }
    let mut text: Arc<[u8]> = Arc::from(&bytes[start + 1..pos]);
    let out = Arc::get_mut(&mut text)?;
    let mut separator = usize::from(bytes[start]);
    while separator < out.len() {
        let len = out[separator];
        out[separator] = b'.';
        separator += 1 + usize::from(len);
    }
    if !lower_plain(out, labels - 1) {
        return None;
    }
    // SAFETY: `lower_plain` accepted only ASCII. `Arc<[u8]>` and `Arc<str>` have the
    // same layout; validating the text again would cost a tenth of a message's parse.
    Some((
        unsafe { Arc::from_raw(Arc::into_raw(text) as *const str) },
        pos + 1,
    ))
}

/// [`plain_name_text`] for a name that ends in a compression pointer: its labels are
/// gathered from the places the pointers lead to.
fn compressed_name_text(bytes: &[u8], start: usize) -> Option<(Arc<str>, usize)> {
    const MAX_POINTERS: usize = 16;
    let mut text = [0u8; MAX_WIRE_NAME];
    let mut len = 0;
    let mut labels = 0;
    let mut pos = start;
    let mut end = None;
    let mut wire_len = 1;
    let mut pointers = 0;
    loop {
        let b = *bytes.get(pos)?;
        match b & 0xc0 {
            0x00 if b == 0 => break,
            0x00 => {
                let label = bytes.get(pos + 1..pos + 1 + usize::from(b))?;
                wire_len += 1 + label.len();
                if wire_len > MAX_WIRE_NAME || label.first() == Some(&b'-') {
                    return None;
                }
                if labels > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                text[len..len + label.len()].copy_from_slice(label);
                len += label.len();
                labels += 1;
                pos += 1 + label.len();
            }
            0xc0 => {
                let target = usize::from(u16::from_be_bytes([b & 0x3f, *bytes.get(pos + 1)?]));
                pointers += 1;
                if target >= pos || pointers > MAX_POINTERS {
                    return None;
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return None,
        }
    }
    let text = &mut text[..len];
    if !lower_plain(text, labels.max(1) - 1) {
        return None;
    }
    // SAFETY: `lower_plain` accepted only ASCII.
    let text = unsafe { std::str::from_utf8_unchecked(text) };
    Some((Arc::from(text), end.unwrap_or(pos + 1)))
}

/// Lower-cases a name's text in place. True when every byte may appear unescaped in a
/// name's text (letters, digits, `_`, `-`, a leading `-` being the caller's check) or is
/// one of exactly `dots` label separators: a `.` inside a label needs hickory's escaping.
/// Eight bytes at a time (each byte's verdict in its high bit): this was most of a
/// message's parse when read byte by byte.
fn lower_plain(text: &mut [u8], dots: usize) -> bool {
    if text.len() < 8 {
        let mut plain = true;
        let mut seen = 0;
        for c in text.iter_mut() {
            seen += usize::from(*c == b'.');
            let lower = PLAIN_LOWER[usize::from(*c)];
            plain &= lower != 0;
            *c = lower;
        }
        return plain && seen == dots;
    }
    let mut seen = 0;
    let mut plain = true;
    let last = text.len() - 8;
    let mut at = 0;
    loop {
        // Never `None` (`at <= last`); hickory reads the name if it were.
        let Some(chunk) = text[at..].first_chunk_mut::<8>() else {
            return false;
        };
        let word = u64::from_le_bytes(*chunk);
        let verdict = WordVerdict::of(word);
        plain &= verdict.plain;
        *chunk = verdict.lower.to_le_bytes();
        if at == last {
            // The last word overlaps the one before it when the text is not a multiple of
            // eight bytes: the overlap's dots were counted there. Lower case and the verdict
            // do not change when a byte is read twice.
            let overlap = (8 - text.len() % 8) % 8;
            seen += WordVerdict::count(verdict.dots_or_slashes & (!0u64 << (8 * overlap)));
            break;
        }
        seen += WordVerdict::count(verdict.dots_or_slashes);
        at = (at + 8).min(last);
    }
    plain && seen == dots
}

/// Eight bytes of a name's text judged at once (see [`lower_plain`]).
struct WordVerdict {
    /// The bytes, ASCII capitals made lower case.
    lower: u64,
    /// Every byte may appear unescaped in a name's text.
    plain: bool,
    /// The high bit of each byte that is a `.` or a `/`: the caller knows how many dots
    /// its text holds, and one more of either is a byte that needs escaping.
    dots_or_slashes: u64,
}

impl WordVerdict {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;

    fn of(word: u64) -> Self {
        // Past this point every byte is below 0x80, so adding at most 0x7f to a byte
        // cannot carry into the next one.
        if word & Self::HIGH != 0 {
            return Self {
                lower: word,
                plain: false,
                dots_or_slashes: 0,
            };
        }
        let folded = word | Self::splat(0x20);
        let letter = Self::within(folded, b'a', b'z');
        // `-`, `.`, `/` and the digits; a `/` is told from a dot by its count.
        let dash_to_digits = Self::within(word, b'-', b'9');
        let underscore = Self::within(word, b'_', b'_');
        let allowed = letter | dash_to_digits | underscore;
        Self {
            lower: word | (letter >> 2),
            plain: allowed == Self::HIGH,
            dots_or_slashes: Self::within(word, b'.', b'/'),
        }
    }

    /// How many bytes have their high bit set in `verdicts` (a verdict of [`Self::within`]):
    /// one multiply where `count_ones` is a dozen instructions without a popcount
    /// instruction in the target's baseline.
    fn count(verdicts: u64) -> usize {
        ((verdicts >> 7).wrapping_mul(Self::ONES) >> 56) as usize
    }

    fn splat(byte: u8) -> u64 {
        Self::ONES * u64::from(byte)
    }

    /// The high bit of each byte in `lo..=hi` (bytes below 0x80, `lo` above 0).
    fn within(word: u64, lo: u8, hi: u8) -> u64 {
        let at_least_lo = word + Self::splat(0x80 - lo);
        let above_hi = word + Self::splat(0x7f - hi);
        at_least_lo & !above_hi & Self::HIGH
    }
}

/// Each byte lower case if it may appear unescaped in a name's text, else 0 (short texts;
/// [`WordVerdict`] judges longer ones eight bytes at a time).
const PLAIN_LOWER: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
            table[c] = b.to_ascii_lowercase();
        }
        c += 1;
    }
    table
};

/// Reads one record; `None` for types correlation does not use (skipped by length).
fn read_answer(
    cursor: &mut Cursor<'_>,
    names: &mut NamesRead,
) -> Result<Option<Answer>, DnsParseError> {
    let len = cursor.bytes.len();
    let owner = names.read(cursor)?;
    let rtype = cursor.u16()?;
    let _class = cursor.u16()?;
    let ttl = cursor.u32()?;
    let rdlength = usize::from(cursor.u16()?);
    let rdata_start = cursor.pos;
    let bad_length = |what: &str| {
        DnsParseError::new(
            DnsParseErrorKind::BadRecord,
            rdata_start,
            len,
            format!("{what} record with rdlength {rdlength}"),
        )
    };
    let data = match rtype {
        TYPE_A => {
            if rdlength != 4 {
                return Err(bad_length("A"));
            }
            let s = cursor.slice(4, "an A record")?;
            AnswerData::A(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
        }
        TYPE_AAAA => {
            if rdlength != 16 {
                return Err(bad_length("AAAA"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(cursor.slice(16, "an AAAA record")?);
            AnswerData::Aaaa(Ipv6Addr::from(octets))
        }
        TYPE_CNAME => {
            if rdata_start + rdlength > len {
                return Err(DnsParseError::new(
                    DnsParseErrorKind::Truncated,
                    rdata_start,
                    len,
                    "CNAME data past the end",
                ));
            }
            let target = names.read(cursor)?;
            if cursor.pos != rdata_start + rdlength {
                return Err(bad_length("CNAME"));
            }
            AnswerData::Cname(target)
        }
        _ => {
            cursor.slice(rdlength, "a record's data")?;
            return Ok(None);
        }
    };
    Ok(Some(Answer { owner, ttl, data }))
}

/// Lower case, without the trailing dot; the root is the empty string. Labels that need
/// no escaping (letters, digits, `_`, `-` not first: nearly every name) are copied
/// directly; anything else goes through hickory's escaping text form.
fn name_text(name: &Name) -> String {
    let mut text = String::with_capacity(name.len());
    for label in name.iter() {
        let plain = label
            .iter()
            .enumerate()
            .all(|(i, b)| b.is_ascii_alphanumeric() || *b == b'_' || (*b == b'-' && i > 0));
        if !plain || label.is_empty() {
            return escaped_name_text(name);
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    text
}

fn escaped_name_text(name: &Name) -> String {
    let mut text = name.to_ascii();
    text.make_ascii_lowercase();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

/// Whether the opcode is a standard query (the only kind correlation follows).
pub fn is_standard_query(message: &DnsMessage) -> bool {
    message.opcode == u8::from(OpCode::Query)
}

/// A test fixture, outside the public API unless the `test-support` feature asks for it
/// (the benchmarks and the testbed do): builds queries and responses shaped like a stub
/// resolver's and a forwarder's. Kept here so that hickory stays behind this module.
#[cfg(any(test, feature = "test-support"))]
pub mod build {
    use std::net::IpAddr;

    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, CNAME, SOA},
        },
    };

    /// What a response carries in its answer section.
    #[derive(Clone, Debug)]
    pub enum WireAnswer {
        Addr {
            owner: String,
            ttl: u32,
            ip: IpAddr,
        },
        Cname {
            owner: String,
            ttl: u32,
            target: String,
        },
    }

    fn name(text: &str) -> Name {
        let absolute = if text.ends_with('.') {
            text.to_string()
        } else {
            format!("{text}.")
        };
        Name::from_ascii(absolute).expect("test names are valid")
    }

    /// A stub resolver's query: RD set, one question, no EDNS (glibc's default).
    pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), RecordType::from(qtype)));
        m.to_vec().expect("query encodes")
    }

    /// A response with the question echoed, RD/RA set, the given rcode and answers; an
    /// NXDOMAIN or empty NOERROR carries an SOA in authority as dnsmasq does for local zones.
    pub fn response(
        id: u16,
        qname: &str,
        qtype: u16,
        rcode: u16,
        answers: &[WireAnswer],
        soa_zone: Option<&str>,
    ) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.metadata.response_code = ResponseCode::from_low(rcode as u8);
        m.add_query(Query::query(name(qname), RecordType::from(qtype)));
        for a in answers {
            let record = match a {
                WireAnswer::Addr { owner, ttl, ip } => {
                    let data = match ip {
                        IpAddr::V4(v4) => RData::A(A(*v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                    };
                    Record::from_rdata(name(owner), *ttl, data)
                }
                WireAnswer::Cname { owner, ttl, target } => {
                    Record::from_rdata(name(owner), *ttl, RData::CNAME(CNAME(name(target))))
                }
            };
            m.add_answer(record);
        }
        if let Some(zone) = soa_zone {
            let soa = SOA::new(
                name(zone),
                name(&format!("hostmaster.{zone}")),
                1,
                1200,
                180,
                1_209_600,
                600,
            );
            m.add_authority(Record::from_rdata(name(zone), 600, RData::SOA(soa)));
        }
        m.to_vec().expect("response encodes")
    }
}

#[cfg(test)]
mod tests;
