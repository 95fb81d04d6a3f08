//! Parser for HAProxy's `option httplog` line:
//!
//! ```text
//! %ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs %{+Q}r
//! ```
//!
//! with or without a syslog prefix (`Jan 27 21:52:56 lb1 haproxy[3098]: `). The
//! captured request headers `%hr` carry `{customer_id|service_type}`. Lines are bytes:
//! a request line may hold anything, so the line is read lossily and the fields we keep
//! are validated. Every rejection has a reason; the caller counts and reports it.

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};

/// One request, as stored in `haproxy_logs`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Accept time (`%tr`), read as UTC.
    pub ts: DateTime<Utc>,
    pub customer_id: i32,
    pub service_type: String,
    pub method: String,
    pub status_code: i16,
    pub bytes_out: i64,
    /// `%Ta` (total active time), `None` when HAProxy logged -1.
    pub duration_ms: Option<i32>,
    pub client_ip: String,
    pub backend: String,
    /// `<NOSRV>` when no server was reached.
    pub server: String,
    /// The request's own key: the first 16 bytes of the SHA-256 of the line from the
    /// client address on, as read (lossily). The syslog prefix is left out: two relays
    /// of one request, or a file and a POST of it, stamp their own.
    pub key: [u8; 16],
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("empty line")]
    Empty,
    #[error("no accept date [dd/Mon/yyyy:hh:mm:ss.mmm]")]
    NoDate,
    #[error("bad accept date {0:?}")]
    BadDate(String),
    #[error("truncated: missing {0}")]
    Truncated(&'static str),
    #[error("bad {0}: {1:?}")]
    BadField(&'static str, String),
    #[error("missing capture {{customer_id|service_type}}")]
    MissingCapture,
}

/// Parses one line (without its newline).
pub fn parse_line(raw: &[u8]) -> Result<LogRecord, LineError> {
    // Valid UTF-8 (nearly every line) is borrowed as is; only other bytes are replaced.
    let line = match std::str::from_utf8(raw) {
        Ok(l) => std::borrow::Cow::Borrowed(l),
        Err(_) => String::from_utf8_lossy(raw),
    };
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Err(LineError::Empty);
    }
    // The accept date anchors the line: whatever precedes the client address is the
    // syslog prefix.
    let date_at = find_accept_date(line).ok_or(LineError::NoDate)?;
    let before = line[..date_at].trim_end();
    let client = before.rsplit(' ').next().unwrap_or(before);
    let client_ip = client_ip(client)?;
    let request = &line[before.len() - client.len()..];
    let key: [u8; 16] = {
        use sha2::Digest as _;
        sha2::Sha256::digest(request.as_bytes())[..16]
            .try_into()
            .expect("16 of 32 bytes")
    };
    let close = line[date_at..]
        .find(']')
        .ok_or(LineError::Truncated("accept date"))?
        + date_at;
    let ts = parse_date(&line[date_at + 1..close])?;
    let mut f = line[close + 1..].split(' ').filter(|s| !s.is_empty());
    let mut next = |name: &'static str| f.next().ok_or(LineError::Truncated(name));
    let _frontend = next("frontend")?;
    let (backend, server) = next("backend/server")?
        .split_once('/')
        .ok_or(LineError::Truncated("backend/server"))?;
    // Names are stored as text, and PostgreSQL's text holds no NUL: refused here, or it
    // would fail the whole batch (text COPY used to cut the name at it).
    for (what, name) in [("backend", backend), ("server", server)] {
        if name.contains('\0') {
            return Err(LineError::BadField(what, name.into()));
        }
    }
    let timers = next("timers")?;
    let ta = timers
        .rsplit('/')
        .next()
        .and_then(|t| t.parse::<i64>().ok())
        .filter(|_| timers.split('/').count() == 5)
        .ok_or_else(|| LineError::BadField("timers", timers.into()))?;
    let status_s = next("status")?;
    let status_code: i16 = status_s
        .parse()
        .ok()
        .filter(|s| (-1..=999).contains(s))
        .ok_or_else(|| LineError::BadField("status", status_s.into()))?;
    let bytes_s = next("bytes")?;
    let bytes_out: i64 = bytes_s
        .trim_start_matches('+')
        .parse()
        .ok()
        .filter(|b| *b >= 0)
        .ok_or_else(|| LineError::BadField("bytes", bytes_s.into()))?;
    let _cc = next("request cookie")?;
    let _cs = next("response cookie")?;
    let _tsc = next("termination state")?;
    let _conns = next("connection counts")?;
    let _queues = next("queues")?;
    // Captures and the quoted request: `{…} {…} "METHOD path HTTP/x"`. The captures
    // contain no spaces for our headers; the request may.
    let hr = next("request captures")?;
    let (customer_id, service_type) = capture(hr)?;
    let _hs = next("response captures")?;
    // The method is the quoted request's first word (what follows it is not kept);
    // HAProxy logs a request it could not parse as `"<BADREQ>"`, quote and all.
    let method = f
        .next()
        .and_then(|r| r.strip_prefix('"'))
        .map(|m| m.strip_suffix('"').unwrap_or(m))
        .filter(|m| !m.is_empty())
        .ok_or(LineError::Truncated("request"))?;
    if method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        // `<BADREQ>` and friends: keep them, they are requests HAProxy saw.
        if method != "<BADREQ>" {
            return Err(LineError::BadField("method", method.into()));
        }
    }
    Ok(LogRecord {
        key,
        ts,
        customer_id,
        service_type,
        method: method.to_string(),
        status_code,
        bytes_out,
        duration_ms: (ta >= 0).then(|| ta.min(i64::from(i32::MAX)) as i32),
        client_ip,
        backend: backend.to_string(),
        server: server.to_string(),
    })
}

