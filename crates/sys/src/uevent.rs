//! Kernel uevents: what tells the agent that PCI functions or network interfaces came,
//! went or changed driver (a PF's `sriov_numvfs` written, a function bound to vfio-pci, a
//! card hot-plugged), so it walks sysfs again when something changed instead of on a
//! timer. [`KernelUevents`] reads them from a `NETLINK_KOBJECT_UEVENT` socket (the
//! kernel's multicast group 1, what udev itself reads, before udev's rules); [`FakeUevents`]
//! is fed by a test. An event is only a hint to look again: its content filters, it never
//! decides.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// One uevent: `ACTION@DEVPATH` and its `KEY=VALUE` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `remove`, `bind`, `unbind`, `change`, `move`, ...
    pub action: String,
    /// The device's path under `/sys` (`/devices/pci0000:00/0000:00:02.0`).
    pub devpath: String,
    /// Every `KEY=VALUE` of the event (`SUBSYSTEM`, `DRIVER`, `PCI_SLOT_NAME`, ...).
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// The event's subsystem (`pci`, `net`, ...), if it names one.
    pub fn subsystem(&self) -> Option<&str> {
        self.vars.get("SUBSYSTEM").map(String::as_str)
    }

    /// A kernel message: `ACTION@DEVPATH\0KEY=VALUE\0...`. udev's own re-broadcasts (which
    /// start with `libudev`) and anything malformed are `None`.
    pub fn parse(message: &[u8]) -> Option<Self> {
        let mut parts = message.split(|b| *b == 0).filter(|p| !p.is_empty());
        let header = std::str::from_utf8(parts.next()?).ok()?;
        let (action, devpath) = header.split_once('@')?;
        if action.is_empty() || !devpath.starts_with('/') {
            return None;
        }
        let vars = parts
            .filter_map(|p| std::str::from_utf8(p).ok())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self {
            action: action.to_string(),
            devpath: devpath.to_string(),
            vars,
        })
    }

    /// Whether the event can change the devices the agent publishes or watches: a PCI
    /// function or a network interface came, went, changed driver or name.
    pub fn concerns_devices(&self) -> bool {
        matches!(self.subsystem(), Some("pci" | "net"))
            && matches!(
                self.action.as_str(),
                "add" | "remove" | "bind" | "unbind" | "change" | "move"
            )
    }
}

/// Where uevents come from.
pub trait UeventSource: Send {
    /// The next event, waiting at most `timeout`; `None` when none came in time.
    fn next(&mut self, timeout: Duration) -> std::io::Result<Option<Uevent>>;
}

/// The kernel's uevents on a netlink socket.
#[derive(Debug)]
pub struct KernelUevents {
    socket: OwnedFd,
    buffer: Vec<u8>,
    /// The receive timeout set on the socket.
    timeout: Option<Duration>,
}

/// The kernel's multicast group for uevents (udev's re-broadcasts are group 2).
const KERNEL_GROUP: u32 = 1;

