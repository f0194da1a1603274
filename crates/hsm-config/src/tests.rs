use super::*;

#[test]
fn remote_options_pick_the_longest_prefix_and_never_print_values() {
    let c = Config::parse(
        "[remote.options.\"s3://b\"]\naws_region = \"r1\"\n[remote.options.\"s3://b/deep\"]\naws_secret_access_key = \"SECRET\"\n",
        Path::new("x.toml"),
    )
    .expect("parse");
    assert_eq!(
        c.remote.options_for("s3://b/x"),
        vec![("aws_region".into(), "r1".into())]
    );
    assert_eq!(c.remote.options_for("s3://b/deep/y").len(), 1);
    assert!(c.remote.options_for("s3://bb").is_empty());
    assert!(!format!("{:?}", c).contains("SECRET"));
}

#[test]
fn sizes_parse_and_print() {
    assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
    assert_eq!("8 MiB".parse::<ByteSize>(), Ok(ByteSize(8 << 20)));
    assert_eq!("512K".parse::<ByteSize>(), Ok(ByteSize(512 << 10)));
    assert!("8 parsecs".parse::<ByteSize>().is_err());
    assert!("99999999999T".parse::<ByteSize>().is_err());
    assert_eq!(ByteSize(8 << 20).to_string(), "8 MiB");
    assert_eq!(ByteSize(1000).to_string(), "1000");
    assert_eq!("20%".parse::<CacheSize>(), Ok(CacheSize::Percent(2000)));
    assert_eq!("12.5 %".parse::<CacheSize>(), Ok(CacheSize::Percent(1250)));
    assert_eq!(
        "64 MiB".parse::<CacheSize>(),
        Ok(CacheSize::Bytes(64 << 20))
    );
    assert!("0%".parse::<CacheSize>().is_err());
    assert!("150%".parse::<CacheSize>().is_err());
    assert_eq!(CacheSize::Percent(2000).bytes(1000), 200);
    assert_eq!(CacheSize::Percent(1250).to_string(), "12.50%");
    assert_eq!("90%".parse::<Percent>(), Ok(Percent(90)));
    assert!("0%".parse::<Percent>().is_err());
}

#[test]
fn metrics_listen_is_an_address_or_an_error_naming_it() {
    let c = Config::parse(
        "[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        Path::new("x.toml"),
    )
    .expect("parse");
    assert_eq!(
        c.metrics.listen,
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    let c = Config::parse("[metrics]\nlisten = \"[::1]:9464\"\n", Path::new("x.toml"))
        .expect("parse v6");
    assert_eq!(c.metrics.listen, Some("[::1]:9464".parse().expect("addr")));
    assert_eq!(Config::default().metrics.listen, None);
    let e = Config::parse("[metrics]\nlisten = \"localhost\"\n", Path::new("x.toml"))
        .expect_err("no port");
    assert!(
        e.to_string().contains("x.toml") && e.to_string().contains("listen"),
        "{e}"
    );
}

#[test]
fn empty_file_is_all_defaults() {
    let c = Config::parse("", Path::new("empty.toml")).expect("parse");
    assert_eq!(c, Config::default());
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let e = Config::parse("[agent]\nreadahed = \"1M\"\n", Path::new("x.toml")).expect_err("typo");
    let msg = e.to_string();
    assert!(msg.contains("x.toml") && msg.contains("readahed"), "{msg}");
}

#[test]
fn invalid_values_name_the_key() {
    let e = Config::parse("[populate]\nmin_granule = \"3 MiB\"\n", Path::new("x.toml"))
        .expect_err("not a power of two");
    assert!(e.to_string().contains("populate.min_granule"), "{e}");
    let e = Config::parse(
        "[agent]\npersist_interval = \"soon\"\n",
        Path::new("x.toml"),
    )
    .expect_err("bad duration");
    assert!(e.to_string().contains("soon"), "{e}");
    // Prefetch must leave readers fetch slots of their own.
    let e = Config::parse(
        "[agent]\nmax_concurrent_fetches = 4\n[prefetch]\njobs = 4\n",
        Path::new("x.toml"),
    )
    .expect_err("prefetch jobs take every slot");
    assert!(e.to_string().contains("prefetch.jobs"), "{e}");
    assert!(e.to_string().contains("readers need slots"), "{e}");
    let c = Config::parse(
        "[prefetch]\nenabled = false\njobs = 3\nbandwidth = \"1 MiB\"\n",
        Path::new("x.toml"),
    )
    .expect("a valid [prefetch]");
    assert_eq!(
        (c.prefetch.enabled, c.prefetch.jobs, c.prefetch.bandwidth.0),
        (false, 3, 1 << 20)
    );
}

/// The example in config/ lists every key with its default: parsing it gives the defaults,
/// and every key of the serialised defaults appears in it.
#[test]
fn example_config_is_complete_and_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/hsm.toml");
    let text = std::fs::read_to_string(&path).expect("config/hsm.toml");
    let parsed = Config::parse(&text, &path).expect("example parses");
    let mut expected = Config::default();
    // The example shows optional paths commented out; they stay unset.
    expected.agent.ready_file = None;
    assert_eq!(parsed, expected, "config/hsm.toml must show the defaults");
    let defaults = toml::to_string(&Config::default()).expect("serialise");
    for line in defaults.lines() {
        if let Some((key, _)) = line.split_once(" = ") {
            assert!(
                text.contains(&format!("{key} = ")) || text.contains(&format!("# {key} = ")),
                "config/hsm.toml does not mention {key}"
            );
        }
    }
    for optional in ["ready_file", "stats_file", "listen"] {
        assert!(
            text.contains(&format!("# {optional} = ")),
            "mention {optional}"
        );
    }
}
