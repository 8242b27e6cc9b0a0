//! SMTP replies as Baton sends them (intake) and reads them (delivery).
//!
//! A reply is a three-digit code, an optional enhanced status code (RFC 3463)
//! and one or more text lines. Intake always sends an enhanced code because it
//! advertises ENHANCEDSTATUSCODES (RFC 2034).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `5.7.1`; empty when the peer sent none.
    pub enhanced: String,
    pub lines: Vec<String>,
}

/// Class of a reply for retry decisions (RFC 5321 section 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Positive,
    Intermediate,
    Transient,
    Permanent,
}

impl Reply {
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: enhanced.to_string(),
            lines: vec![text.into()],
        }
    }

    pub fn class(&self) -> Class {
        match self.code / 100 {
            2 => Class::Positive,
            3 => Class::Intermediate,
            4 => Class::Transient,
            _ => Class::Permanent,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.class() == Class::Positive
    }

    /// Returns the text of all lines joined by spaces, without code prefixes.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Returns the reply as one line (`550 5.1.1 text`), for logs and DSNs.
    pub fn one_line(&self) -> String {
        if self.enhanced.is_empty() {
            format!("{} {}", self.code, self.text())
        } else {
            format!("{} {} {}", self.code, self.enhanced, self.text())
        }
    }

    /// Returns the enhanced code, or one derived from the reply class when the
    /// peer sent none (RFC 3463: X.0.0).
    pub fn status(&self) -> String {
        if !self.enhanced.is_empty() {
            return self.enhanced.clone();
        }
        match self.class() {
            Class::Positive | Class::Intermediate => "2.0.0".to_string(),
            Class::Transient => "4.0.0".to_string(),
            Class::Permanent => "5.0.0".to_string(),
        }
    }

    /// Parses the lines of a reply read from a peer, each without its CRLF.
    /// Every line must carry the same code; the enhanced code is taken from
    /// the first line when it has one.
    pub fn parse_lines(raw: &[String]) -> Option<Reply> {
        let first = raw.first()?;
        let code: u16 = first.get(..3)?.parse().ok()?;
        if !(200..600).contains(&code) {
            return None;
        }
        let mut enhanced = String::new();
        let mut lines = Vec::with_capacity(raw.len());
        for (index, line) in raw.iter().enumerate() {
            if line.get(..3)? != &first[..3] {
                return None;
            }
            let mut text = line.get(4..).unwrap_or("");
            if index == 0 {
                if let Some((candidate, rest)) = split_enhanced(text, code) {
                    enhanced = candidate.to_string();
                    text = rest;
                }
            } else if let Some((candidate, rest)) = split_enhanced(text, code) {
                if candidate == enhanced {
                    text = rest;
                }
            }
            lines.push(text.to_string());
        }
        Some(Reply {
            code,
            enhanced,
            lines,
        })
    }
}

/// Splits `5.1.1 rest` into the enhanced code and the rest, when the text
/// starts with an enhanced code whose class digit matches the reply code.
fn split_enhanced(text: &str, code: u16) -> Option<(&str, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let candidate = &text[..end];
    let mut parts = candidate.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let valid = class.len() == 1
        && class.as_bytes()[0] == b'0' + (code / 100) as u8
        && (1..=3).contains(&subject.len())
        && (1..=3).contains(&detail.len())
        && subject.bytes().chain(detail.bytes()).all(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    Some((candidate, text[end..].trim_start()))
}

impl fmt::Display for Reply {
    /// Formats the reply for the wire, with CRLF after every line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        for (index, line) in self.lines.iter().enumerate() {
            let separator = if index == last { ' ' } else { '-' };
            if self.enhanced.is_empty() {
                write!(f, "{}{}{}\r\n", self.code, separator, line)?;
            } else {
                write!(f, "{}{}{} {}\r\n", self.code, separator, self.enhanced, line)?;
            }
        }
        if self.lines.is_empty() {
            write!(f, "{} {}\r\n", self.code, self.enhanced)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_multiline_with_enhanced_code() {
        let raw = vec![
            "550-5.7.1 first line".to_string(),
            "550 5.7.1 second line".to_string(),
        ];
        let reply = Reply::parse_lines(&raw).unwrap();
        assert_eq!(reply.code, 550);
        assert_eq!(reply.enhanced, "5.7.1");
        assert_eq!(reply.text(), "first line second line");
    }

    #[test]
    fn parse_without_enhanced_code() {
        let reply = Reply::parse_lines(&["421 mx busy".to_string()]).unwrap();
        assert_eq!(reply.enhanced, "");
        assert_eq!(reply.status(), "4.0.0");
        assert_eq!(reply.text(), "mx busy");
    }

    #[test]
    fn parse_rejects_mismatched_codes() {
        let raw = vec!["250-a".to_string(), "251 b".to_string()];
        assert!(Reply::parse_lines(&raw).is_none());
    }

    #[test]
    fn enhanced_code_class_must_match() {
        let reply = Reply::parse_lines(&["450 5.1.1 odd".to_string()]).unwrap();
        assert_eq!(reply.enhanced, "");
    }

    #[test]
    fn display_multiline() {
        let reply = Reply {
            code: 250,
            enhanced: String::new(),
            lines: vec!["mta.example".into(), "PIPELINING".into()],
        };
        assert_eq!(reply.to_string(), "250-mta.example\r\n250 PIPELINING\r\n");
    }
}
