//! JSON bodies read strictly: an object that names a key twice is refused
//! (OWASP ASVS V5.1.1, HTTP parameter pollution). serde_json keeps the last
//! value of a repeated key in a map and errors only for some struct fields,
//! so `{"dry_run": true, "dry_run": false}` would otherwise mean whatever the
//! reader's last wins.

use std::{collections::HashSet, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Parses `body` as JSON, refusing any object with a repeated key; the error
/// names the key (shortened).
pub fn parse(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    NoDuplicates.deserialize(&mut de)?;
    de.end()?;
    serde_json::from_slice(body)
}

/// Walks a JSON document and fails on a repeated key; keeps nothing.
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let shown: String = key.chars().take(40).collect();
                return Err(de::Error::custom(format!(
                    "the key {shown:?} appears twice in one object"
                )));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_at_any_depth_is_refused_and_the_rest_reads_as_json() {
        assert!(parse(br#"{"a": 1, "b": [1, {"c": true}]}"#).is_ok());
        let e = parse(br#"{"dry_run": true, "dry_run": false}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"dry_run\" appears twice"), "{e}");
        assert!(parse(br#"{"filter": {"x": "1", "x": "2"}}"#).is_err());
        assert!(parse(br#"[{"k": 1}, {"k": 2}]"#).is_ok());
        assert!(parse(b"{\"a\": 1} trailing").is_err());
    }
}
