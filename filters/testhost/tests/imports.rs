//! The host on a hand-assembled module: imports it does not implement are
//! recorded and refused with an error status, or trap with their name when
//! they have no status to return.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tokentap_testhost::{Error, HostCall, Plugin, Status, TestHost};

fn uleb(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn name(s: &str, out: &mut Vec<u8>) {
    uleb(s.len(), out);
    out.extend_from_slice(s.as_bytes());
}

fn section(id: u8, items: &[Vec<u8>], out: &mut Vec<u8>) {
    let mut body = Vec::new();
    uleb(items.len(), &mut body);
    items.iter().for_each(|i| body.extend_from_slice(i));
    out.push(id);
    uleb(body.len(), out);
    out.extend(body);
}

/// Writes one piece of an entry.
type Part<'a> = &'a dyn Fn(&mut Vec<u8>);

fn entry(parts: &[Part<'_>]) -> Vec<u8> {
    let mut v = Vec::new();
    parts.iter().for_each(|p| p(&mut v));
    v
}

/// Imports `env.proxy_made_up: (i32) -> i32` and `env.proxy_void_thing: () -> ()`;
/// exports `probe` (calls the first with 5, returns its status),
/// `probe_void` (calls the second), memory and the ABI marker.
fn module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // Types: 0 (i32)->i32, 1 ()->(), 2 ()->i32.
    section(
        1,
        &[
            vec![0x60, 1, 0x7f, 1, 0x7f],
            vec![0x60, 0, 0],
            vec![0x60, 0, 1, 0x7f],
        ],
        &mut m,
    );
    let import = |n: &'static str, ty: u8| {
        entry(&[&|v| name("env", v), &|v| name(n, v), &|v| v.extend([0, ty])])
    };
    section(
        2,
        &[import("proxy_made_up", 0), import("proxy_void_thing", 1)],
        &mut m,
    );
    section(3, &[vec![1], vec![2], vec![1]], &mut m);
    section(5, &[vec![0, 1]], &mut m);
    let export = |n: &'static str, kind: u8, index: u8| {
        entry(&[&|v| name(n, v), &|v| v.extend([kind, index])])
    };
    let exports = [
        export("memory", 2, 0),
        export("proxy_abi_version_0_2_1", 0, 2),
        export("probe", 0, 3),
        export("probe_void", 0, 4),
    ];
    section(7, &exports, &mut m);
    let body = |code: &[u8]| {
        entry(&[&|v| uleb(code.len() + 1, v), &|v| v.push(0), &|v| {
            v.extend_from_slice(code)
        }])
    };
    // i32.const 5; call 0; end  /  call 1; end  /  end
    section(
        10,
        &[
            body(&[0x0b]),
            body(&[0x41, 5, 0x10, 0, 0x0b]),
            body(&[0x10, 1, 0x0b]),
        ],
        &mut m,
    );
    m
}

#[test]
fn an_unimplemented_import_is_recorded_and_refused_with_a_status() {
    let plugin = Plugin::from_bytes(&module()).unwrap();
    let mut host = TestHost::new(&plugin).unwrap();
    let status: u32 = host.call(0, "probe", ()).unwrap();
    assert_eq!(status, Status::Unimplemented.code());
    let last = host.calls().last().unwrap();
    assert_eq!(
        last.call,
        HostCall::Unimplemented {
            module: "env".into(),
            name: "proxy_made_up".into()
        }
    );
    assert_eq!(last.status, Status::Unimplemented);
}

#[test]
fn an_unimplemented_import_without_a_status_traps_naming_itself() {
    let plugin = Plugin::from_bytes(&module()).unwrap();
    let mut host = TestHost::new(&plugin).unwrap();
    match host.call::<(), ()>(0, "probe_void", ()) {
        Err(Error::Trap {
            function, message, ..
        }) => {
            assert_eq!(function, "probe_void");
            assert!(message.contains("env.proxy_void_thing"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn a_module_without_the_abi_marker_is_refused() {
    let mut m = module();
    let at = m.windows(7).position(|w| w == b"0_2_1\x00\x02").unwrap();
    m[at + 4] = b'9';
    assert!(matches!(Plugin::from_bytes(&m), Err(Error::Load(_))));
}
