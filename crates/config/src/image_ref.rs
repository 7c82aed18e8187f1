//! Container image references as containerd and the kubelet read them (the distribution
//! project's reference grammar): `[registry[:port]/]path[:tag][@algo:hex]`, where the first
//! component is a registry only when it has a `.` or a `:`, or is `localhost`; anything
//! else is on Docker Hub (`docker.io`, one-component names under `library/`).

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `harbor.example.com`, `127.0.0.1:5000`.
    pub registry: String,
    /// `library/busybox`, `eks/pause`.
    pub repository: String,
    /// The tag, when given (`latest` is implied by containerd only when neither a tag nor
    /// a digest is).
    pub tag: Option<String>,
    /// `sha256:…`, when given.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parse `text`, or say what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.len() > 255 + 128 + 80 {
            return Err("is too long".into());
        }
        let (name, digest) = match text.split_once('@') {
            Some((n, d)) => {
                let (algo, hex) = d
                    .split_once(':')
                    .ok_or_else(|| format!("digest {d:?} is not ALGORITHM:HEX"))?;
                let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
                if algo.is_empty() || !algo.bytes().all(|b| b.is_ascii_alphanumeric()) || !hex_ok {
                    return Err(format!("digest {d:?} is not ALGORITHM:HEX (e.g. sha256:…)"));
                }
                (n, Some(d.to_string()))
            }
            None => (text, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        if let Some(t) = &tag {
            let ok = t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(format!(
                    "tag {t:?} is not a tag (letters, digits, '_', '.', '-'; at most 128)"
                ));
            }
        }
        let mut parts: Vec<&str> = name.split('/').collect();
        let registry = if parts.len() > 1
            && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
        {
            parts.remove(0).to_string()
        } else {
            "docker.io".to_string()
        };
        for part in &parts {
            let ok = !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric())
                && part
                    .bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(format!(
                    "path component {part:?} is not valid (lower-case letters, digits and single separators '.', '_', '-')"
                ));
            }
        }
        let mut repository = parts.join("/");
        if registry == "docker.io" && parts.len() == 1 {
            repository = format!("library/{repository}");
        }
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The fully qualified form containerd names the image by:
    /// `docker.io/library/busybox:latest`.
    pub fn normalized(&self) -> String {
        let mut out = format!("{}/{}", self.registry, self.repository);
        match (&self.tag, &self.digest) {
            (Some(t), _) => {
                out.push(':');
                out.push_str(t);
            }
            (None, None) => out.push_str(":latest"),
            (None, Some(_)) => {}
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalizes_as_containerd_does() {
        let n = |s: &str| ImageRef::parse(s).unwrap().normalized();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            n("nvidia/cuda:12.4.1-base"),
            "docker.io/nvidia/cuda:12.4.1-base"
        );
        assert_eq!(n("localhost/x/y:1"), "localhost/x/y:1");
        assert_eq!(
            n("127.0.0.1:5000/eks/pause:3.5"),
            "127.0.0.1:5000/eks/pause:3.5"
        );
        let r = ImageRef::parse("harbor.example.com/ml/triton:24.08").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("harbor.example.com", "ml/triton")
        );
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            n(&format!("registry.k8s.io/pause@{d}")),
            format!("registry.k8s.io/pause@{d}")
        );
        assert_eq!(
            n(&format!("registry.k8s.io/pause:3.10@{d}")),
            format!("registry.k8s.io/pause:3.10@{d}")
        );
    }

    #[test]
    fn refuses_what_containerd_refuses() {
        for bad in [
            "",
            "Busybox",
            "a//b",
            "x:",
            "x@sha256:zz",
            "x:-tag",
            "harbor.example.com/",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
