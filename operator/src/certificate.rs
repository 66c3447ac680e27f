//! The validity period of a client certificate, read from its PEM without a TLS library.
//!
//! Brokers do not say *why* they refuse a client certificate: Kafka's TLS stack answers an expired one with the
//! same `certificate_unknown` alert (RFC 8446 §6.2, alert 46) as an untrusted one. The probe tells the two apart
//! by looking at its own certificate: refused and past its `notAfter` means expired
//! ([`crate::probe::ProbeError::from_client_error`]).
//!
//! Only as much DER (X.690) as RFC 5280 §4.1 needs to reach `tbsCertificate.validity` is read: `Certificate ::=
//! SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER, signature
//! AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time, notAfter Time }, … }, … }`, with `Time`
//! a UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or a GeneralizedTime (`YYYYMMDDHHMMSSZ`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;

/// `notBefore` and `notAfter` of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: Timestamp,
    /// Last instant the certificate is valid.
    pub not_after: Timestamp,
}

impl Validity {
    /// Whether `now` is past `notAfter`.
    pub fn expired_at(&self, now: Timestamp) -> bool {
        now > self.not_after
    }
}

/// The validity of the first certificate (the leaf) in `pem`; `None` if there is no parseable `CERTIFICATE` block.
pub fn validity(pem: &str) -> Option<Validity> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let stop = start + pem[start..].find(END)?;
    let b64: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    validity_der(&STANDARD.decode(b64).ok()?)
}

/// The validity of a DER-encoded certificate.
pub fn validity_der(der: &[u8]) -> Option<Validity> {
    let (tag, cert, _) = element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = element(cert)?;
    if tag != 0x30 {
        return None;
    }
    // [0] EXPLICIT version (absent in v1 certificates).
    let (tag, _, rest) = element(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    // serialNumber, signature, issuer.
    for want in [0x02, 0x30, 0x30] {
        let (tag, _, rest) = element(tbs)?;
        if tag != want {
            return None;
        }
        tbs = rest;
    }
    let (tag, validity, _) = element(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, v1, rest) = element(validity)?;
    let (t2, v2, _) = element(rest)?;
    Some(Validity { not_before: time(t1, v1)?, not_after: time(t2, v2)? })
}

/// One DER element of `input`: (tag, contents, the rest). Single-byte tags, definite lengths (DER has no other).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// A UTCTime (tag 0x17) or GeneralizedTime (tag 0x18) in the `Z` form RFC 5280 §4.1.2.5 requires.
fn time(tag: u8, value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i16 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let n = |i: usize| rest[i..i + 2].parse::<i8>().ok();
    let dt = jiff::civil::DateTime::new(year, n(0)?, n(2)?, n(4)?, n(6)?, n(8)?, 0).ok()?;
    dt.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A certificate made by `openssl` with the given validity (`openssl x509 -not_before/-not_after` needs
    /// OpenSSL 3.4, so the CA tool is used as the bed does). Dates as `openssl ca -startdate`: `YYYYMMDDHHMMSSZ`.
    pub(crate) fn certificate(start: &str, end: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kpipe-cert-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).current_dir(&dir).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ]);
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "c.key", "-out", "c.csr", "-subj", "/CN=c"]);
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("db/index.txt"), "").unwrap();
        std::fs::write(dir.join("db/serial"), "1000\n").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca=t\n[t]\ndir=db\ndatabase=db/index.txt\nserial=db/serial\nnew_certs_dir=db\n\
             certificate=ca.crt\nprivate_key=ca.key\ndefault_md=sha256\npolicy=p\nunique_subject=no\n[p]\n\
             commonName=supplied\n",
        )
        .unwrap();
        run(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-in",
            "c.csr",
            "-out",
            "c.crt",
            "-startdate",
            start,
            "-enddate",
            end,
            "-notext",
        ]);
        let pem = std::fs::read_to_string(dir.join("c.crt")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        pem
    }

    #[test]
    fn reads_utc_and_generalized_times() {
        // UTCTime (before 2050) and GeneralizedTime (2050 and later) in one certificate.
        let pem = certificate("20200101000000Z", "20510203040506Z");
        let v = validity(&pem).expect("validity");
        assert_eq!(v.not_before, "2020-01-01T00:00:00Z".parse::<Timestamp>().unwrap());
        assert_eq!(v.not_after, "2051-02-03T04:05:06Z".parse::<Timestamp>().unwrap());
        assert!(!v.expired_at("2030-01-01T00:00:00Z".parse().unwrap()));
        assert!(v.expired_at("2051-02-03T04:05:07Z".parse().unwrap()));
        // The leaf of a chain is the first block.
        let expired = certificate("20200101000000Z", "20200102000000Z");
        let chain = format!("{expired}{pem}");
        assert!(validity(&chain).unwrap().expired_at(Timestamp::now()));
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(validity("no pem here"), None);
        assert_eq!(validity("-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"), None);
        assert_eq!(validity_der(&[0x30, 0x82, 0xff]), None, "a length past the end");
        assert_eq!(time(0x17, b"2001011200Z"), None, "too short");
        assert_eq!(time(0x17, b"200101120000+0100"), None, "not UTC");
    }
}