impl KernelUevents {
    /// Open the socket (needs no privilege). Its receive buffer holds a burst: setting a
    /// PF's `sriov_numvfs` to 128 sends several hundred events at once.
    pub fn open() -> std::io::Result<Self> {
        use rustix::net::{
            AddressFamily, SocketFlags, SocketType, bind, netlink, socket_with, sockopt,
        };
        let socket = socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        // A larger buffer where the limits allow; the default still works, events lost
        // to an overflow are caught by the slow safety walk.
        let _ = sockopt::set_socket_recv_buffer_size(&socket, 4 << 20);
        bind(&socket, &netlink::SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        Ok(Self {
            socket,
            buffer: vec![0; 16 * 1024],
            timeout: None,
        })
    }
}

impl UeventSource for KernelUevents {
    fn next(&mut self, timeout: Duration) -> std::io::Result<Option<Uevent>> {
        use rustix::net::sockopt::{Timeout, set_socket_timeout};
        // A zero timeout would mean "for ever" to the kernel.
        let timeout = timeout.max(Duration::from_millis(1));
        if self.timeout != Some(timeout) {
            set_socket_timeout(&self.socket, Timeout::Recv, Some(timeout))?;
            self.timeout = Some(timeout);
        }
        loop {
            let got = match rustix::net::recv(
                &self.socket,
                &mut self.buffer[..],
                rustix::net::RecvFlags::empty(),
            ) {
                Ok((_, got)) => got.min(self.buffer.len()),
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            // Something else (a re-broadcast, garbage): look at the next one.
            if let Some(event) = Uevent::parse(&self.buffer[..got]) {
                return Ok(Some(event));
            }
        }
    }
}

/// Uevents a test sends.
#[derive(Debug)]
pub struct FakeUevents(std::sync::mpsc::Receiver<Uevent>);

impl FakeUevents {
    /// The sending end and the source.
    pub fn channel() -> (std::sync::mpsc::Sender<Uevent>, Self) {
        let (tx, rx) = std::sync::mpsc::channel();
        (tx, Self(rx))
    }
}

impl UeventSource for FakeUevents {
    fn next(&mut self, timeout: Duration) -> std::io::Result<Option<Uevent>> {
        match self.0.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The test is done sending: behave like a quiet kernel. Sources are read on
                // a blocking thread, never on the runtime.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_messages_parse_and_the_rest_does_not() {
        let vf = Uevent::parse(
            b"add@/devices/pci0000:00/0000:00:03.0/0000:01:10.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:03.0/0000:01:10.0\0SUBSYSTEM=pci\0PCI_SLOT_NAME=0000:01:10.0\0SEQNUM=4242\0",
        )
        .unwrap();
        assert_eq!(vf.action, "add");
        assert_eq!(vf.subsystem(), Some("pci"));
        assert_eq!(vf.vars["PCI_SLOT_NAME"], "0000:01:10.0");
        assert!(vf.concerns_devices());
        let block =
            Uevent::parse(b"change@/devices/virtual/block/loop0\0SUBSYSTEM=block\0").unwrap();
        assert!(!block.concerns_devices());
        let net_rename =
            Uevent::parse(b"move@/devices/virtual/net/eth9\0SUBSYSTEM=net\0INTERFACE=eth9\0")
                .unwrap();
        assert!(net_rename.concerns_devices());
        // udev's re-broadcast, garbage, a header without a path.
        assert_eq!(Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(Uevent::parse(b"\xff\xff@/x"), None);
        assert_eq!(Uevent::parse(b"add@relative\0SUBSYSTEM=pci\0"), None);
        assert_eq!(Uevent::parse(b""), None);
    }

    #[test]
    fn the_fake_delivers_in_order_then_times_out() {
        let (tx, mut source) = FakeUevents::channel();
        let event = Uevent::parse(b"bind@/devices/x\0SUBSYSTEM=pci\0DRIVER=vfio-pci\0").unwrap();
        tx.send(event.clone()).unwrap();
        assert_eq!(source.next(Duration::from_millis(10)).unwrap(), Some(event));
        assert_eq!(source.next(Duration::from_millis(10)).unwrap(), None);
        drop(tx);
        assert_eq!(source.next(Duration::from_millis(10)).unwrap(), None);
    }

    /// The real kernel, as root: writing `change` to a device's `uevent` file makes the
    /// kernel send that event, which the socket receives.
    #[test]
    #[ignore = "needs root (writes /sys/class/net/lo/uevent)"]
    fn the_kernel_sends_what_a_uevent_write_asks_for() {
        let mut source = KernelUevents::open().unwrap();
        std::fs::write("/sys/class/net/lo/uevent", "change").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            assert!(std::time::Instant::now() < deadline, "no uevent for lo");
            if let Some(e) = source.next(Duration::from_millis(500)).unwrap()
                && e.devpath == "/devices/virtual/net/lo"
            {
                assert_eq!(e.action, "change");
                assert_eq!(e.subsystem(), Some("net"));
                assert_eq!(e.vars["INTERFACE"], "lo");
                assert!(e.concerns_devices());
                break;
            }
        }
    }
}
