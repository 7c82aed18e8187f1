#!/bin/bash
# Build an OCI image layout in OUT (tag "latest") holding busybox-static as /bin/busybox
# and /bin/sh, by hand (tar, sha256sum, JSON): the image the registry tests push with
# skopeo and pull with containerd, and (with NAME, containerd's io.containerd.image.name
# annotation, so that `ctr images import` of the layout's tar names it) the VM's pause
# image. Reproducible: same busybox, same digests.
set -euo pipefail
out=$1
name=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$out/blobs/sha256"
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/sh"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/rootfs" -cf "$work/layer" bin
blob() { # FILE -> "DIGEST SIZE", copied into the layout
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1); s=$(stat -c %s "$1")
  cp "$1" "$out/blobs/sha256/$d"
  echo "$d $s"
}
read -r layer layer_size < <(blob "$work/layer")
arch=$(dpkg --print-architecture)
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$arch" "$layer" > "$work/config"
read -r config config_size < <(blob "$work/config")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$work/manifest"
read -r manifest manifest_size < <(blob "$work/manifest")
annotations='"org.opencontainers.image.ref.name":"latest"'
[ -z "$name" ] || annotations="$annotations,\"io.containerd.image.name\":\"$name\""
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{%s}}]}' \
  "$manifest" "$manifest_size" "$annotations" > "$out/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$out/oci-layout"
