//! Property tests, run on every `cargo test` as a short fuzz pass: the SMTP
//! command and address parsing never panics and round-trips addresses
//! exactly, and the policy file loaders never panic on malformed YAML.

use baton::intake::address::{parse_address, smtp_path};
use baton::policy::pools::Pools;
use baton::policy::senders::Senders;
use baton::policy::shaping::Shaping;
use baton::policy::warmup::Schedules;
use baton::webhooks::Webhooks;
use proptest::prelude::*;
use smtp_proto::Request;

/// Parses one command line as the intake session does.
fn parse_command(line: &[u8]) -> Result<Request<std::borrow::Cow<'_, str>>, smtp_proto::Error> {
    Request::parse(&mut line.iter())
}

/// Local parts: printable ASCII, including the characters that need quoting.
fn local_part() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just(' '), Just('"'), Just('\\'), Just('.'), proptest::char::range('!', '~')], 1..24)
        .prop_map(|chars| chars.into_iter().collect())
}

/// YAML built from the policy files' own keys, scalars and nesting, so
/// inputs reach the loaders' checks instead of failing at the first byte.
fn policy_yaml() -> impl Strategy<Value = String> {
    let keys = prop_oneof![
        Just("pools"), Just("routing"), Just("sources"), Just("name"), Just("ip"), Just("ehlo"), Just("weight"),
        Just("warmup"), Just("schedule"), Just("started"), Just("overflow"), Just("header"), Just("pool"),
        Just("pool_from_value"), Just("equals"), Just("sender_domain"), Just("schedules"), Just("daily"),
        Just("sites"), Just("advance"), Just("spread"), Just("hold_on"), Just("deferral_rate_above"),
        Just("webhooks"), Just("url"), Just("events"), Just("batch_size"), Just("headers"), Just("default"),
        Just("providers"), Just("domains"), Just("responses"), Just("max_connections"), Just("max_message_rate"),
        Just("match"), Just("action"), Just("duration"), Just("mx_suffixes"), Just("selectors"), Just("keys"),
        Just("alignment"), Just("mode"), Just("unsigned"), Just("canonicalization"), Just("x"),
    ];
    let scalars = prop_oneof![
        Just("1".to_string()), Just("0".to_string()), Just("-5".to_string()), Just("true".to_string()),
        Just("192.0.2.1".to_string()), Just("::1".to_string()), Just("10/s".to_string()), Just("0/min".to_string()),
        Just("2026-13-40".to_string()), Just("http://127.0.0.1:1/x".to_string()), Just("[1, 2]".to_string()),
        Just("[]".to_string()), Just("{}".to_string()), Just("~".to_string()), Just("\"".to_string()),
        Just("backoff".to_string()), Just("enforce".to_string()), Just("1e400".to_string()), "[a-z*./]{0,12}",
    ];
    let line = (0usize..4, keys, proptest::bool::ANY, scalars).prop_map(|(depth, key, list, value)| {
        let indent = "  ".repeat(depth);
        if list { format!("{indent}- {key}: {value}\n") } else { format!("{indent}{key}: {value}\n") }
    });
    proptest::collection::vec(line, 0..16).prop_map(|lines| lines.concat())
}

proptest! {
    #[test]
    fn command_parser_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_command(&line);
    }

    #[test]
    fn address_parser_never_panics(address in "\\PC{0,80}", smtputf8 in proptest::bool::ANY) {
        if let Ok(recipient) = parse_address(&address, smtputf8) {
            // Kept exactly as given; the routing domain is lower-case ASCII.
            prop_assert_eq!(&recipient.address, &address);
            prop_assert!(recipient.domain.is_ascii());
            prop_assert_eq!(recipient.domain.to_ascii_lowercase(), recipient.domain.clone());
        }
    }

    #[test]
    fn address_round_trips_through_rcpt(local in local_part()) {
        let address = format!("{local}@example.com");
        let line = format!("RCPT TO:<{}>\r\n", smtp_path(&address));
        match parse_command(line.as_bytes()) {
            Ok(Request::Rcpt { to }) => {
                let recipient = parse_address(&to.address, false);
                // The parser reads back exactly what was written, or the
                // address is rejected: never rewritten.
                if let Ok(recipient) = recipient {
                    prop_assert_eq!(recipient.address, address);
                }
            }
            Ok(other) => prop_assert!(false, "parsed as another command: {:?}", other),
            // A local part the command syntax cannot carry is rejected
            // with a reply, which is allowed.
            Err(_) => {}
        }
    }

    #[test]
    fn policy_loaders_never_panic(text in policy_yaml()) {
        let schedules = Schedules::parse(&text).unwrap_or_default();
        let _ = Pools::parse(&text, &schedules);
        let _ = Webhooks::parse(&text);
        let _ = Senders::parse(&text);
        if let Ok(file) = Shaping::parse_file(&text) {
            let _ = Shaping::merge(&[file]);
        }
    }
}
