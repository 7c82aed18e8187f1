//! One rendered file: where it goes, its mode and contents, which units read it, and
//! whether it holds secrets.

/// The containerd unit.
pub const CONTAINERD_UNIT: &str = "containerd.service";
/// The kubelet unit.
pub const KUBELET_UNIT: &str = "kubelet.service";

/// One file to write, and who it belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Absolute host path (the binary resolves it under `--root`).
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub contents: String,
    /// The systemd units that read it: they restart when it changes.
    pub owners: Vec<String>,
    /// It may hold credentials (a proxy password, registry credentials): its contents
    /// are shown nowhere — not in `--dry-run`, not in logs, not in `Debug` — and it is
    /// readable by root only.
    pub secret: bool,
}

impl std::fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RenderedFile");
        d.field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode));
        if self.secret {
            d.field(
                "contents",
                &format_args!("<{} bytes, secret>", self.contents.len()),
            );
        } else {
            d.field("contents", &self.contents);
        }
        d.field("owners", &self.owners).finish()
    }
}

impl RenderedFile {
    /// A file no service owns and without secrets.
    pub fn new(path: impl Into<String>, mode: u32, contents: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            mode,
            contents: contents.into(),
            owners: Vec::new(),
            secret: false,
        }
    }

    /// `unit` reads it.
    pub fn owned_by(mut self, unit: &str) -> Self {
        if !self.owners.iter().any(|o| o == unit) {
            self.owners.push(unit.to_string());
        }
        self
    }

    /// It may hold credentials (and is then readable by root only).
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self.mode &= 0o700;
        self
    }

    /// The contents as `--dry-run` and diffs may show them: a secret file's never.
    pub fn shown(&self) -> std::borrow::Cow<'_, str> {
        if self.secret {
            format!(
                "<{} bytes: may hold credentials, not shown>",
                self.contents.len()
            )
            .into()
        } else {
            self.contents.as_str().into()
        }
    }
}

/// The files as `hybridlet-sys::fileset` writes them: each path resolved under `root`.
pub fn desired_files(
    rendered: &[RenderedFile],
    root: &hybridlet_sys::HostRoot,
) -> Result<Vec<hybridlet_sys::fileset::DesiredFile>, hybridlet_sys::RootError> {
    rendered
        .iter()
        .map(|f| {
            Ok(hybridlet_sys::fileset::DesiredFile {
                path: root.resolve(&f.path)?,
                mode: f.mode,
                contents: f.contents.clone().into_bytes(),
            })
        })
        .collect()
}
