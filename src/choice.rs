//! Values from a closed set of names, such as `data.sampling = "random"` or a run's
//! `"completed"` in status.json. Each is an enum read from and written back to exactly the
//! name the file uses: a spec is then checked where it is read (a bad name is refused with the
//! value and every valid name), files keep their text, and no later code matches on strings.

use serde::de::Error as _;
use serde::Deserialize;

/// An enum whose values are written as names.
pub trait Choice: Copy + 'static {
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];
    /// The value as files write it.
    fn name(self) -> &'static str;
}

/// The valid names of `T` for a message: `"a", "b" or "c"`.
fn expected<T: Choice>() -> String {
    let names: Vec<String> = T::ALL.iter().map(|c| format!("{:?}", c.name())).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The value named `s`; the error names `s` and every valid name (the spec reader adds the
/// file and the key).
pub fn from_name<T: Choice>(s: &str) -> Result<T, String> {
    T::ALL
        .iter()
        .copied()
        .find(|c| c.name() == s)
        .ok_or_else(|| format!("{s:?}: expected {}", expected::<T>()))
}

/// Reads a `T` from its name (see `from_name`).
pub fn deserialize<'de, T: Choice, D: serde::Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    match String::deserialize(d) {
        Ok(s) => from_name(&s).map_err(D::Error::custom),
        Err(_) => Err(D::Error::custom(format!("expected {}", expected::<T>()))),
    }
}

/// `Serialize` and `Deserialize` of `Choice` enums, by name.
macro_rules! serde_by_name {
    ($($t:ty),+) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($crate::choice::Choice::name(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::choice::deserialize(d)
            }
        }
    )+};
}
pub(crate) use serde_by_name;
