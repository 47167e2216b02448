//! A small SQL lexer: words, quoted identifiers, literals and punctuation with their
//! parenthesis depth — enough to classify a statement without parsing it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind<'a> {
    /// Unquoted identifier or keyword.
    Word(&'a str),
    /// "Quoted identifier" (content without the quotes, `""` left as is).
    QuotedIdent(&'a str),
    /// A string, dollar-quoted string, number or `$n` parameter.
    Literal,
    Punct(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Token<'a> {
    pub(super) kind: Kind<'a>,
    /// Parenthesis depth at which the token stands (an opening parenthesis stands outside).
    pub(super) depth: u32,
}

impl Token<'_> {
    pub(super) fn is_word(&self, keyword: &str) -> bool {
        matches!(self.kind, Kind::Word(word) if word.eq_ignore_ascii_case(keyword))
    }

    pub(super) fn is_punct(&self, byte: u8) -> bool {
        self.kind == Kind::Punct(byte)
    }
}

/// An unterminated quote, comment or dollar-quoted string.
#[derive(Debug)]
pub(super) struct Unterminated;

pub(super) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    depth: u32,
}

impl<'a> Lexer<'a> {
    pub(super) fn new(src: &'a str) -> Self {
        Self {
            src,
            pos: 0,
            depth: 0,
        }
    }

    fn byte(&self, at: usize) -> Option<u8> {
        self.src.as_bytes().get(at).copied()
    }

    pub(super) fn next_token(&mut self) -> Result<Option<Token<'a>>, Unterminated> {
        self.skip_space_and_comments()?;
        let Some(byte) = self.byte(self.pos) else {
            return Ok(None);
        };
        let depth = self.depth;
        let kind = match byte {
            b'\'' => {
                self.pos += 1;
                self.skip_string(false)?;
                Kind::Literal
            }
            b'"' => {
                let start = self.pos + 1;
                self.pos = start;
                loop {
                    match self.byte(self.pos) {
                        None => return Err(Unterminated),
                        Some(b'"') if self.byte(self.pos + 1) == Some(b'"') => self.pos += 2,
                        Some(b'"') => break,
                        Some(_) => self.pos += 1,
                    }
                }
                let name = &self.src[start..self.pos];
                self.pos += 1;
                Kind::QuotedIdent(name)
            }
            b'$' => {
                self.lex_dollar()?;
                Kind::Literal
            }
            b'0'..=b'9' => {
                while self
                    .byte(self.pos)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
                {
                    self.pos += 1;
                }
                Kind::Literal
            }
            b if is_ident_start(b) => {
                let start = self.pos;
                while self.byte(self.pos).is_some_and(is_ident_continue) {
                    self.pos += 1;
                }
                let word = &self.src[start..self.pos];
                let quote_follows = self.byte(self.pos) == Some(b'\'');
                if quote_follows && (word.eq_ignore_ascii_case("e")) {
                    self.pos += 1;
                    self.skip_string(true)?;
                    Kind::Literal
                } else if quote_follows
                    && (word.eq_ignore_ascii_case("b")
                        || word.eq_ignore_ascii_case("x")
                        || word.eq_ignore_ascii_case("n"))
                {
                    self.pos += 1;
                    self.skip_string(false)?;
                    Kind::Literal
                } else {
                    Kind::Word(word)
                }
            }
            b'(' => {
                self.pos += 1;
                self.depth += 1;
                Kind::Punct(b'(')
            }
            b')' => {
                self.pos += 1;
                self.depth = self.depth.saturating_sub(1);
                return Ok(Some(Token {
                    kind: Kind::Punct(b')'),
                    depth: self.depth,
                }));
            }
            b';' => {
                self.pos += 1;
                self.depth = 0;
                Kind::Punct(b';')
            }
            other => {
                // Operators and other punctuation; multi-byte UTF-8 outside identifiers is
                // skipped whole so that slicing stays on character boundaries.
                self.pos += utf8_len(other);
                Kind::Punct(other)
            }
        };
        Ok(Some(Token { kind, depth }))
    }

    fn skip_space_and_comments(&mut self) -> Result<(), Unterminated> {
        loop {
            match (self.byte(self.pos), self.byte(self.pos + 1)) {
                (Some(b), _) if b.is_ascii_whitespace() => self.pos += 1,
                (Some(b'-'), Some(b'-')) => {
                    while self.byte(self.pos).is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    // Block comments nest in PostgreSQL.
                    self.pos += 2;
                    let mut nesting = 1usize;
                    while nesting > 0 {
                        match (self.byte(self.pos), self.byte(self.pos + 1)) {
                            (None, _) => return Err(Unterminated),
                            (Some(b'/'), Some(b'*')) => {
                                nesting += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                nesting -= 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Skip a string body after its opening quote; `''` is an escaped quote, and in `E''`
    /// strings so is `\'`.
    fn skip_string(&mut self, backslash_escapes: bool) -> Result<(), Unterminated> {
        loop {
            match self.byte(self.pos) {
                None => return Err(Unterminated),
                Some(b'\\') if backslash_escapes => self.pos += 2,
                Some(b'\'') if self.byte(self.pos + 1) == Some(b'\'') => self.pos += 2,
                Some(b'\'') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// `$1` parameter, or a `$tag$ ... $tag$` string (tag may be empty).
    fn lex_dollar(&mut self) -> Result<(), Unterminated> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let mut cursor = start + 1;
        if bytes.get(cursor).is_some_and(u8::is_ascii_digit) {
            while bytes.get(cursor).is_some_and(u8::is_ascii_digit) {
                cursor += 1;
            }
            self.pos = cursor;
            return Ok(());
        }
        while bytes
            .get(cursor)
            .is_some_and(|&b| is_ident_continue(b) && b != b'$')
        {
            cursor += 1;
        }
        if bytes.get(cursor) != Some(&b'$') {
            // A lone `$` is not valid SQL; treat it as punctuation and let the rules decide.
            self.pos = start + 1;
            return Ok(());
        }
        let tag = &self.src[start..=cursor];
        let body_start = cursor + 1;
        match self.src[body_start..].find(tag) {
            Some(offset) => {
                self.pos = body_start + offset + tag.len();
                Ok(())
            }
            None => Err(Unterminated),
        }
    }
}

/// `word` in lower case, using `buffer` (no allocation); `""` when longer than any keyword.
pub(super) fn ascii_lowercase<'b>(word: &str, buffer: &'b mut [u8; 16]) -> &'b str {
    let Some(target) = buffer.get_mut(..word.len()) else {
        return "";
    };
    for (out, byte) in target.iter_mut().zip(word.bytes()) {
        *out = byte.to_ascii_lowercase();
    }
    // Keywords are ASCII; a non-ASCII word cannot match any of them anyway.
    std::str::from_utf8(target).unwrap_or("")
}

const IDENT_START: u8 = 1;
const IDENT_CONTINUE: u8 = 2;

/// Byte classes of identifiers, looked up once per byte in the lexer's hot loop.
const BYTE_CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        let start = b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
        let continues = start || b.is_ascii_digit() || b == b'$';
        table[byte] =
            if start { IDENT_START } else { 0 } | if continues { IDENT_CONTINUE } else { 0 };
        byte += 1;
    }
    table
};

fn is_ident_start(byte: u8) -> bool {
    BYTE_CLASS[usize::from(byte)] & IDENT_START != 0
}

fn is_ident_continue(byte: u8) -> bool {
    BYTE_CLASS[usize::from(byte)] & IDENT_CONTINUE != 0
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}
