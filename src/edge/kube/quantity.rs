//! Kubernetes resource quantities ("10Gi", "1.5G", "500M", "1e9") as
//! bytes. Pure; fractions of a byte round up, as Kubernetes rounds storage.

/// `None` for anything that is not a valid non-negative quantity or does
/// not fit in u64.
pub fn parse_quantity(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    // value = digits / 10^scale
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut scale = fraction.len() as u32;
    let (multiplier, extra_exponent): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        s if s.starts_with(['e', 'E']) => (1, s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let mut numerator = digits.checked_mul(multiplier)?;
    if extra_exponent >= 0 {
        numerator = numerator.checked_mul(10u128.checked_pow(extra_exponent as u32)?)?;
    } else {
        scale = scale.checked_add(extra_exponent.unsigned_abs())?;
    }
    let denominator = 10u128.checked_pow(scale)?;
    u64::try_from(numerator.div_ceil(denominator)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_forms() {
        assert_eq!(parse_quantity("1073741824"), Some(1 << 30));
        assert_eq!(parse_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("1e9"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1E3"), Some(1_000));
        assert_eq!(parse_quantity("1500m"), Some(2));
        assert_eq!(parse_quantity("0.1"), Some(1));
        assert_eq!(parse_quantity("10k"), Some(10_000));
        assert_eq!(parse_quantity(""), None);
        assert_eq!(parse_quantity("Gi"), None);
        assert_eq!(parse_quantity("-1Gi"), None);
        assert_eq!(parse_quantity("1Gb"), None);
        assert_eq!(parse_quantity("99999999999Ei"), None);
    }

    proptest! {
        #[test]
        fn binary_suffixes_multiply(n in 0u64..1_000_000, shift in prop::sample::select(vec![(10, "Ki"), (20, "Mi"), (30, "Gi"), (40, "Ti")])) {
            let (bits, suffix) = shift;
            prop_assert_eq!(parse_quantity(&format!("{n}{suffix}")), Some(n << bits));
        }

        #[test]
        fn plain_numbers_are_bytes(n in any::<u64>()) {
            prop_assert_eq!(parse_quantity(&n.to_string()), Some(n));
        }
    }
}
