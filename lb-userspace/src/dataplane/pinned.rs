//! What is already pinned, judged before anything is loaded (audit A-7):
//! for every map the object pins by name, the kernel's own description of
//! the pinned map (type, key size, value size, max_entries, flags) and its
//! layout stamp are compared with what this build's object and flags want.
//! aya alone would open the pin and keep the *object's* definition, so a
//! map of another layout would be misread (or the verifier would refuse the
//! program and the agent would crash-loop).

use std::{fmt, path::Path};

use anyhow::{Context, Result};
use aya::maps::MapData;

/// `BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG`: how programs may access the
/// map, not its layout. The kernel adds `BPF_F_RDONLY_PROG` to device maps
/// itself, so the pinned flags differ from the object's there.
const ACCESS_FLAGS: u32 = (1 << 7) | (1 << 8);

/// `BPF_F_MMAPABLE`: whether user space may map the array, not what its
/// entries mean. A map that differs from the wanted one only in it (the
/// Maglev array pinned by an agent from before it was mapped) is migrated
/// like a resized one: a new map, the entries copied.
const COPYABLE_FLAGS: u32 = lb_common::MAGLEV_MAP_FLAGS;

/// What a map must look like, from the object plus the size flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {} value {} entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The verdict on one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing pinned: the loader creates it.
    Absent,
    /// Same shape and layout: adopted as it is.
    Adopt,
    /// Same type, key, value and layout, another size (or another
    /// [`COPYABLE_FLAGS`]): a new map of the wanted shape is created and
    /// the entries are copied into it.
    Resize { pinned: Shape },
    /// Another type, key, value, flags or layout: it cannot be read by this
    /// build. A new empty map replaces it; its entries are lost.
    Replace { pinned: Shape, why: String },
}

/// Judges the map pinned at `path` against `wanted` and the layout stamps.
/// `pinned_stamp` is the stamp recorded for this map (`None` when the pins
/// carry no stamps, or none for this map); `wanted_stamp` is this build's.
pub fn judge(
    path: &Path,
    wanted: Shape,
    pinned_stamp: Option<u64>,
    wanted_stamp: Option<u64>,
) -> Result<Verdict> {
    if !path.exists() {
        return Ok(Verdict::Absent);
    }
    let info = MapData::from_pin(path)
        .and_then(|data| data.info())
        .with_context(|| format!("reading the kernel's description of {}", path.display()))?;
    let pinned = Shape {
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    Ok(compare(pinned, wanted, pinned_stamp, wanted_stamp))
}

fn compare(
    pinned: Shape,
    wanted: Shape,
    pinned_stamp: Option<u64>,
    wanted_stamp: Option<u64>,
) -> Verdict {
    let mut differences = Vec::new();
    if pinned.map_type != wanted.map_type {
        differences.push(format!("type {} want {}", pinned.map_type, wanted.map_type));
    }
    if pinned.key_size != wanted.key_size {
        differences.push(format!("key {} want {}", pinned.key_size, wanted.key_size));
    }
    if pinned.value_size != wanted.value_size {
        differences.push(format!(
            "value {} want {}",
            pinned.value_size, wanted.value_size
        ));
    }
    let ignored = ACCESS_FLAGS | COPYABLE_FLAGS;
    if pinned.flags & !ignored != wanted.flags & !ignored {
        differences.push(format!(
            "flags {:#x} want {:#x}",
            pinned.flags, wanted.flags
        ));
    }
    if let (Some(old), Some(new)) = (pinned_stamp, wanted_stamp)
        && old != new
    {
        differences.push(format!("layout stamp {old:016x} want {new:016x}"));
    }
    if !differences.is_empty() {
        return Verdict::Replace {
            pinned,
            why: differences.join(", "),
        };
    }
    if pinned.max_entries != wanted.max_entries
        || pinned.flags & COPYABLE_FLAGS != wanted.flags & COPYABLE_FLAGS
    {
        return Verdict::Resize { pinned };
    }
    Verdict::Adopt
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOWS: Shape = Shape {
        map_type: 9,
        key_size: 40,
        value_size: 56,
        max_entries: 262_144,
        flags: 0,
    };

    #[test]
    fn same_shape_and_stamp_is_adopted() {
        assert_eq!(compare(FLOWS, FLOWS, Some(7), Some(7)), Verdict::Adopt);
        // Pins older than the stamps: judged by the shape alone.
        assert_eq!(compare(FLOWS, FLOWS, None, Some(7)), Verdict::Adopt);
    }

    #[test]
    fn another_value_size_is_replaced_and_says_so() {
        let old = Shape {
            value_size: 48,
            max_entries: 1024,
            ..FLOWS
        };
        match compare(old, FLOWS, None, Some(7)) {
            Verdict::Replace { why, .. } => assert_eq!(why, "value 48 want 56"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_stamp_is_replaced_even_with_equal_sizes() {
        assert!(matches!(
            compare(FLOWS, FLOWS, Some(1), Some(2)),
            Verdict::Replace { .. }
        ));
    }

    /// The Maglev array as agents before `BPF_F_MMAPABLE` pinned it.
    #[test]
    fn the_maglev_array_without_mmapable_is_copied_not_replaced() {
        let wanted = Shape {
            map_type: 2,
            key_size: 4,
            value_size: 4,
            max_entries: 4096 * 1021,
            flags: lb_common::MAGLEV_MAP_FLAGS,
        };
        let old = Shape { flags: 0, ..wanted };
        assert_eq!(
            compare(old, wanted, Some(7), Some(7)),
            Verdict::Resize { pinned: old }
        );
        // Any other flag still replaces.
        let other = Shape { flags: 1, ..wanted };
        assert!(matches!(
            compare(other, wanted, Some(7), Some(7)),
            Verdict::Replace { .. }
        ));
    }

    #[test]
    fn only_another_size_is_resized() {
        let old = Shape {
            max_entries: 1024,
            ..FLOWS
        };
        assert_eq!(
            compare(old, FLOWS, Some(7), Some(7)),
            Verdict::Resize { pinned: old }
        );
    }
}
