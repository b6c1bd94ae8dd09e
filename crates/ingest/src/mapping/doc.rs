//! A parsed raw record: the top-level JSON object as borrowed raw fields.
//! The whole payload is validated once, but only the fields a mapping reads
//! are decoded, and nothing is copied for the others.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's fields, in document order (a repeated key: the last wins).
pub struct Doc<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Doc<'a> {
    /// Parses `text`, which must be a JSON object.
    pub fn parse(text: &'a str) -> Result<Doc<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = de.deserialize_map(FieldsVisitor)?;
        de.end()?;
        Ok(Doc { fields })
    }

    /// The raw value of top-level field `key`.
    pub fn raw(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(12));
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let v: &'de RawValue = map.next_value()?;
            out.push((k, v));
        }
        Ok(out)
    }
}

/// A key, borrowed from the input unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Whether brackets nest deeper than `limit` (strings are skipped).
pub fn nesting_exceeds(bytes: &[u8], limit: usize) -> bool {
    // Fast path: with no more openers than the limit, no nesting can exceed
    // it (this count vectorizes; typical events have one to three).
    let openers = memchr::memchr2_iter(b'{', b'[', bytes).count();
    if openers <= limit {
        return false;
    }
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn borrows_fields_and_last_duplicate_wins() {
        let d = Doc::parse(r#"{"a":1,"b":{"c":[1,2]},"a\u0062":"x","a":2}"#).unwrap();
        assert_eq!(d.raw("a").unwrap().get(), "2");
        assert_eq!(d.raw("b").unwrap().get(), r#"{"c":[1,2]}"#);
        assert_eq!(d.raw("ab").unwrap().get(), r#""x""#);
        assert!(d.raw("z").is_none());
        assert!(Doc::parse("[1]").is_err());
        assert!(Doc::parse(r#"{"a":1} x"#).is_err());
    }

    #[test]
    fn nesting_scan_skips_strings() {
        assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[[["}"#, 3));
        assert!(nesting_exceeds(br#"{"a":[[[1]]]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a":"\"[[[[","b":[[1]]}"#, 3));
        assert!(
            !nesting_exceeds(br#"{"a":[1],"b":[2],"c":{"d":[3]}}"#, 3),
            "wide, not deep"
        );
    }
}