/// Index of the `[` that opens `[dd/Mon/yyyy:`.
fn find_accept_date(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    let mut from = 0;
    while let Some(i) = line[from..].find('[').map(|i| i + from) {
        let s = &b[i + 1..];
        if s.len() >= 12
            && s[0].is_ascii_digit()
            && s[1].is_ascii_digit()
            && s[2] == b'/'
            && s[3].is_ascii_alphabetic()
            && s[6] == b'/'
            && s[7..11].iter().all(u8::is_ascii_digit)
            && s[11] == b':'
        {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

fn parse_date(s: &str) -> Result<DateTime<Utc>, LineError> {
    // HAProxy's `%tr` is always `dd/Mon/yyyy:HH:MM:SS.mmm`: read by position (chrono's
    // format parser was a tenth of the ingest's CPU); any other shape goes through it.
    let bad = || LineError::BadDate(s.into());
    if let Some(d) = fast_date(s.as_bytes()) {
        return Ok(d.and_utc());
    }
    let d = NaiveDateTime::parse_from_str(s, "%d/%b/%Y:%H:%M:%S%.f").map_err(|_| bad())?;
    // chrono reads second 60 as a leap second, which PostgreSQL refuses (and which would
    // land in the next day's partition): no HAProxy clock writes one.
    if d.nanosecond() >= 1_000_000_000 {
        return Err(bad());
    }
    // Stored to the microsecond: finer digits (a POSTed line; HAProxy writes
    // milliseconds) round half to even, as PostgreSQL's own input did, so the same line
    // keeps the same timestamp, and key, whichever path stored it.
    let (micros, rest) = (d.nanosecond() / 1000, d.nanosecond() % 1000);
    let up = rest > 500 || (rest == 500 && micros % 2 == 1);
    let d = d.with_nanosecond(micros * 1000).ok_or_else(bad)?;
    let d = if up {
        d + chrono::TimeDelta::microseconds(1)
    } else {
        d
    };
    Ok(d.and_utc())
}

/// `dd/Mon/yyyy:HH:MM:SS.mmm` exactly, validated as a calendar date and time.
fn fast_date(b: &[u8]) -> Option<NaiveDateTime> {
    if b.len() != 24 || b[2] != b'/' || b[6] != b'/' || b[11] != b':' || b[20] != b'.' {
        return None;
    }
    if b[14] != b':' || b[17] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let month = MONTHS.iter().position(|m| m[..] == b[3..6])? as u32 + 1;
    let date = chrono::NaiveDate::from_ymd_opt(num(7..11)? as i32, month, num(0..2)?)?;
    let time = chrono::NaiveTime::from_hms_milli_opt(
        num(12..14)?,
        num(15..17)?,
        num(18..20)?,
        num(21..24)?,
    )?;
    Some(date.and_time(time))
}

/// `10.0.0.7:61818`, `2001:db8::1:61818` or `[2001:db8::1]:61818` → the address.
fn client_ip(s: &str) -> Result<String, LineError> {
    let bad = || LineError::BadField("client address", s.into());
    let (addr, port) = match s.strip_prefix('[') {
        Some(r) => r.split_once("]:").ok_or_else(bad)?,
        None => s.rsplit_once(':').ok_or_else(bad)?,
    };
    port.parse::<u16>().map_err(|_| bad())?;
    addr.parse::<std::net::IpAddr>().map_err(|_| bad())?;
    Ok(addr.to_string())
}

/// `{12345678|seal}` → (12345678, "seal").
fn capture(s: &str) -> Result<(i32, String), LineError> {
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or(LineError::MissingCapture)?;
    let (id, svc) = inner.split_once('|').ok_or(LineError::MissingCapture)?;
    if id.is_empty() || svc.is_empty() {
        return Err(LineError::MissingCapture);
    }
    let id: i32 = id
        .parse()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| LineError::BadField("customer_id", id.into()))?;
    if svc.len() > 20
        || !svc
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(LineError::BadField("service_type", svc.into()));
    }
    Ok((id, svc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"Jan 27 21:52:56 lb1 haproxy[3098]: 10.0.0.7:61818 [27/Jan/2026:21:52:56.086] fe_api~ be_seal/s1 0/0/1/1/2 200 517 - - ---- 1/1/0/0/0 0/0 {12345678|seal} {} "POST /v1/seal HTTP/1.1""#;

    fn bare(s: &str) -> String {
        s.split_once("]: ").unwrap().1.to_string()
    }

    #[test]
    fn the_spec_example_with_and_without_syslog_prefix() {
        let want = LogRecord {
            ts: "2026-01-27T21:52:56.086Z".parse().unwrap(),
            customer_id: 12345678,
            service_type: "seal".into(),
            method: "POST".into(),
            status_code: 200,
            bytes_out: 517,
            duration_ms: Some(2),
            client_ip: "10.0.0.7".into(),
            backend: "be_seal".into(),
            server: "s1".into(),
            // The same key with any prefix, or none (checked by the three below).
            key: parse_line(bare(SPEC).as_bytes()).unwrap().key,
        };
        assert_eq!(parse_line(SPEC.as_bytes()).unwrap(), want);
        assert_eq!(parse_line(bare(SPEC).as_bytes()).unwrap(), want);
        let rfc5424 = format!(
            "<134>1 2026-01-27T21:52:56Z lb1 haproxy 3098 - - {}",
            bare(SPEC)
        );
        assert_eq!(parse_line(rfc5424.as_bytes()).unwrap(), want);
        assert_eq!(parse_line(format!("{SPEC}\r\n").as_bytes()).unwrap(), want);
    }

    #[test]
    fn minus_one_timers_and_nosrv() {
        let l = SPEC.replace(
            "be_seal/s1 0/0/1/1/2 200",
            "be_seal/<NOSRV> -1/-1/-1/-1/0 503",
        );
        let r = parse_line(l.as_bytes()).unwrap();
        assert_eq!(
            (r.server.as_str(), r.status_code, r.duration_ms),
            ("<NOSRV>", 503, Some(0))
        );
        let l = SPEC.replace("0/0/1/1/2", "0/0/1/-1/-1");
        assert_eq!(parse_line(l.as_bytes()).unwrap().duration_ms, None);
        let l = SPEC.replace(" 200 517 ", " -1 0 ");
        assert_eq!(parse_line(l.as_bytes()).unwrap().status_code, -1);
    }

    #[test]
    fn ipv6_clients() {
        for c in ["2001:db8::7:61818", "[2001:db8::7]:61818", "::1:443"] {
            let l = SPEC.replace("10.0.0.7:61818", c);
            let r = parse_line(l.as_bytes()).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert!(r.client_ip.contains(':'), "{c} -> {}", r.client_ip);
        }
    }

    #[test]
    fn missing_or_bad_captures() {
        for cap in ["{}", "{|}", "{|seal}", "{123|}", "-"] {
            let l = SPEC.replace("{12345678|seal}", cap);
            assert_eq!(
                parse_line(l.as_bytes()),
                Err(LineError::MissingCapture),
                "{cap}"
            );
        }
        let l = SPEC.replace("{12345678|seal}", "{-5|seal}");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadField("customer_id", _))
        ));
        let l = SPEC.replace("{12345678|seal}", "{1|se,al}");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadField("service_type", _))
        ));
    }

    #[test]
    fn truncated_lines_say_where() {
        let full = bare(SPEC);
        let cut_at = |needle: &str| full[..full.find(needle).unwrap()].to_string();
        assert_eq!(parse_line(b""), Err(LineError::Empty));
        assert_eq!(parse_line(b"10.0.0.7:61818"), Err(LineError::NoDate));
        assert_eq!(
            parse_line(cut_at(" 200").as_bytes()),
            Err(LineError::Truncated("status"))
        );
        assert_eq!(
            parse_line(cut_at(" {12345678").as_bytes()),
            Err(LineError::Truncated("request captures"))
        );
        assert_eq!(
            parse_line(cut_at(" \"POST").as_bytes()),
            Err(LineError::Truncated("request"))
        );
        assert!(matches!(
            parse_line(cut_at(".086]").as_bytes()),
            Err(LineError::Truncated(_) | LineError::BadDate(_))
        ));
    }

    #[test]
    fn non_utf8_bytes_in_the_request_are_tolerated_elsewhere_rejected() {
        let mut l = SPEC.as_bytes().to_vec();
        let at = l.windows(8).position(|w| w == b"/v1/seal").unwrap();
        l.splice(at..at, [0xff, 0xfe]);
        assert_eq!(parse_line(&l).unwrap().customer_id, 12345678);
        let mut l = SPEC.as_bytes().to_vec();
        let at = l.windows(6).position(|w| w == b"|seal}").unwrap();
        l[at + 1] = 0xff;
        assert!(matches!(
            parse_line(&l),
            Err(LineError::BadField("service_type", _))
        ));
    }

    #[test]
    fn a_nul_in_a_name_is_refused_other_names_are_kept() {
        for (to, what) in [("be\0seal/s1", "backend"), ("be_seal/s\x001", "server")] {
            let l = SPEC.replace("be_seal/s1", to);
            assert!(
                matches!(parse_line(l.as_bytes()), Err(LineError::BadField(w, _)) if w == what),
                "{to:?}"
            );
        }
        // Stored before the binary COPY, stored still: empty names, other control bytes.
        for to in ["/s1", "be_seal/", "be\x07seal/s\x7f1"] {
            let l = SPEC.replace("be_seal/s1", to);
            let r = parse_line(l.as_bytes()).unwrap_or_else(|e| panic!("{to:?}: {e}"));
            assert_eq!(format!("{}/{}", r.backend, r.server), to);
        }
    }

    #[test]
    fn badreq_lines_as_haproxy_writes_them_are_kept() {
        let l = SPEC.replace("\"POST /v1/seal HTTP/1.1\"", "\"<BADREQ>\"");
        assert_eq!(parse_line(l.as_bytes()).unwrap().method, "<BADREQ>");
        let l = SPEC.replace("\"POST /v1/seal HTTP/1.1\"", "\"GET\"");
        assert_eq!(parse_line(l.as_bytes()).unwrap().method, "GET");
        let l = SPEC.replace("\"POST /v1/seal HTTP/1.1\"", "\"\"");
        assert_eq!(
            parse_line(l.as_bytes()),
            Err(LineError::Truncated("request"))
        );
    }

    #[test]
    fn sub_microsecond_digits_round_half_even_and_leap_seconds_are_refused() {
        let at = |s: &str| parse_date(s).map(|d| d.format("%S%.6f").to_string());
        assert_eq!(at("27/Jan/2026:21:52:56.0000009").unwrap(), "56.000001");
        assert_eq!(at("27/Jan/2026:21:52:56.0000015").unwrap(), "56.000002");
        assert_eq!(at("27/Jan/2026:21:52:56.0000025").unwrap(), "56.000002");
        assert_eq!(at("27/Jan/2026:21:52:56.0000024").unwrap(), "56.000002");
        assert_eq!(at("27/Jan/2026:21:52:59.9999996").unwrap(), "00.000000");
        assert!(parse_date("31/Dec/2026:23:59:60.500").is_err());
    }

    #[test]
    fn accept_dates_read_by_position_agree_with_chrono() {
        for d in [
            "27/Jan/2026:21:52:56.086",
            "01/Feb/2024:00:00:00.000",
            "29/Feb/2024:23:59:59.999",
            "31/Dec/1999:12:34:56.789",
        ] {
            let slow = NaiveDateTime::parse_from_str(d, "%d/%b/%Y:%H:%M:%S%.f").unwrap();
            assert_eq!(fast_date(d.as_bytes()), Some(slow), "{d}");
            assert_eq!(parse_date(d).unwrap(), slow.and_utc());
        }
        // Impossible dates and times, and bad digits, are refused by both paths.
        for d in [
            "29/Feb/2026:00:00:00.000",
            "32/Jan/2026:00:00:00.000",
            "27/Jan/2026:24:00:00.000",
            "27/Jan/2026:23:60:00.000",
            "27/Jab/2026:00:00:00.000",
            "2x/Jan/2026:00:00:00.000",
            "27/Jan/2026:00:00:00.0-0",
        ] {
            assert_eq!(fast_date(d.as_bytes()), None, "{d}");
            assert!(parse_date(d).is_err(), "{d}");
        }
        // Other shapes still go through chrono: microseconds, no fraction.
        assert!(fast_date(b"27/Jan/2026:21:52:56.086123").is_none());
        assert_eq!(
            parse_date("27/Jan/2026:21:52:56.086123").unwrap(),
            "2026-01-27T21:52:56.086123Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        assert!(parse_date("27/Jan/2026:21:52:56").is_ok());
    }

    #[test]
    fn bad_numbers() {
        let l = SPEC.replace(" 200 517 ", " 2x0 517 ");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadField("status", _))
        ));
        let l = SPEC.replace(" 200 517 ", " 200 -5 ");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadField("bytes", _))
        ));
        let l = SPEC.replace("0/0/1/1/2", "0/0/1");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadField("timers", _))
        ));
        let l = SPEC.replace("[27/Jan/2026:21:52:56.086]", "[32/Jan/2026:21:52:56.086]");
        assert!(matches!(
            parse_line(l.as_bytes()),
            Err(LineError::BadDate(_))
        ));
    }
}
